"""``python -m bench host``: the host time of one call of each ``torch.ops.revtriton`` op, on this
CPU, beside torch's own ``add_``.

Where F and G are small, a chain's step is bound by host time: a chain makes about 4 op calls per
block and step, and an H200 moves 2**20 half-precision elements in ~3 µs, so launches below
~2**22 elements cost more host time than device time. This job measures that host time without
a GPU.

What runs for real: the whole op call as the CUDA dispatch key runs it (the op is called with
``OpOverload.redispatch`` on the CUDA dispatch key, so torch's dispatcher calls the op's CUDA
kernel: its checks, version-counter bumps, the launcher's layout, tiling and cache, Triton's
``JITFunction.run`` where it is called, argument specialisation and the compiled kernel's ``run``
with the full argument list). Kernels are compiled for real, for CUDA sm_90 (the H200), on this
CPU: the kernels are plain ``JITFunction`` s (``TRITON_INTERPRET`` must be unset or 0).

What is stubbed: Triton's active driver is replaced (``triton.runtime.driver.set_active``) by one
that reports device 0, stream 0 and an sm_90 target, loads no module (``utils.load_binary``
returns placeholders) and whose ``launcher_cls`` is a Python no-op. That launcher stands for the
driver's compiled C launcher (``CudaLauncher``: it parses the arguments, reads each tensor's
``data_ptr()`` and calls ``cuLaunchKernelEx``); its cost is not measured here, nor is torch's
``torch.cuda.device`` switch (the tensors are CPU tensors: on a GPU a launch on a device that is
not the current one also switches device). ``stub launcher alone`` is the floor: one call of
the stub with a full argument list, the cost of the Python call itself.

Rows ``... (chain)``: the same op as the blocks call it, :class:`revtriton.ops.ChainOp` (no
dispatcher, none of the op's argument checks: the chain checks its operands itself), with its CPU
kernel swapped for the CUDA launcher so that these CPU tensors take the path CUDA tensors take.

Each figure: the median over ROUNDS interleaved rounds (every round runs CALLS calls of each
row, in an order that rotates from round to round) of the time per call, with the spread of the
rounds (the 10th to 90th percentile). ``add_``: ``a.add_(b)`` on the same 512-element fp32 tensors,
torch's own dispatch plus its (small) CPU arithmetic.
"""
import contextlib
import copy
import os
import statistics

import torch

from . import report
from .measure import interleaved_seconds

SHAPE = (8, 64)  # the tensors of every op: 512 elements (8 samples)
CLAMP, BETA = 2.0, 0.6
CALLS, ROUNDS = 200, 41
COLUMNS = ("call", "median µs", "p10 µs", "p90 µs", "x add_")


class _Launcher:
    """Stands for the driver's compiled launcher: takes the arguments, launches nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        pass


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return object(), 0, 32, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def unload_module(self, module):
        pass


class StubDriver:
    """A Triton driver for an sm_90 device that launches nothing (see the module docstring)."""

    launcher_cls = _Launcher

    def __init__(self):
        self.utils = _Utils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@contextlib.contextmanager
def stub_driver():
    """Within the block, Triton compiles for sm_90 and launches nothing."""
    from triton.runtime import driver

    previous = driver._active
    driver.set_active(StubDriver())
    try:
        yield
    finally:
        driver._active = previous


def calls():
    """``{name: (op, args)}``: each op with tensors of SHAPE as the schema asks (per-sample
    operands: one value per sample, or None without ``ld`` in the name) and its scalar."""
    from .kernels import CASES, PER_SAMPLE

    found = {}
    for case in CASES:
        op = getattr(torch.ops.revtriton, case.name.split()[0]).default
        args = []
        for arg in op._schema.arguments:
            if arg.name in case.args:
                shape = SHAPE[:1] if arg.name in PER_SAMPLE else SHAPE
                args.append(torch.randn(shape) * (0.1 if arg.name == "s" else 1))
            elif arg.type.kind() == "OptionalType":
                args.append(None)
            else:
                args.append(CLAMP if case.name.startswith("affine") else BETA)
        found[case.name] = op, args
    return found


def _looped(fn, n):
    def run():
        for _ in range(n):
            fn()
    return run


def makers(n):
    """``{name: maker}`` for :func:`bench.measure.interleaved_seconds`: each maker returns a
    function making ``n`` calls."""
    from revtriton import ops

    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    found = {}
    for name, (op, args) in calls().items():
        def make(op=op, args=args):
            redispatch = op.redispatch
            return _looped(lambda: redispatch(cuda, *args), n)
        found[name] = make
    for name, (op, args) in calls().items():  # as the blocks call them: ops.ChainOp's path to the launcher
        chain_op = copy.copy(getattr(ops.on_stream, op.name().split("::")[1]))
        chain_op.cpu = chain_op.cuda  # its CPU tensors take the CUDA launcher, as CUDA tensors would
        found[f"{name} (chain)"] = lambda chain_op=chain_op, args=args: _looped(lambda: chain_op(*args), n)
    a, b = torch.randn(SHAPE), torch.randn(SHAPE)
    found["add_"] = lambda: _looped(lambda: a.add_(b), n)
    stub = _Launcher(None, None)
    stub_args = (1, 1, 1, 0, 0, None, None, None, None, a, b, 64, 64, 8, 64, 1.0, None, 8, 64)
    found["stub launcher alone"] = lambda: _looped(lambda: stub(*stub_args), n)
    return found


def measure(calls_per_round=CALLS, rounds=ROUNDS):
    """``[{"call", "median_us", "p10_us", "p90_us", "ratio"}]``, one row per op, then add_ and
    the stub launcher alone."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("python -m bench host times the compiled kernels' launch path: unset TRITON_INTERPRET")
    import revtriton  # noqa: F401  (registers torch.ops.revtriton.*)

    with stub_driver(), torch.no_grad():
        results = interleaved_seconds(makers(calls_per_round), torch.device("cpu"), rounds, keep_rounds=True)
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append({"call": name, "error": r["error"]})
            continue
        us = sorted(t / calls_per_round * 1e6 for t in r["rounds"])
        deciles = statistics.quantiles(us, n=10) if len(us) > 1 else us * 9
        rows.append({"call": name, "median_us": statistics.median(us), "p10_us": deciles[0], "p90_us": deciles[-1]})
    add = next(r for r in rows if r["call"] == "add_")
    for r in rows:
        if "error" not in r:
            r["ratio"] = r["median_us"] / add["median_us"]
    return rows


def cells(r):
    if "error" in r:
        return [r["call"], f"error: {r['error']}", "", "", ""]
    return [r["call"], f"{r['median_us']:.2f}", f"{r['p10_us']:.2f}", f"{r['p90_us']:.2f}", f"{r['ratio']:.1f}"]


def header(meta):
    return (f"# python -m bench host, {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
            f"{meta['date']}\n\nHost µs per call of each op with the driver's launcher stubbed (compiled for sm_90 "
            f"on this CPU; see bench/host.py for what runs and what is stubbed), beside torch's `add_` on "
            f"{SHAPE[0] * SHAPE[1]} fp32 elements. Median and 10th/90th percentiles over {meta['rounds']} "
            f"interleaved rounds of {meta['calls']} calls each.\n\n")


def main(out_dir, calls_per_round=CALLS, rounds=ROUNDS):
    import triton

    rows = measure(calls_per_round, rounds)
    meta = report.meta(torch.device("cpu"), triton=triton.__version__, calls=calls_per_round, rounds=rounds)
    markdown = header(meta) + report.markdown_table(COLUMNS, [cells(r) for r in rows]) + "\n"
    print(markdown)
    print(report.write(os.path.join(out_dir, f"host-cpu-{meta['date']}"), meta, rows, markdown))
    return rows
