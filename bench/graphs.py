"""``python -m bench graphs``: a training step captured in a CUDA graph and replayed, against the
same step run as usual, for the eager twin and the reversible model (issue 18).

A captured step is whole-network capture as PyTorch's CUDA graphs notes describe it: warm-up
steps on a side stream, a static input, gradients set to None before capture (the capture
allocates them and every replay writes them), no optimizer; a replay is one step. The chains
run with ``preserve_rng_state=False``, uncaptured too (like with like): with the default, the
forward reads the CUDA RNG state, which capture forbids, and the chain refuses capture. Times are medians over interleaved rounds (:mod:`bench.measure`), each
step synchronised. Workloads: the suite's host-bound overhead chain, where replaying one graph
instead of launching kernel by kernel matters most, and the GPU preset's depth-16 sweeps.

CUDA only; ``--build-only`` builds every model on CPU (the GPU script's dry run).
"""
import contextlib
import os

import torch

from . import report
from .measure import describe, interleaved_seconds
from .workloads import build, chains, label

WARMUP = 3
WORKLOADS = (dict(kind="overhead", width=8, depth=64, batch=4, rounds=20),
             dict(kind="chain", depth=16, batch=64, channels=64, size=32),
             dict(kind="affine", depth=16, batch=64, channels=64, size=32))
# name: (method, captured, preserve_rng_state)
VARIANTS = {"eager": ("eager", False, False), "eager captured": ("eager", True, False),
            "revtriton": ("revtriton", False, False), "revtriton captured": ("revtriton", True, False)}
COLUMNS = ("workload", "variant", "step ms", "x uncaptured", "µs per block")


def model_step(workload, method, preserve_rng_state, device):
    """``(model, x, step)``: ``workload`` built for ``method``, and one training step of it
    (forward and backward, gradients left in place)."""
    model, x, loss_fn, autocast = build(workload, method)
    model, x = model.to(device), x.to(device).requires_grad_()
    for chain in chains(model):
        chain.preserve_rng_state = preserve_rng_state

    def step():
        with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            loss = loss_fn(model(x))
        loss.backward()

    return model, x, step


def clear(model, x):
    model.zero_grad(set_to_none=True)
    x.grad = None


def captured(model, x, step):
    """``step`` captured in a CUDA graph after WARMUP steps on a side stream; returns the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            clear(model, x)
            step()
    torch.cuda.current_stream().wait_stream(side)
    clear(model, x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def maker(workload, variant, device):
    """A function that builds ``variant``'s step on ``workload`` and returns the call to time."""
    method, capture, preserve_rng_state = VARIANTS[variant]

    def make():
        model, x, step = model_step(workload, method, preserve_rng_state, device)
        if capture:
            return captured(model, x, step).replay

        def uncaptured():
            clear(model, x)
            step()

        return uncaptured

    return make


def rows_of(workload, times):
    """The rows of one workload from ``{variant: {"seconds"} or {"error"}}``, each captured
    variant's time also as a ratio to its method's uncaptured time."""
    rows = []
    for variant, result in times.items():
        method, capture, preserve_rng_state = VARIANTS[variant]
        r = {"workload": label(workload), "variant": variant, "method": method, "captured": capture,
             "preserve_rng_state": preserve_rng_state, **workload}
        if "error" in result:
            r["error"] = result["error"]
        else:
            r["step_seconds"] = result["seconds"]
            base = times.get(method, {})
            if "seconds" in base:
                r["time_ratio"] = result["seconds"] / base["seconds"]
        rows.append(r)
    return rows


def cells(r):
    if "error" in r:
        return [r["workload"], r["variant"], f"error: {r['error']}", "", ""]
    per_block = f"{r['step_seconds'] / r['depth'] * 1e6:.0f}" if r["kind"] == "overhead" else ""
    return [r["workload"], r["variant"], f"{r['step_seconds'] * 1e3:.3f}", f"{r.get('time_ratio', float('nan')):.2f}",
            per_block]


def save(rows, meta, out_dir):
    """Write graphs-DEVICE-DATE.json and .md into ``out_dir``; return a message."""
    markdown = (f"# python -m bench graphs ({meta['device']}, {meta['date']})\n\nA training step (forward and "
                f"backward, no optimizer) captured in a CUDA graph and replayed, against the same step run "
                f"uncaptured; chains with preserve_rng_state=False. Median over interleaved rounds, each step "
                f"synchronised; x uncaptured: the time over the same method's uncaptured time.\n\n"
                + report.markdown_table(COLUMNS, [cells(r) for r in rows]) + "\n")
    return report.write(os.path.join(out_dir, f"graphs-{meta['kind']}-{meta['date']}"), meta, rows, markdown)


def main(out_dir, rounds):
    """Time every variant of every workload, writing the results after each workload."""
    if not torch.cuda.is_available():
        print("python -m bench graphs: no CUDA device here, so no CUDA graph to capture (--build-only builds the "
              "models on CPU).")
        return []
    device = torch.device("cuda")
    meta = report.meta(device, kind=device.type, warmup=WARMUP)
    rows = []
    for workload in WORKLOADS:
        print(f"  {label(workload)}: {', '.join(VARIANTS)} ...", flush=True)
        makers = {variant: maker(workload, variant, device) for variant in VARIANTS}
        rows += rows_of(workload, interleaved_seconds(makers, device, max(rounds, workload.get("rounds", 0))))
        save(rows, meta, out_dir)  # after every workload: a time limit keeps what was measured
        torch.cuda.empty_cache()
    print(report.text_table(COLUMNS, [cells(r) for r in rows]))
    print(save(rows, meta, out_dir))
    return rows


def build_only():
    """Build every workload's model and step for every variant on CPU, without running it, and
    print a line each; return how many failed."""
    failures = 0
    for workload in WORKLOADS:
        for variant, (method, _, preserve_rng_state) in VARIANTS.items():
            try:
                model, x, _ = model_step(workload, method, preserve_rng_state, torch.device("cpu"))
                text = f"{sum(p.numel() for p in model.parameters()):,} parameters, input {tuple(x.shape)}"
            except Exception as e:
                failures += 1
                text = f"FAILED {describe(e)}"
            print(f"{label(workload)}  {variant}: {text}", flush=True)
    return failures
