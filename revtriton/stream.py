"""A chain's stream: the two halves of its input along ``dim``, kept as one contiguous
``(2, ...)`` buffer so that each half is contiguous for F, G and the kernels."""
import torch


def halves(t, dim):
    """The two halves of ``t`` along ``dim`` as views (no copy)."""
    half = t.shape[dim] // 2
    return t.narrow(dim, 0, half), t.narrow(dim, half, half)


def to_stream(x, dim):
    """``x``'s two halves along ``dim`` as one contiguous ``(2, ...)`` buffer (a copy)."""
    return torch.stack(halves(x.detach(), dim))


def from_stream(stream, dim):
    """The tensor whose halves along ``dim`` are ``stream[0]`` and ``stream[1]`` (a copy)."""
    return torch.cat(tuple(stream), dim)
