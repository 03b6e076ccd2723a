"""``python -m bench kernels``: each fused op against its unfused eager PyTorch equivalent, in
GB/s (the bytes the op reads plus writes, per second) and as a fraction of the device's copy
bandwidth, measured the same way with ``dst.copy_(src)`` on a 1 GiB fp32 buffer.

A time is the median over LOOPS loops of CALLS calls in a row between one pair of CUDA
events, divided by CALLS: the host queues launches while the device works, so its overhead
per call hides wherever a call keeps the device busy for longer than a launch takes (at
2**24 elements, bf16 additive couplings move 96 MiB a call: near that line; larger sizes
are well clear of it). Tensors hold 2**24 elements and more, far beyond L2, in fp32 and
bf16. Each loop starts from fresh inputs, as the calls repeat in place: log-scales of 0.1
of a standard normal and beta = 0.6 keep 100 calls in a row finite.

The tensors are shaped ``(SAMPLES, n // SAMPLES)``, one row a sample of the per-sample
log-determinant (``ld``, ``ld_grad``: one fp32 value a sample). The eager equivalents
compute in fp32 as the kernels do (fp32 copies of bf16 operands where a bf16 intermediate
would round), so both give the same values: checked on the device before timing, and by
tests/test_bench.py on CPU through Triton's interpreter.

CUDA only: on CPU the kernels run in Triton's interpreter, whose timings mean nothing.
"""
import dataclasses
import functools
import os
import statistics
from typing import Callable

import torch
import triton

import revtriton  # noqa: F401  (registers torch.ops.revtriton.*)

from . import report

SIZES = (2**24, 2**26, 2**28)  # 64 MiB to 1 GiB per fp32 tensor
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SAMPLES = 64
CALLS, LOOPS = 100, 3
COPY_ELEMENTS = 2**28
CHECK_ELEMENTS = SAMPLES * 1024  # where the device checks that fused and eager agree
CLAMP, BETA = 2.0, 0.6
PER_SAMPLE = ("ld", "ld_grad")
SCALE = {"s": 0.1}  # log-scales: exp(s_c) of 100 calls in a row stays finite
COLUMNS = ("op", "dtype", "elements", "MiB moved", "fused µs", "fused GB/s", "of copy", "eager µs", "eager GB/s",
           "of copy ", "x eager")
ops = torch.ops.revtriton


@dataclasses.dataclass(frozen=True)
class Case:
    """A fused op and its eager equivalent, both called with the tensors named in ``args``;
    the op reads all of them but ``write_only`` and writes those in ``writes``."""

    name: str
    args: tuple
    writes: tuple
    fused: Callable
    eager: Callable
    write_only: tuple = ()

    @property
    def reads(self):
        return tuple(a for a in self.args if a not in self.write_only)


def _sub_add(a, b, c, d):
    a.sub_(b)
    c.add_(d)


def _soft_clamp(s):
    """``CLAMP * tanh(s / CLAMP)`` in fp32."""
    return (s.float() / CLAMP).tanh_().mul_(CLAMP)


def _affine_forward(x, s, t, ld=None):
    s_c = _soft_clamp(s)
    if ld is not None:
        ld += s_c.sum(1)
    torch.add(s_c.exp_().mul_(x), t, out=x)


def _affine_inverse(y, s, t):
    torch.div(y.float() - t, _soft_clamp(s).exp_(), out=y)


def _affine_backward(y, dy, s, t, ds, ld_grad=None):
    th = (s.float() / CLAMP).tanh_()
    scale = (th * CLAMP).exp_()
    shifted = y.float() - t
    grad = shifted * dy
    if ld_grad is not None:
        grad += ld_grad[:, None]
    torch.div(shifted, scale, out=y)
    dy.mul_(scale)
    torch.mul(grad, 1 - th * th, out=ds)


def _momentum_forward(x, v, f):
    v_new = v.float()  # v itself when fp32: updated in place
    v_new.mul_(BETA).add_(f, alpha=1 - BETA)
    v.copy_(v_new)  # nothing to do when v_new is v
    x.add_(v_new)


def _momentum_inverse(v, f):
    torch.div(v.float().sub(f, alpha=1 - BETA), BETA, out=v)


def _momentum_backward_x(x, v, dx, dv):
    x.sub_(v)
    torch.mul(dx.float() + dv, 1 - BETA, out=dv)


def _momentum_backward_v(v, f, dx, fx, dv):
    _momentum_inverse(v, f)
    dx.add_(fx)
    dv.mul_(BETA / (1 - BETA))


CASES = (
    Case("coupling_forward", ("a", "b"), ("a",), ops.coupling_forward, torch.Tensor.add_),
    Case("coupling_inverse", ("a", "b"), ("a",), ops.coupling_inverse, torch.Tensor.sub_),
    Case("coupling_backward", ("a", "b", "c", "d"), ("a", "c"), ops.coupling_backward, _sub_add),
    Case("affine_forward", ("x", "s", "t"), ("x",),
         lambda x, s, t: ops.affine_forward(x, s, t, None, CLAMP), _affine_forward),
    Case("affine_forward ld", ("x", "s", "t", "ld"), ("x", "ld"),
         lambda x, s, t, ld: ops.affine_forward(x, s, t, ld, CLAMP), _affine_forward),
    Case("affine_inverse", ("y", "s", "t"), ("y",),
         lambda y, s, t: ops.affine_inverse(y, s, t, CLAMP), _affine_inverse),
    Case("affine_backward", ("y", "dy", "s", "t", "ds"), ("y", "dy", "ds"),
         lambda y, dy, s, t, ds: ops.affine_backward(y, dy, s, t, ds, None, CLAMP), _affine_backward, ("ds",)),
    Case("affine_backward ld_grad", ("y", "dy", "s", "t", "ds", "ld_grad"), ("y", "dy", "ds"),
         lambda y, dy, s, t, ds, ld_grad: ops.affine_backward(y, dy, s, t, ds, ld_grad, CLAMP), _affine_backward,
         ("ds",)),
    Case("momentum_forward", ("x", "v", "f"), ("x", "v"),
         lambda x, v, f: ops.momentum_forward(x, v, f, BETA), _momentum_forward),
    Case("momentum_inverse", ("v", "f"), ("v",), lambda v, f: ops.momentum_inverse(v, f, BETA), _momentum_inverse),
    Case("momentum_backward_x", ("x", "v", "dx", "dv"), ("x", "dv"),
         lambda x, v, dx, dv: ops.momentum_backward_x(x, v, dx, dv, BETA), _momentum_backward_x),
    Case("momentum_backward_v", ("v", "f", "dx", "fx", "dv"), ("v", "dx", "dv"),
         lambda v, f, dx, fx, dv: ops.momentum_backward_v(v, f, dx, fx, dv, BETA), _momentum_backward_v),
)


def inputs(case, n, dtype, device, samples=SAMPLES):
    """The tensors ``case.args``: ``(samples, n // samples)`` of ``dtype``, or ``(samples,)``
    fp32 for ld and ld_grad; standard normal, times ``SCALE[name]`` where there is one."""
    if n % samples:
        raise ValueError(f"n={n} elements; expected a multiple of samples={samples}")
    tensors = [torch.randn(samples, device=device) if name in PER_SAMPLE else
               torch.randn(samples, n // samples, device=device, dtype=dtype) for name in case.args]
    for name, t in zip(case.args, tensors):
        if name in SCALE:
            t.mul_(SCALE[name])
    return tensors


def moved_bytes(case, n, dtype, samples=SAMPLES):
    """The bytes ``case``'s op reads plus writes on :func:`inputs` of ``n`` elements of ``dtype``."""
    size = {name: samples * torch.float32.itemsize if name in PER_SAMPLE else n * dtype.itemsize
            for name in case.args}
    return sum(size[name] for name in case.reads) + sum(size[name] for name in case.writes)


def outcomes(case, n, dtype, device, samples=SAMPLES):
    """``(fused, eager)``: the tensors ``case`` writes, after its fused op and after its eager
    equivalent, each run once on a copy of the same inputs."""
    tensors = inputs(case, n, dtype, device, samples)
    results = []
    for fn in (case.fused, case.eager):
        copies = [t.clone() for t in tensors]
        fn(*copies)
        results.append([t for name, t in zip(case.args, copies) if name in case.writes])
    return tuple(results)


def seconds_per_call(fn, make_args):
    """Median over LOOPS loops of the CUDA-event time of CALLS calls of ``fn`` in a row, over
    CALLS; each loop on fresh ``make_args()``, after one warm-up call (compilation, caches)."""
    fn(*make_args())
    times = []
    for _ in range(LOOPS):
        args = make_args()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS):
            fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / CALLS)
        del args  # before the next loop's inputs are made: half the peak memory
    return statistics.median(times)


def copy_bandwidth():
    """The device's copy bandwidth in GB/s (bytes read plus written), as the ops are timed."""
    seconds = seconds_per_call(torch.Tensor.copy_, lambda: (torch.empty(COPY_ELEMENTS, device="cuda"),
                                                           torch.randn(COPY_ELEMENTS, device="cuda")))
    return 2 * COPY_ELEMENTS * 4 / seconds / 1e9


def row(case, n, dtype_name, seconds, copy_gbs):
    """The result of ``case`` at ``n`` elements of ``dtype_name``, from its ``seconds`` per call
    (``{"fused": ..., "eager": ...}``) and the copy bandwidth ``copy_gbs``."""
    nbytes = moved_bytes(case, n, DTYPES[dtype_name])
    result = {"op": case.name, "dtype": dtype_name, "elements": n, "bytes": nbytes}
    for variant, s in seconds.items():
        result.update({f"{variant}_seconds": s, f"{variant}_gbs": nbytes / s / 1e9,
                       f"{variant}_of_copy": nbytes / s / 1e9 / copy_gbs})
    result["time_ratio"] = seconds["fused"] / seconds["eager"]
    return result


def cells(r):
    return [r["op"], r["dtype"], f"2^{r['elements'].bit_length() - 1}", f"{r['bytes'] / 2**20:.0f}",
            f"{r['fused_seconds'] * 1e6:.0f}", f"{r['fused_gbs']:.0f}", f"{r['fused_of_copy']:.0%}",
            f"{r['eager_seconds'] * 1e6:.0f}", f"{r['eager_gbs']:.0f}", f"{r['eager_of_copy']:.0%}",
            f"{r['time_ratio']:.2f}"]


def header(meta):
    """The Markdown file's title and method, above the table."""
    return (f"# python -m bench kernels ({meta['device']}, {meta['date']})\n\n"
            f"Copy bandwidth {meta['copy_gbs']:.0f} GB/s (read + write: dst.copy_(src) on "
            f"{COPY_ELEMENTS * 4 // 2**20} MiB of fp32). Each time: median over {meta['loops']} loops of "
            f"{meta['calls']} calls between one pair of CUDA events. GB/s: the bytes the op reads plus writes, "
            f"per second; x eager: fused time over eager time.\n\n")


def save(rows, meta, out_dir):
    """Write kernels-cuda-DATE.json and .md into ``out_dir``; return a message."""
    markdown = header(meta) + report.markdown_table(COLUMNS, [cells(r) for r in rows]) + "\n"
    return report.write(os.path.join(out_dir, f"kernels-cuda-{meta['date']}"), meta, rows, markdown)


def main(out_dir):
    if not torch.cuda.is_available():
        print("python -m bench kernels: no CUDA device here; Triton's interpreter timings on CPU mean "
              "nothing, so there is nothing to measure.")
        return []
    device = torch.device("cuda")
    meta = report.meta(device, triton=triton.__version__, copy_gbs=copy_bandwidth(), calls=CALLS, loops=LOOPS,
                       samples=SAMPLES)
    print(header(meta) + report.markdown_table(COLUMNS, []), flush=True)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for case in CASES:
            fused, eager = outcomes(case, CHECK_ELEMENTS, dtype, device)
            torch.testing.assert_close(fused, eager, msg=lambda m: f"{case.name} {dtype_name}: fused and eager "
                                                                  f"differ: {m}")
            for n in SIZES:
                make_args = functools.partial(inputs, case, n, dtype, device)
                seconds = {variant: seconds_per_call(getattr(case, variant), make_args)
                           for variant in ("fused", "eager")}
                rows.append(row(case, n, dtype_name, seconds, meta["copy_gbs"]))
                print(report.markdown_row(cells(rows[-1])), flush=True)
            torch.cuda.empty_cache()
    print(save(rows, meta, out_dir))
    return rows
