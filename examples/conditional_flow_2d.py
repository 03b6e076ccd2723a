"""Fit one 2-D density per class with a conditional normalizing flow: ``python examples/conditional_flow_2d.py``.

The flow is a chain of affine couplings (alternating halves) whose log-scale s and shift t
read the class label c as a side input: ``flow(x, label=c)`` passes it to every s and t,
which add an embedding of c to their hidden layer. The flow maps x to z = flow(x | c); with
z ~ N(0, I), the change of variables gives log p(x | c) = log N(z; 0, I) + log|det dz/dx|,
so training minimises the negative log-likelihood 0.5 * |z|^2 + log(2 pi) - log_det over
labelled points. Sampling class c runs the flow backwards: x = flow.inverse(z, label=c).
"""
import math

import torch
from torch import nn

import revtriton as rt

from step_memory import against_eager, print_memory  # examples/step_memory.py

CLASSES = ("ring", "banana", "blob")


def sample(label):
    """One point per entry of ``label``: a ring of radius 2 (class 0), a banana x2 = x1^2 / 2
    (class 1) or a Gaussian blob at (1.5, -1.5) (class 2), each with a little noise."""
    n = len(label)
    angle, radius = 2 * math.pi * torch.rand(n), 2 + 0.1 * torch.randn(n)
    ring = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    x1 = torch.randn(n)
    banana = torch.stack([x1, 0.5 * x1 ** 2 + 0.2 * torch.randn(n)], dim=1)
    blob = torch.tensor([1.5, -1.5]) + 0.3 * torch.randn(n, 2)
    return torch.stack([ring, banana, blob])[label, torch.arange(n)]


class Conditioner(nn.Module):
    """s or t of a coupling: ``Linear(tanh(Linear(x) + embedding(label)))`` on one coordinate."""

    def __init__(self, hidden=64):
        super().__init__()
        self.input = nn.Linear(1, hidden)
        self.label = nn.Embedding(len(CLASSES), hidden)
        self.output = nn.Linear(hidden, 1)

    def forward(self, x, label):
        return self.output(torch.tanh(self.input(x) + self.label(label)))


def flow_of(depth, reversible=True):
    return rt.ReversibleSequential(*[rt.AffineBlock(Conditioner(), Conditioner(), dim=1, swap=i % 2 == 1)
                                     for i in range(depth)], log_det=True, reversible=reversible)


def nll_of(flow, x, label):
    z, log_det = flow(x, label=label)
    return (0.5 * z.pow(2).sum(1) + math.log(2 * math.pi) - log_det).mean()


def fit(steps=500, batch=512, depth=8, every=100, memory_batch=8192):
    """Train a conditional flow of ``depth`` affine blocks; return it, the NLL per step and
    ``{"reversible": (peak, saved), "eager": (peak, saved)}``: the bytes of one forward and
    backward on ``memory_batch`` points of the flow and of its eager twin."""
    torch.manual_seed(0)
    flow = flow_of(depth)
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    history = []
    for step in range(steps):
        label = torch.randint(len(CLASSES), (batch,))
        nll = nll_of(flow, sample(label), label)
        optimizer.zero_grad()
        nll.backward()
        optimizer.step()
        history.append(nll.item())
        if step % every == 0 or step == steps - 1:
            print(f"step {step:4d}   negative log-likelihood {nll.item():.3f}")
    eager = flow_of(depth, reversible=False)
    eager.load_state_dict(flow.state_dict())
    label = torch.randint(len(CLASSES), (memory_batch,))
    memory = against_eager(nll_of, flow, eager, sample(label), label)
    return flow, history, memory


def samples_per_class(flow, n):
    """``n`` samples of each class: x = flow.inverse(z, label=c) for z ~ N(0, I)."""
    with torch.no_grad():
        return [flow.inverse(torch.randn(n, 2), label=torch.full((n,), c)) for c in range(len(CLASSES))]


def statistics(x):
    """The mean point of the points ``x`` and their mean distance to the origin."""
    return (*x.mean(0).tolist(), x.norm(dim=1).mean().item())


if __name__ == "__main__":
    flow, _, memory = fit()
    print_memory(memory, "8192 points")
    print("per class, 2000 samples against 2000 data points: mean point, mean |x|")
    for c, (name, x) in enumerate(zip(CLASSES, samples_per_class(flow, 2000))):
        (m1, m2, radius), (d1, d2, data_radius) = statistics(x), statistics(sample(torch.full((2000,), c)))
        print(f"{name:>8}: samples ({m1:5.2f}, {m2:5.2f}) {radius:4.2f}   data ({d1:5.2f}, {d2:5.2f}) {data_radius:4.2f}")
