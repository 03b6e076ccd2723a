"""FSDP2 units inside a reversible chain on a GPU (issue 16): one process, NCCL, world size 1.

In a subprocess of its own (a process group must not outlive the test): a parameter-heavy
chain wrapped around the chain and per block, each after a warm-up step; each wrapping's
gradients must equal an unwrapped model's, and per-block units must peak lower
(``torch.cuda.max_memory_allocated``) than one unit around the chain, since only one block's
parameters and gradients are gathered at a time instead of the chain's.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cuda

DEPTH, WIDTH, TOKENS = 8, 1024, 16


def probe():
    """Run in the subprocess: print ``{wrapping: {"peak_bytes", "max_rel_err"}}`` as JSON."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    import revtriton as rt

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    device = torch.device("cuda", 0)

    def mlp(d):
        return nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def model():
        torch.manual_seed(0)
        half = WIDTH // 2
        return nn.Sequential(nn.Linear(WIDTH, WIDTH), rt.ReversibleSequential(
            *[rt.ReversibleBlock(mlp(half), mlp(half), dim=-1) for _ in range(DEPTH)])).to(device)

    x = torch.randn(TOKENS, WIDTH, device=device, generator=torch.Generator(device).manual_seed(1))
    reference = model()
    reference(x).square().mean().backward()
    expected = {n: p.grad for n, p in reference.named_parameters()}
    del reference
    results = {}
    try:
        for wrapping, units in (("chain", lambda m: [m[1]]), ("per block", lambda m: list(m[1]))):
            wrapped = model()
            for unit in units(wrapped):
                fully_shard(unit)
            fully_shard(wrapped)

            def step():
                wrapped.zero_grad(set_to_none=True)
                wrapped(x).square().mean().backward()

            step()  # warm-up: lazy initialisation, the first gathers
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device) - before
            errs = []
            for name, p in wrapped.named_parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                errs.append(((g.double() - expected[name].double()).norm() / expected[name].double().norm()).item())
            results[wrapping] = {"peak_bytes": peak, "max_rel_err": max(errs), "params": len(errs)}
            del wrapped, step
            torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    print(json.dumps(results))


@pytest.fixture(scope="module")
def results():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("wrapping", ["chain", "per block"])
def test_fsdp2_on_cuda_gives_single_process_gradients(results, wrapping):
    res = results[wrapping]
    assert res["params"] == 2 + 4 * 2 * DEPTH
    assert res["max_rel_err"] <= 1e-5, res


def test_fsdp2_per_block_units_peak_below_one_unit_around_the_chain(results):
    """Per block, the step gathers one block's parameters (and holds its gradients) at a time:
    about 2/DEPTH of the chain's parameters and gradients, which one unit around the chain gathers
    at once. Half the chain-wide peak leaves room for activations and allocator rounding."""
    chain, per_block = results["chain"]["peak_bytes"], results["per block"]["peak_bytes"]
    assert per_block < 0.5 * chain, results


if __name__ == "__main__":
    probe()
