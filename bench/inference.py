"""The inference rows of ``python -m bench``: a forward without grad, in eval mode, of the eager
twin (``eager``), of the reversible model (``revtriton``: forward only, nothing kept) and of the
reversible model compiled whole (``compiled``: ``torch.compile(model, fullgraph=True)``, the
coupling ops in the graph), timed in interleaved rounds like the training steps. The first
call, which compiles, is the warm-up and is not timed.
"""
import contextlib

import torch

from .measure import interleaved_seconds
from .workloads import as_method, build_reversible

METHODS = ("eager", "revtriton", "compiled")


def workloads(sweep, refs):
    """The workloads timed for inference: the sweep's chain of depth 16 (or its deepest below)
    and the transformer."""
    chains = [w for w in sweep if w["kind"] == "chain" and w["depth"] <= 16]
    return [max(chains, key=lambda w: w["depth"])] + [w for w in refs if w["kind"] == "transformer"]


def forward(workload, method, device):
    """A function running one forward of ``workload``'s model by ``method`` without grad."""
    model, x, _, autocast = build_reversible(workload)
    model, x = model.to(device).eval(), x.to(device)
    if method == "eager":
        model = as_method(model, "eager")
    elif method == "compiled":
        model = torch.compile(model, fullgraph=True)
    autocast_ctx = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext

    def run():
        with torch.no_grad(), autocast_ctx():
            model(x)

    return run


def forward_seconds(workload, device, rounds):
    """``{method: {"forward_seconds"} or {"error"}}``: medians over ``rounds`` interleaved rounds."""
    results = interleaved_seconds({m: lambda m=m: forward(workload, m, device) for m in METHODS}, device, rounds)
    return {m: {"forward_seconds" if k == "seconds" else k: v for k, v in r.items()} for m, r in results.items()}
