"""``python -m bench train``: RevNet-38 and its eager twin from the same initial weights on the
same synthetic batches, 50 SGD steps; both loss curves and their largest difference.

RevNet-38's fp32 gradients at initialisation are ill-conditioned (BatchNorm over small
batches: eager fp32 differs from fp64 by ~1e-2 in some parameters), so any two fp32 runs
drift apart. The eager twin in float64 is the yardstick: the reversible run should stay as
close to eager fp32 as eager fp32 is to eager fp64.
"""
import copy
import os

import torch
import torch.nn.functional as F

from revtriton.models import revnet38

from .report import NO_PLOT, pyplot
from .workloads import as_method

STEPS, BATCH = 50, 8


def curve(model, batches, lr=0.01):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for x, labels in batches:
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(out_dir, steps=STEPS, batch=BATCH):
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reversible = revnet38().to(device)
    eager = as_method(copy.deepcopy(reversible), "eager")
    batches = [(torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device))
               for _ in range(steps)]
    eager64 = copy.deepcopy(eager).double()
    losses = {"revtriton": curve(reversible, batches), "eager": curve(eager, batches),
              "eager fp64": curve(eager64, [(x.double(), labels) for x, labels in batches])}
    for step in list(range(0, steps, 10)) + [steps - 1]:
        print(f"step {step:3d}   " + "   ".join(f"{name} {values[step]:.6f}" for name, values in losses.items()))
    worst = _largest_difference(losses["revtriton"], losses["eager"])
    yardstick = _largest_difference(losses["eager"], losses["eager fp64"])
    print(f"largest |loss difference| over {steps} steps: revtriton vs eager {worst:.2e}; "
          f"eager fp32 vs eager fp64 {yardstick:.2e}")
    _plot(losses, os.path.join(out_dir, f"train-{device.type}.png"))
    return losses, worst, yardstick


def _largest_difference(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


def _plot(losses, path):
    plt = pyplot()
    if plt is None:
        print(NO_PLOT)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in losses.items():
        ax.plot(values, label=name, linestyle="-" if name == "revtriton" else "--")
    ax.set(xlabel="SGD step", ylabel="cross-entropy", title="RevNet-38: reversible vs eager twin")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")
