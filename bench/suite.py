"""The default job: every workload of a preset by every method, one row each."""
import datetime
import os
import platform

import torch

from . import report
from .measure import CPU_METHOD, CUDA_METHOD, run
from .workloads import label, methods_for, suite


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(preset, peers, out_dir, steps):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"device": device_name(device), "date": datetime.date.today().isoformat(), "preset": preset,
            "torch": torch.__version__, "memory_method": CUDA_METHOD if device.type == "cuda" else CPU_METHOD}
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
    os.makedirs(out_dir, exist_ok=True)
    name = f"{'cuda' if device.type == 'cuda' else 'cpu'}-{preset}{'-peers' if peers else ''}-{meta['date']}"
    stem = os.path.join(out_dir, name)
    for line in report.save(rows, meta, stem):
        print(line)
    return rows
