"""Peak memory and median time of one training step (forward, backward) of one configuration.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
allocated before the step; time between synchronisations. CPU: run as ``python -m
bench.measure JSON`` in a subprocess of its own with ``MALLOC_MMAP_THRESHOLD_=65536``, so
freed tensors go back to the operating system; after a warm-up step the kernel's high-water
mark is reset (``/proc/self/clear_refs``) and the peak is ``VmHWM`` after the step minus
``VmRSS`` before. Timing then raises the mmap threshold to 32 MiB and the trim threshold
to 1 GiB (``mallopt``), so that, as with a caching allocator, steps reuse memory instead of
faulting in fresh pages every time.
"""
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .workloads import build, peer_missing

CPU_METHOD = ("peak: VmHWM - VmRSS of a subprocess per configuration (clear_refs after warm-up, "
              "MALLOC_MMAP_THRESHOLD_=65536); time: median of steps with glibc keeping freed memory")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc)
CUDA_METHOD = "peak: torch.cuda.max_memory_allocated minus allocated before the step; time: median of steps"


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(workload, method, device, steps=5):
    """``{"peak_bytes", "step_seconds"}`` of one training step, measured in this process."""
    model, x, loss_fn, autocast = build(workload, method)
    model, x = model.to(device), x.to(device)
    autocast_ctx = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext

    def step():
        with autocast_ctx():
            loss = loss_fn(model(x.requires_grad_()))
        loss.backward()
        model.zero_grad(set_to_none=True)
        x.grad = None

    step()  # warm-up: lazy initialisation, allocator caches
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        step()
        peak = (_status_kib("VmHWM") - before) * 1024
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    times = []
    for _ in range(steps):
        t0 = _now(device)
        step()
        times.append(_now(device) - t0)
    return {"peak_bytes": peak, "step_seconds": statistics.median(times)}


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def run(workload, method, device, steps=5):
    """One row's figures, or ``{"error": ...}``: in a subprocess on CPU, in-process on CUDA."""
    missing = peer_missing(method)
    if missing:
        return {"error": missing}
    if device.type == "cuda":
        try:
            return measure(workload, method, device, steps)
        except torch.OutOfMemoryError as e:
            return {"error": f"out of memory: {str(e).splitlines()[0]}"}
        except Exception as e:  # one configuration's failure is reported in its row
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            torch.cuda.empty_cache()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRITON_INTERPRET="0")
    spec = json.dumps({"workload": workload, "method": method, "steps": steps})
    proc = subprocess.run([sys.executable, "-m", "bench.measure", spec], env=env, capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure(spec["workload"], spec["method"], torch.device("cpu"), spec["steps"])))
