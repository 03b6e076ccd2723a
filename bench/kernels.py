"""``python -m bench kernels``: each fused op against its unfused eager PyTorch equivalent, in
GB/s (the bytes the op reads plus writes, per second) and as a fraction of the device's copy
bandwidth, measured the same way with ``dst.copy_(src)`` on 1 GiB fp32 buffers.

A time is the median over 3 loops of calls in a row between one pair of CUDA events,
divided by the calls: 50 at 2**24 elements, fewer at larger sizes (the same bytes a loop).
Each loop is queued behind a sleep kernel that keeps the device busy while the host
launches it, so the device time holds no launch gaps; the host's own time to queue a call
(Python, dispatch, checks, launch; no sync) is reported beside it. The calls rotate through
several sets of operands (:func:`working_sets`), enough that the bytes touched between two
uses of one set are at least twice the device's L2 cache: no call finds its operands left
in L2 by the previous ones. Each loop starts from fresh inputs, as the calls repeat in
place, and every operand must still be finite after it (checked, and reported per row):
log-scales of 0.1 of a standard normal, beta = 0.6 and, for momentum_inverse_backward
(which scales dv by -1 / (1 - beta) a call), beta = 0.2 keep 50 calls on one set finite.

The tensors are shaped ``(SAMPLES, n // SAMPLES)``, one row a sample of the per-sample
log-determinant (``ld``, ``ld_grad``: one fp32 value a sample). The eager equivalents
compute in fp32 as the kernels do (fp32 copies of bf16 operands where a bf16 intermediate
would round), so both give the same values: checked on the device before timing, and by
tests/test_bench.py on CPU through Triton's interpreter.

Results are written (JSON and Markdown) after every row, so a run stopped by a time limit
keeps what it measured. CUDA only; ``--preset tiny`` runs the same code on tiny tensors on
any device (on CPU a smoke test of the job, whose timings mean nothing).
"""
import dataclasses
import functools
import math
import os
import statistics
import time
from typing import Callable

import torch
import triton

import revtriton  # noqa: F401  (registers torch.ops.revtriton.*)

from . import report

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SAMPLES = 64
CHECK_ELEMENTS = SAMPLES * 1024  # where the device checks that fused and eager agree
CLAMP, BETA = 2.0, 0.6
BETA_GROWING = 0.2  # momentum_inverse_backward: dv *= -1 / (1 - beta) a call; 1.25**100 stays finite
PER_SAMPLE = ("ld", "ld_grad")
SCALE = {"s": 0.1}  # log-scales: exp(s_c) of 100 calls in a row stays finite
L2_FACTOR = 2  # the bytes touched between two uses of one operand set, in L2 sizes (at least)
MAX_DELAY = 0.1  # seconds: the longest sleep a loop is queued behind
COLUMNS = ("op", "dtype", "elements", "MiB moved", "sets", "calls", "fused µs", "host µs", "fused GB/s", "of copy",
           "eager µs", "host µs ", "eager GB/s", "of copy ", "x eager", "finite")
ops = torch.ops.revtriton


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What a run measures: tensor sizes (elements), the copy's size, calls a loop at the
    smallest size (fewer, down to a tenth, at larger ones: the same bytes a loop) and loops."""

    elements: tuple
    copy_elements: int
    calls: int
    loops: int

    def calls_for(self, n):
        return max(max(1, self.calls // 10), self.calls * self.elements[0] // n)


FULL = Sizes((2**24, 2**26, 2**28), 2**28, 50, 3)  # 64 MiB to 1 GiB per fp32 tensor
TINY = Sizes((SAMPLES * 256,), 2**16, 4, 2)  # the smoke run (--preset tiny)


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


def _affine_inverse_backward(x, dx, s, ds, ld_grad=None):
    th = (s.float() / CLAMP).tanh_()
    grad = dx.float() * x
    if ld_grad is not None:
        grad += ld_grad[:, None]
    torch.mul(x.float(), (th * CLAMP).exp_(), out=x)
    torch.mul(dx.float(), (th * -CLAMP).exp_(), out=dx)
    torch.mul(grad, th.mul_(th).sub_(1), out=ds)  # -grad * (1 - th**2)


def _momentum_inverse_backward(dx, fx, dv):
    dx_new = dx.float() + fx
    dx.copy_(dx_new)
    torch.sub(dv.float() / -(1 - BETA_GROWING), dx_new, out=dv)


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
    # the backward of the inverse (training through it)
    Case("affine_inverse_backward", ("x", "dx", "s", "ds"), ("x", "dx", "ds"),
         lambda x, dx, s, ds: ops.affine_inverse_backward(x, dx, s, ds, None, CLAMP), _affine_inverse_backward,
         ("ds",)),
    Case("affine_inverse_backward ld_grad", ("x", "dx", "s", "ds", "ld_grad"), ("x", "dx", "ds"),
         lambda x, dx, s, ds, ld_grad: ops.affine_inverse_backward(x, dx, s, ds, ld_grad, CLAMP),
         _affine_inverse_backward, ("ds",)),
    Case("momentum_inverse_backward", ("dx", "fx", "dv"), ("dx", "dv"),
         lambda dx, fx, dv: ops.momentum_inverse_backward(dx, fx, dv, BETA_GROWING), _momentum_inverse_backward),
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


def input_sets(case, n, dtype, device, sets):
    """``sets`` independent :func:`inputs` of ``case``: the operand sets a timed loop rotates through."""
    return [inputs(case, n, dtype, device) for _ in range(sets)]


def _nbytes(case, n, dtype, samples):
    return {name: samples * torch.float32.itemsize if name in PER_SAMPLE else n * dtype.itemsize
            for name in case.args}


def moved_bytes(case, n, dtype, samples=SAMPLES):
    """The bytes ``case``'s op reads plus writes on :func:`inputs` of ``n`` elements of ``dtype``."""
    size = _nbytes(case, n, dtype, samples)
    return sum(size[name] for name in case.reads) + sum(size[name] for name in case.writes)


def working_sets(set_bytes, l2_bytes):
    """How many sets of operands (``set_bytes`` each) a timed loop rotates through: enough that
    the calls between two uses of one set touch at least L2_FACTOR times the L2 cache
    (``l2_bytes``), so that no call finds its operands in L2; at least 2."""
    return max(2, 1 + math.ceil(L2_FACTOR * l2_bytes / set_bytes))


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


class Clock:
    """Times loops of calls. On CUDA: the device time between two events, the loop queued
    behind a sleep kernel that keeps the device busy while the host launches it (launch gaps
    never count as device time), and the host's time to queue the loop, without a sync. On
    CPU (the smoke run): host time for both."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.cycles_per_second = self._calibrate() if self.cuda else 0.0

    @staticmethod
    def _calibrate(cycles=10**7):
        """The sleep kernel's cycles per second of device time."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)  # warm-up
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / (start.elapsed_time(end) / 1e3)

    def loop(self, fn, sets, calls, delay=0.0):
        """``(device seconds, host seconds)`` of ``calls`` calls of ``fn``, on ``sets`` of
        arguments in turn, the device first kept busy for ``delay`` seconds."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(int(delay * self.cycles_per_second))
            start.record()
        t0 = time.perf_counter()
        for i in range(calls):
            fn(*sets[i % len(sets)])
        host = time.perf_counter() - t0
        if not self.cuda:
            return host, host
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, host


def timed(fn, make_sets, calls, loops, clock):
    """``{"seconds", "host_seconds", "queued", "finite"}`` of one call of ``fn``: medians over
    ``loops`` loops of ``calls`` calls, each loop on fresh ``make_sets()`` (the calls repeat in
    place), after one call (compilation, caches) and an untimed loop whose host time sizes the
    sleep the timed ones are queued behind. ``queued``: the host queued every timed loop
    before the device reached it; ``finite``: every operand was finite after every loop."""
    sets = make_sets()
    fn(*sets[0])
    _, host = clock.loop(fn, sets, calls)
    delay = min(MAX_DELAY, 2 * host)
    device_times, host_times, queued, finite = [], [], True, True
    for _ in range(loops):
        del sets  # before the next loop's inputs are made: half the peak memory
        sets = make_sets()
        seconds, host = clock.loop(fn, sets, calls, delay)
        device_times.append(seconds / calls)
        host_times.append(host / calls)
        queued = queued and (host < delay or not clock.cuda)
        finite = finite and all(bool(t.isfinite().all()) for args in sets for t in args)
    return {"seconds": statistics.median(device_times), "host_seconds": statistics.median(host_times),
            "queued": queued, "finite": finite}


def l2_bytes(device):
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0


def copy_bandwidth(device, sizes, clock):
    """The device's copy bandwidth in GB/s (bytes read plus written), timed as the ops are."""
    n = sizes.copy_elements
    sets = working_sets(2 * n * 4, l2_bytes(device))
    result = timed(torch.Tensor.copy_, lambda: [(torch.empty(n, device=device), torch.randn(n, device=device))
                                                for _ in range(sets)], sizes.calls_for(n), sizes.loops, clock)
    return 2 * n * 4 / result["seconds"] / 1e9


def row(case, n, dtype_name, results, copy_gbs, sets, calls):
    """The result of ``case`` at ``n`` elements of ``dtype_name``, from :func:`timed`'s
    ``results`` (``{"fused": ..., "eager": ...}``), the copy bandwidth ``copy_gbs`` and the
    ``sets`` and ``calls`` a loop used."""
    nbytes = moved_bytes(case, n, DTYPES[dtype_name])
    result = {"op": case.name, "dtype": dtype_name, "elements": n, "bytes": nbytes, "sets": sets, "calls": calls}
    for variant, r in results.items():
        result.update({f"{variant}_seconds": r["seconds"], f"{variant}_host_seconds": r["host_seconds"],
                       f"{variant}_queued": r["queued"], f"{variant}_finite": r["finite"],
                       f"{variant}_gbs": nbytes / r["seconds"] / 1e9,
                       f"{variant}_of_copy": nbytes / r["seconds"] / 1e9 / copy_gbs})
    result["time_ratio"] = results["fused"]["seconds"] / results["eager"]["seconds"]
    return result


def cells(r):
    def us(variant):  # *: the device reached the loop before the host had queued it
        return f"{r[variant + '_seconds'] * 1e6:.0f}" + ("" if r[variant + "_queued"] else "*")

    finite = r["fused_finite"] and r["eager_finite"]
    return [r["op"], r["dtype"], f"2^{r['elements'].bit_length() - 1}", f"{r['bytes'] / 2**20:.0f}", r["sets"],
            r["calls"], us("fused"), f"{r['fused_host_seconds'] * 1e6:.1f}", f"{r['fused_gbs']:.0f}",
            f"{r['fused_of_copy']:.0%}", us("eager"), f"{r['eager_host_seconds'] * 1e6:.1f}",
            f"{r['eager_gbs']:.0f}", f"{r['eager_of_copy']:.0%}", f"{r['time_ratio']:.2f}",
            "yes" if finite else "NO"]


def header(meta):
    """The Markdown file's title and method, above the table."""
    timer = ("between one pair of CUDA events, queued behind a sleep kernel so that launches leave no gaps (`*`: "
             "the device caught up with the host anyway)" if meta["kind"] == "cuda" else
             "on the host's clock (a smoke run on CPU: the timings mean nothing)")
    return (f"# python -m bench kernels ({meta['device']}, {meta['date']})\n\n"
            f"Copy bandwidth {meta['copy_gbs']:.0f} GB/s (read + write: dst.copy_(src) on "
            f"{meta['copy_elements'] * 4 / 2**20:g} MiB of fp32). Each time: median over {meta['loops']} loops of "
            f"`calls` calls {timer}, rotating through `sets` sets of operands (L2: {meta['l2_bytes'] / 2**20:g} "
            f"MiB); host µs: the host's time to queue one call, without a sync. GB/s: the bytes the op reads plus "
            f"writes, per second; x eager: fused time over eager time; finite: every operand finite after every "
            f"loop.\n\n")


def save(rows, meta, out_dir):
    """Write kernels-DEVICE-DATE.json and .md into ``out_dir`` (DEVICE: cuda, or cpu for the
    smoke run); return a message."""
    markdown = header(meta) + report.markdown_table(COLUMNS, [cells(r) for r in rows]) + "\n"
    return report.write(os.path.join(out_dir, f"kernels-{meta['kind']}-{meta['date']}"), meta, rows, markdown)


def main(out_dir, tiny=False):
    """Measure every case at every size of FULL (TINY with ``tiny``), writing the results after
    each row; return the rows. On CPU only the tiny smoke run measures."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not tiny:
        print("python -m bench kernels: no CUDA device here; Triton's interpreter timings on CPU mean "
              "nothing, so there is nothing to measure (--preset tiny runs a smoke test of the job).")
        return []
    sizes = TINY if tiny else FULL
    clock = Clock(device)
    meta = report.meta(device, kind=device.type, triton=triton.__version__, loops=sizes.loops,
                       copy_elements=sizes.copy_elements, l2_bytes=l2_bytes(device), samples=SAMPLES)
    meta["copy_gbs"] = copy_bandwidth(device, sizes, clock)
    print(header(meta) + report.markdown_table(COLUMNS, []), flush=True)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for case in CASES:
            fused, eager = outcomes(case, CHECK_ELEMENTS, dtype, device)
            torch.testing.assert_close(fused, eager, msg=lambda m: f"{case.name} {dtype_name}: fused and eager "
                                                                  f"differ: {m}")
            for n in sizes.elements:
                sets = working_sets(sum(_nbytes(case, n, dtype, SAMPLES).values()), meta["l2_bytes"])
                make_sets = functools.partial(input_sets, case, n, dtype, device, sets)
                calls = sizes.calls_for(n)
                results = {variant: timed(getattr(case, variant), make_sets, calls, sizes.loops, clock)
                           for variant in ("fused", "eager")}
                rows.append(row(case, n, dtype_name, results, meta["copy_gbs"], sets, calls))
                save(rows, meta, out_dir)  # after every row: a time limit keeps what was measured
                print(report.markdown_row(cells(rows[-1])), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(save(rows, meta, out_dir))
    return rows
