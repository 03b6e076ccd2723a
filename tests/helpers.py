"""Shared test helpers: small F/G modules, an independent eager twin, error measures."""
import copy

import pytest
import torch
from torch import nn

import revtriton as rt

# Parametrize a test's ``device`` with these: the same body on CPU (every run) and on CUDA
# (``-m cuda``, on a GPU machine).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def randn(*shape, device="cpu", requires_grad=False):
    """``torch.randn(*shape)`` drawn from the CPU generator, then moved to ``device``: a test
    sees the same numbers on every device (CUDA's generator would draw others)."""
    return torch.randn(*shape).to(device).requires_grad_(requires_grad)


def conv_unit(c):
    """The RevNet basic unit on ``c`` channels: BatchNorm-ReLU-Conv3x3."""
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False))


def mlp(d):
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


def conv_chain(depth, channels=4, device="cpu"):
    return rt.ReversibleSequential(*[rt.ReversibleBlock(conv_unit(channels // 2), conv_unit(channels // 2), dim=1)
                                     for _ in range(depth)]).to(device)


def eager_twin(chain):
    """A deep copy of ``chain`` as a plain function of autograd ops: ``x1, x2 = chunk``,
    ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``, ``cat`` per block."""
    twin = copy.deepcopy(chain)

    def run(x):
        for block in twin:
            x1, x2 = x.chunk(2, dim=block.dim)
            y1 = x1 + block.f(x2)
            x = torch.cat([y1, x2 + block.g(y1)], dim=block.dim)
        return x

    return twin, run


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def loss_of(y):
    """A loss whose gradient differs per element (a plain sum would hide mistakes)."""
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    return (y * w).sum() + y.square().mean()


class AddendSide(nn.Module):
    """``tanh(W x) + cond``: a side input of exactly the half's shape added to the output (its
    gradient is the incoming gradient itself)."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, cond):
        return torch.tanh(self.lin(x)) + cond


class AddendParam(nn.Module):
    """``tanh(W x) + bias``, ``bias`` a Parameter of exactly the half's shape (at batch 1)."""

    def __init__(self, shape):
        super().__init__()
        self.lin = nn.Linear(shape[-1], shape[-1])
        self.bias = nn.Parameter(torch.randn(shape))

    def forward(self, x):
        return torch.tanh(self.lin(x)) + self.bias
