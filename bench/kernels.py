"""``python -m bench kernels``: each fused coupling kernel against its unfused eager
equivalent, in GB/s (bytes read plus written per second) next to the device's copy bandwidth.

CUDA only: on CPU the kernels run in Triton's interpreter, whose timings mean nothing.
"""
import json
import os
import statistics

import torch

SIZES = [2**20, 2**22, 2**24, 2**26, 2**28]  # 1M to 256M elements
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_cuda(fn, reps=20):
    """Median seconds of ``fn()`` over ``reps`` runs after two warm-up runs (CUDA events)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def cases(n, dtype):
    """``(name, fused, unfused, tensors moved)`` for each kernel on ``n``-element tensors."""
    a, b, c, d = (torch.randn(n, device="cuda", dtype=dtype) for _ in range(4))
    s = torch.randn(n, device="cuda", dtype=dtype) * 0.1
    ops = torch.ops.revtriton

    def affine_eager():
        a.mul_((2.0 * torch.tanh(s / 2.0)).exp()).add_(b)

    return [
        ("coupling_forward", lambda: ops.coupling_forward(a, b), lambda: a.add_(b), 3),
        ("coupling_inverse", lambda: ops.coupling_inverse(a, b), lambda: a.sub_(b), 3),
        ("coupling_backward", lambda: ops.coupling_backward(a, b, c, d), lambda: (a.sub_(b), c.add_(d)), 6),
        ("affine_forward", lambda: ops.affine_forward(a, s, b, None, 2.0), affine_eager, 4),
    ]


def main(out_dir):
    if not torch.cuda.is_available():
        print("python -m bench kernels: no CUDA device here; Triton's interpreter timings on CPU mean "
              "nothing, so there is nothing to measure.")
        return []
    big = torch.empty(2**28, device="cuda")
    copy_gbs = 2 * big.numel() * big.element_size() / time_cuda(lambda: big.clone()) / 1e9
    del big
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    rows = []
    print(f"{'kernel':20} {'dtype':5} {'elements':>10} {'fused GB/s':>11} {'eager GB/s':>11} {'of copy':>8}")
    for dtype_name, dtype in DTYPES.items():
        for n in SIZES:
            for name, fused, unfused, moved in cases(n, dtype):
                nbytes = moved * n * torch.finfo(dtype).bits // 8
                row = {"kernel": name, "dtype": dtype_name, "elements": n,
                       "fused_gbs": nbytes / time_cuda(fused) / 1e9, "eager_gbs": nbytes / time_cuda(unfused) / 1e9}
                rows.append(row)
                print(f"{name:20} {dtype_name:5} {n:>10} {row['fused_gbs']:>11.0f} {row['eager_gbs']:>11.0f} "
                      f"{row['fused_gbs'] / copy_gbs:>8.0%}")
            torch.cuda.empty_cache()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernels-cuda.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "rows": rows}, f, indent=1)
    return rows
