"""Fit a 2-D density with a normalizing flow of affine couplings: ``python examples/flow_2d.py``.

The flow maps a data point x to z = flow(x). With z ~ N(0, I), the change of variables gives
log p(x) = log N(z; 0, I) + log|det dz/dx|, so training minimises the negative log-likelihood
0.5 * |z|^2 + log(2 pi) - log_det. Sampling runs the flow backwards: x = flow.inverse(z).
"""
import math

import torch
from torch import nn

import revtriton as rt


def sample(n):
    """A banana: x1 ~ N(0, 1), x2 = x1^2 / 2 + N(0, 0.2^2)."""
    x1 = torch.randn(n)
    return torch.stack([x1, 0.5 * x1 ** 2 + 0.2 * torch.randn(n)], dim=1)


def net():
    return nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 1))


def fit(steps=300, batch=512, depth=8, every=50):
    """Train a flow of ``depth`` affine blocks (alternating halves); return it and the NLL per step."""
    torch.manual_seed(0)
    flow = rt.ReversibleSequential(*[rt.AffineBlock(net(), net(), dim=1, swap=i % 2 == 1) for i in range(depth)],
                                   log_det=True)
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    history = []
    for step in range(steps):
        z, log_det = flow(sample(batch))
        nll = (0.5 * z.pow(2).sum(1) + math.log(2 * math.pi) - log_det).mean()
        optimizer.zero_grad()
        nll.backward()
        optimizer.step()
        history.append(nll.item())
        if step % every == 0 or step == steps - 1:
            print(f"step {step:4d}   negative log-likelihood {nll.item():.3f}")
    return flow, history


if __name__ == "__main__":
    flow, _ = fit()
    with torch.no_grad():
        x = flow.inverse(torch.randn(2000, 2))
    mean = x.mean(0)
    print(f"2000 samples: mean ({mean[0]:.2f}, {mean[1]:.2f}), mean of x2 - x1^2/2: {(x[:, 1] - x[:, 0] ** 2 / 2).mean():.2f}")
