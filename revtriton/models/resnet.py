"""The CIFAR networks of the RevNet paper (Gomez et al. 2017, Table 1) and their ResNet twins.

Every network is ``stem conv3x3 -> three stages -> BN-ReLU -> global average -> linear``.
A stage is a list of units on one width; its first unit changes width and stride
(downsampling, non-reversible) where needed. Branches are pre-activation:

    basic(c_in, c_out)       BN-ReLU-Conv3x3(c_in->c_out, stride)-BN-ReLU-Conv3x3(c_out->c_out)
    bottleneck(c_in, c_out)  BN-ReLU-Conv1x1(c_in->c_out/4)-BN-ReLU-Conv3x3(stride)-BN-ReLU-Conv1x1(->c_out)

A ResNet unit is ``y = shortcut(x) + branch(x)``. A RevNet unit is a reversible block on
the two channel halves with F and G branches on half the width; its downsampling unit is
the same coupling computed without inversion, ``y1 = shortcut(x1) + F(x2)``,
``y2 = shortcut(x2) + G(y1)``. Shortcuts have no parameters: average pooling for stride 2
and zero channels appended for a wider output.

Parameter counts (10 classes) match Table 1 of the paper for the basic networks; the
bottleneck ones have about 3% fewer, the shortcuts having no projection convolutions.
Pass ``reversible=False`` to a RevNet for its eager twin: the same modules and parameters
(``load_state_dict``-compatible) run with plain autograd.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import ReversibleBlock
from ..sequential import ReversibleSequential


def basic(c_in, c_out, stride=1):
    """The pre-activation basic branch: two 3x3 convolutions."""
    return nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False))


def bottleneck(c_in, c_out, stride=1):
    """The pre-activation bottleneck branch: 1x1 down to c_out/4, 3x3, 1x1 up to c_out."""
    mid = c_out // 4
    return nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(), nn.Conv2d(c_in, mid, 1, bias=False),
                         nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, mid, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, c_out, 1, bias=False))


def shortcut(x, c_out, stride):
    """Parameter-free identity shortcut: average-pool by ``stride``, append zero channels."""
    if stride > 1:
        x = F.avg_pool2d(x, stride)
    return F.pad(x, (0, 0, 0, 0, 0, c_out - x.shape[1]))


class ResidualUnit(nn.Module):
    """``y = shortcut(x) + branch(x)``."""

    def __init__(self, branch, c_in, c_out, stride):
        super().__init__()
        self.branch, self.c_out, self.stride = branch(c_in, c_out, stride), c_out, stride

    def forward(self, x):
        return shortcut(x, self.c_out, self.stride) + self.branch(x)


class CouplingDownsample(nn.Module):
    """A RevNet downsampling unit: the additive coupling with strided, widening F and G and
    shortcuts on the halves. Not invertible, so it runs with plain autograd."""

    def __init__(self, branch, c_in, c_out, stride):
        super().__init__()
        self.f = branch(c_in // 2, c_out // 2, stride)
        self.g = branch(c_out // 2, c_out // 2, 1)
        self.c_out, self.stride = c_out, stride

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        y1 = shortcut(x1, self.c_out // 2, self.stride) + self.f(x2)
        y2 = shortcut(x2, self.c_out // 2, self.stride) + self.g(y1)
        return torch.cat([y1, y2], dim=1)


def _stages(units, widths, make_unit):
    """Units per stage: the first changes width/stride where needed; ``make_unit(c_in, c_out,
    stride, n)`` builds ``n`` units (one downsampling unit when c_in != c_out or stride > 1)."""
    layers, c_in = [], widths[0]
    for stage, (n, c_out) in enumerate(zip(units, widths[1:])):
        stride = 1 if stage == 0 else 2
        layers += make_unit(c_in, c_out, stride, n)
        c_in = c_out
    return layers


class CifarNet(nn.Sequential):
    """``stem -> stages -> BN-ReLU -> global average -> linear``."""

    def __init__(self, stages, c_stem, c_last, num_classes=10):
        super().__init__(nn.Conv2d(3, c_stem, 3, padding=1, bias=False), *stages, nn.BatchNorm2d(c_last),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_last, num_classes))


def resnet(units, widths, branch=basic, expansion=1, num_classes=10):
    """A pre-activation CIFAR ResNet: ``units`` per stage, stem width ``widths[0]``, stage
    widths ``widths[1:]`` times ``expansion`` (4 for bottleneck)."""
    outs = [widths[0]] + [w * expansion for w in widths[1:]]

    def make(c_in, c_out, stride, n):
        return [ResidualUnit(branch, c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n)]

    return CifarNet(_stages(units, outs, make), outs[0], outs[-1], num_classes)


def revnet(units, widths, branch=basic, expansion=1, num_classes=10, reversible=True):
    """A CIFAR RevNet: like :func:`resnet`, with every unit that keeps width and resolution a
    reversible block, the units of a stage after its first in one ReversibleSequential."""
    outs = [widths[0]] + [w * expansion for w in widths[1:]]

    def make(c_in, c_out, stride, n):
        first = []
        if c_in != c_out or stride > 1:
            first, n = [CouplingDownsample(branch, c_in, c_out, stride)], n - 1
        blocks = [ReversibleBlock(branch(c_out // 2, c_out // 2), branch(c_out // 2, c_out // 2), dim=1)
                  for _ in range(n)]
        return first + [ReversibleSequential(*blocks, reversible=reversible)]

    return CifarNet(_stages(units, outs, make), outs[0], outs[-1], num_classes)


def resnet32(num_classes=10):
    """ResNet-32: 5-5-5 basic units, widths 16-16-32-64; 464,154 parameters."""
    return resnet((5, 5, 5), (16, 16, 32, 64), num_classes=num_classes)


def resnet110(num_classes=10):
    """ResNet-110: 18-18-18 basic units, widths 16-16-32-64; 1,727,962 parameters."""
    return resnet((18, 18, 18), (16, 16, 32, 64), num_classes=num_classes)


def resnet164(num_classes=10):
    """ResNet-164: 18-18-18 bottleneck units, widths 16-16-32-64 (outputs x4); 1,661,274 parameters."""
    return resnet((18, 18, 18), (16, 16, 32, 64), bottleneck, 4, num_classes)


def revnet38(num_classes=10, reversible=True):
    """RevNet-38: 3-3-3 basic units, widths 32-32-64-112; 464,858 parameters."""
    return revnet((3, 3, 3), (32, 32, 64, 112), num_classes=num_classes, reversible=reversible)


def revnet110(num_classes=10, reversible=True):
    """RevNet-110: 9-9-9 basic units, widths 32-32-64-128; 1,729,162 parameters."""
    return revnet((9, 9, 9), (32, 32, 64, 128), num_classes=num_classes, reversible=reversible)


def revnet164(num_classes=10, reversible=True):
    """RevNet-164: 9-9-9 bottleneck units, widths 32-32-64-128 (outputs x4); 1,664,778 parameters."""
    return revnet((9, 9, 9), (32, 32, 64, 128), bottleneck, 4, num_classes, reversible)
