"""Train a 2-D flow by reverse KL toward an unnormalised density: ``python examples/reverse_kl_flow.py``.

Reverse-KL training (Boltzmann generators, variational inference) has no data, only an energy
U(x) whose density exp(-U) is known up to its normaliser Z. The flow runs backwards: draw
z ~ N(0, I) and map it to x = flow.inverse(z), whose density is log q(x) = log N(z) -
log|det dx/dz|. ``flow.inverse_and_log_det(z)`` returns both x and log|det dx/dz|, with their
gradients, at the memory cost of the forward: the chain keeps only x, and its backward runs
the blocks forward again. The loss KL(q || p) = E[log q(x) + U(x)] + log Z falls toward 0.

The target is a ring of radius 2 and width 0.25: U(x) = (|x| - 2)^2 / (2 * 0.25^2), whose
normaliser is Z = 2 pi * 2 * 0.25 * sqrt(2 pi) to well under 1e-3 relative.
"""
import math

import torch
from torch import nn

import revtriton as rt

from step_memory import against_eager, print_memory  # examples/step_memory.py

RADIUS, WIDTH = 2.0, 0.25
LOG_Z = math.log(2 * math.pi * RADIUS * WIDTH * math.sqrt(2 * math.pi))


def energy(x):
    """U(x) of the ring: the target density is exp(-U(x)) / Z."""
    return 0.5 * ((x.norm(dim=1) - RADIUS) / WIDTH) ** 2


def net():
    return nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 1))


def flow_of(depth, reversible=True):
    return rt.ReversibleSequential(*[rt.AffineBlock(net(), net(), dim=1, swap=i % 2 == 1) for i in range(depth)],
                                   reversible=reversible)


def reverse_kl(flow, z):
    """The Monte-Carlo estimate of KL(q || p) in nats on the draws ``z`` ~ N(0, I)."""
    x, log_det = flow.inverse_and_log_det(z)  # log|det dx/dz|
    log_q = -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi) - log_det
    return (log_q + energy(x)).mean() + LOG_Z


def fit(steps=400, batch=512, depth=8, every=50, memory_batch=8192):
    """Train a flow of ``depth`` affine blocks by reverse KL; return it, the KL estimate per step
    and ``{"reversible": (peak, saved), "eager": (peak, saved)}``: the bytes of one step on
    ``memory_batch`` draws of the flow and of its eager twin."""
    torch.manual_seed(0)
    flow = flow_of(depth)
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    history = []
    for step in range(steps):
        kl = reverse_kl(flow, torch.randn(batch, 2))
        optimizer.zero_grad()
        kl.backward()
        optimizer.step()
        history.append(kl.item())
        if step % every == 0 or step == steps - 1:
            print(f"step {step:4d}   KL(q || p) estimate {kl.item():7.3f} nats")
    eager = flow_of(depth, reversible=False)
    eager.load_state_dict(flow.state_dict())
    memory = against_eager(reverse_kl, flow, eager, torch.randn(memory_batch, 2))
    return flow, history, memory


if __name__ == "__main__":
    flow, _, memory = fit()
    print_memory(memory, "8192 draws")
    with torch.no_grad():
        radius = flow.inverse(torch.randn(4000, 2)).norm(dim=1)
    print(f"4000 samples: |x| mean {radius.mean():.3f} (target {RADIUS}), std {radius.std():.3f} (target {WIDTH})")
