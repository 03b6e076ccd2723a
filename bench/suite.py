"""The default job: every workload of a preset by every method, one row each; or, with
``--build-only``, every workload's model and input for every method built and described."""
import os

import torch

from . import inference, report
from .measure import CPU_METHOD, CUDA_METHOD, describe, in_subprocess, run
from .workloads import build_reversible, by_method, label, methods_for, peer_missing, suite


def plan(preset, peers):
    """``(workload, methods)`` for each workload of ``preset``, the depth sweep first."""
    sweep, refs = suite(preset)
    return [(workload, methods_for(workload, peers)) for workload in sweep + refs]


def main(preset, peers, out_dir, steps):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = report.meta(device, preset=preset, memory_method=CUDA_METHOD if device.type == "cuda" else CPU_METHOD)
    print(f"python -m bench: preset {preset} on {meta['device']}\nmemory: {meta['memory_method']}")
    rows = []
    for workload, methods in plan(preset, peers):
        print(f"  {label(workload)}: {', '.join(methods)} ...", flush=True)
        for method, result in run(workload, methods, device, steps).items():
            print(f"    {method}: " + (result.get("error") or
                  f"{result['peak_bytes'] / 2**20:.1f} MiB, {result['step_seconds'] * 1e3:.1f} ms"
                  + (f" (read check {result['check_seconds'] * 1e3:.2f} ms)" if "check_seconds" in result else "")),
                  flush=True)
            rows.append({"workload": label(workload), "method": method, **workload, **result})
    report.add_ratios(rows)
    forwards = inference_rows(preset, device, steps)
    print()
    print(report.table(rows))
    print("\n".join(["backward's read check:"] + report.read_checks(rows)))
    print(f"\ninference (no grad, eval mode):\n{report.inference_table(forwards)}")
    name = f"{device.type}-{preset}{'-peers' if peers else ''}-{meta['date']}"
    for line in report.save(rows, meta, os.path.join(out_dir, name), forwards):
        print(line)
    return rows, forwards


def inference_rows(preset, device, rounds):
    """One row per inference workload and method (:mod:`bench.inference`), with its time as a
    ratio to eager's."""
    rows = []
    for workload in inference.workloads(*suite(preset)):
        print(f"  {label(workload)}, inference: {', '.join(inference.METHODS)} ...", flush=True)
        spec = {"workload": workload, "rounds": rounds}
        times = in_subprocess("forward", spec) if device.type == "cpu" else \
            inference.forward_seconds(workload, device, rounds)
        if "error" in times:  # the timing process itself failed
            times = {m: times for m in inference.METHODS}
        for method, result in times.items():
            print(f"    {method}: " + (result.get("error") or f"{result['forward_seconds'] * 1e3:.1f} ms"), flush=True)
            rows.append({"workload": label(workload), "method": method, **workload, **result})
    eager = {r["workload"]: r for r in rows if r["method"] == "eager" and "error" not in r}
    for r in rows:
        if r["workload"] in eager and "error" not in r:
            r["time_ratio"] = r["forward_seconds"] / eager[r["workload"]]["forward_seconds"]
    return rows


def build_only(preset, peers):
    """Build every workload's model and input for every method, without running a step, and
    print a line for each: its parameter count and input shape, or FAILED and why. Each
    workload's model is built once and switched from method to method (as_method sets every
    chain's mode whatever it was before). Returns how many (workload, method) failed."""
    failures = 0
    for workload, methods in plan(preset, peers):
        try:
            model, x = build_reversible(workload)[:2]
            results = [(method, *_built(workload, model, x, method)) for method in methods]
        except Exception as e:  # the workload's model or input
            results = [(method, False, describe(e)) for method in methods]
        for method, ok, text in results:
            failures += not ok
            print(f"{label(workload)}  {method}: {text if ok else 'FAILED ' + text}", flush=True)
    return failures


def _built(workload, model, x, method):
    """``(True, parameter count and input shape)`` of ``model`` run by ``method``, or ``(False, why not)``."""
    missing = peer_missing(method)
    if missing:
        return False, missing
    try:
        params = sum(p.numel() for p in by_method(workload, model, method).parameters())
    except Exception as e:
        return False, describe(e)
    return True, f"{params:,} parameters, input {tuple(x.shape)}"
