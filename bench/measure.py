"""Peak memory and median time of one training step (forward, backward) per method.

Peak memory, one configuration at a time, after a warm-up step, by
:func:`revtriton.memory.peak_memory_bytes`. CUDA: ``torch.cuda.max_memory_allocated`` minus
what was allocated before the step. CPU: in a subprocess of its own (``python -m
bench.measure peak JSON``) with ``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors go back to
the operating system; the heap is trimmed (``malloc_trim``, so pages the warm-up freed are
not reused uncounted), the kernel's high-water mark is reset (``/proc/self/clear_refs``) and
the peak is ``VmHWM`` after the step minus ``VmRSS`` before.

Time, all methods of a workload together (on CPU in one subprocess, ``python -m
bench.measure times JSON``): after a warm-up step each, every round runs one step of each
method, in an order that rotates from round to round, and each method's figure is the median
over the rounds. A machine whose load drifts (a shared CPU) slows every method alike, so the
ratios to eager stay meaningful. On CPU, timing raises glibc's mmap threshold to 32 MiB and
its trim threshold to 1 GiB (``mallopt``) so that, as with a caching allocator, steps reuse
memory instead of faulting in fresh pages every time. For ``revtriton``, the time backward
spends in its read check (:func:`revtriton.replay.check_reads`, the graph walk that refuses a
tensor F or G read other than as an input) is summed per step: ``check_seconds``, the median
over the rounds.
"""
import contextlib
import ctypes
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from revtriton import replay
from revtriton.memory import peak_memory_bytes

from .workloads import build, peer_missing

CPU_METHOD = ("peak: VmHWM - VmRSS of a subprocess per configuration (malloc_trim and clear_refs after "
              "warm-up, MALLOC_MMAP_THRESHOLD_=65536); time: median over rounds that run one step of every "
              "method in turn, in one process, with glibc keeping freed memory")
CUDA_METHOD = ("peak: torch.cuda.max_memory_allocated minus allocated before the step; time: median over "
               "rounds that run one step of every method in turn")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc)


def stepper(workload, method, device):
    """A function running one training step of ``method`` on ``workload`` (built, not yet run)."""
    model, x, loss_fn, autocast = build(workload, method)
    model, x = model.to(device), x.to(device)
    autocast_ctx = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext

    def step():
        with autocast_ctx():
            loss = loss_fn(model(x.requires_grad_()))
        loss.backward()
        model.zero_grad(set_to_none=True)
        x.grad = None

    return step


def peak_bytes(workload, method, device):
    """``{"peak_bytes"}`` of one training step after a warm-up step, measured in this process."""
    return {"peak_bytes": peak_memory_bytes(stepper(workload, method, device), device)[1]}


@contextlib.contextmanager
def timed_read_checks(seconds):
    """Within the block, every read check of a chain's backward adds its time to ``seconds[0]``."""
    check = replay.check_reads

    def timed(*args):
        start = time.perf_counter()
        try:
            return check(*args)
        finally:
            seconds[0] += time.perf_counter() - start

    replay.check_reads = timed
    try:
        yield
    finally:
        replay.check_reads = check


def interleaved_seconds(makers, device, rounds, extra=None, keep_rounds=False):
    """``{name: {"seconds"} or {"error"}}``: ``makers`` maps a name to a function that builds
    the call to time. Each call runs once to warm up, then in every round once, in an order that
    rotates from round to round; a figure is the median over the rounds. ``extra(name)``, if
    given, returns None or ``(context, seconds)``: the call runs inside ``context``, which adds
    to ``seconds[0]``, reported as the median ``extra_seconds``. With ``keep_rounds``, each
    result also holds every round's time, in round order (``"rounds"``). One failure is its
    name's error."""
    calls, results = {}, {}
    for name, make in makers.items():
        try:
            calls[name] = make()
            calls[name]()  # warm-up
        except Exception as e:  # one method's failure is reported in its row
            calls.pop(name, None)
            results[name] = {"error": describe(e)}
    times, extras = {name: [] for name in calls}, {name: [] for name in calls}
    for r in range(rounds):
        order = list(calls)
        for name in order[r % len(order):] + order[: r % len(order)]:
            if name in results:
                continue
            context, seconds = (extra and extra(name)) or (contextlib.nullcontext(), None)
            try:
                with context:
                    t0 = _now(device)
                    calls[name]()
                    times[name].append(_now(device) - t0)
            except Exception as e:
                results[name] = {"error": describe(e)}
            if seconds is not None:
                extras[name].append(seconds[0])
    for name, ts in times.items():
        results.setdefault(name, {"seconds": statistics.median(ts)})
        if keep_rounds and "error" not in results[name]:
            results[name]["rounds"] = ts
        if extras[name] and "error" not in results[name]:
            results[name]["extra_seconds"] = statistics.median(extras[name])
    return {name: results[name] for name in makers}


def _read_check_timer(method):
    """For revtriton, a context that times the backward's read checks, and where it adds."""
    if method != "revtriton":
        return None
    seconds = [0.0]
    return timed_read_checks(seconds), seconds


def step_seconds(workload, methods, device, steps):
    """``{method: {"step_seconds"} (and "check_seconds" for revtriton) or {"error"}}``: medians
    over ``steps`` interleaved rounds."""
    results = interleaved_seconds({m: functools.partial(stepper, workload, m, device) for m in methods}, device,
                                  steps, _read_check_timer)
    names = {"seconds": "step_seconds", "extra_seconds": "check_seconds", "error": "error"}
    return {m: {names[k]: v for k, v in r.items()} for m, r in results.items()}


def describe(e):
    """An exception in one line: out-of-memory errors by their first line, others with their type."""
    if isinstance(e, torch.OutOfMemoryError):
        return f"out of memory: {str(e).splitlines()[0]}"
    return f"{type(e).__name__}: {e}"


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def in_subprocess(job, spec):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "bench.measure", job, json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(workload, methods, device, steps=5):
    """``{method: figures or {"error": ...}}`` for one workload: each method's peak memory,
    then the step times of those that ran, interleaved, over ``steps`` rounds (or the
    workload's own ``rounds`` if more). On CPU each measurement runs in a subprocess; on CUDA
    in this process."""
    steps = max(steps, workload.get("rounds", 0))
    rows = {}
    for method in methods:
        missing = peer_missing(method)
        if missing:
            rows[method] = {"error": missing}
        elif device.type == "cuda":
            try:
                rows[method] = peak_bytes(workload, method, device)
            except Exception as e:
                rows[method] = {"error": describe(e)}
            finally:
                torch.cuda.empty_cache()
        else:
            rows[method] = in_subprocess("peak", {"workload": workload, "method": method})
    timed = [m for m in methods if "error" not in rows[m]]
    if timed:
        spec = {"workload": workload, "methods": timed, "steps": steps}
        times = step_seconds(workload, timed, device, steps) if device.type == "cuda" else in_subprocess("times", spec)
        if "error" in times:  # the timing process itself failed
            times = {m: times for m in timed}
        for m in timed:
            rows[m] = {**rows[m], **times[m]} if "error" not in times[m] else times[m]
    return rows


if __name__ == "__main__":
    job, spec = sys.argv[1], json.loads(sys.argv[2])
    cpu = torch.device("cpu")
    if job == "peak":
        print(json.dumps(peak_bytes(spec["workload"], spec["method"], cpu)))
    elif job == "forward":
        from .inference import forward_seconds

        print(json.dumps(forward_seconds(spec["workload"], cpu, spec["rounds"])))
    else:
        libc = ctypes.CDLL(None)  # keep freed memory, as a caching allocator would
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        print(json.dumps(step_seconds(spec["workload"], spec["methods"], cpu, spec["steps"])))
