"""The default job: every workload of a preset by every method, one row each."""
import os

import torch

from . import report
from .measure import CPU_METHOD, CUDA_METHOD, run
from .workloads import label, methods_for, suite


def main(preset, peers, out_dir, steps):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = report.meta(device, preset=preset, memory_method=CUDA_METHOD if device.type == "cuda" else CPU_METHOD)
    print(f"python -m bench: preset {preset} on {meta['device']}\nmemory: {meta['memory_method']}")
    sweep, refs = suite(preset)
    rows = []
    for workload in sweep + refs:
        methods = methods_for(workload, peers)
        print(f"  {label(workload)}: {', '.join(methods)} ...", flush=True)
        for method, result in run(workload, methods, device, steps).items():
            print(f"    {method}: " + (result.get("error") or
                  f"{result['peak_bytes'] / 2**20:.1f} MiB, {result['step_seconds'] * 1e3:.1f} ms"), flush=True)
            rows.append({"workload": label(workload), "method": method, **workload, **result})
    report.add_ratios(rows)
    print()
    print(report.table(rows))
    name = f"{device.type}-{preset}{'-peers' if peers else ''}-{meta['date']}"
    for line in report.save(rows, meta, os.path.join(out_dir, name)):
        print(line)
    return rows
