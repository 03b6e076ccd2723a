"""A chain's stream: the two halves of its input along ``dim``, kept as one dense
``(2, ...)`` buffer (in the input's memory format: contiguous or channels_last) so that each
half is dense for F, G and the kernels."""
import torch


def halves(t, dim):
    """The two halves of ``t`` along ``dim`` as views (no copy)."""
    half = t.shape[dim] // 2
    return t.narrow(dim, 0, half), t.narrow(dim, half, half)


def to_stream(x, dim, like=None):
    """``x``'s two halves along ``dim`` as one dense ``(2, ...)`` buffer (a copy): stacked, in
    ``x``'s memory format, or with ``like`` (a stream), shaped and strided like ``like``."""
    if like is None:
        return torch.stack(halves(x.detach(), dim))
    dim %= x.ndim
    stream = torch.empty_like(like, dtype=x.dtype, device=x.device)
    stream.copy_(x.detach().unflatten(dim, (2, x.shape[dim] // 2)).movedim(dim, 0))
    return stream


def from_stream(stream, dim):
    """The tensor whose halves along ``dim`` are ``stream[0]`` and ``stream[1]`` (a copy)."""
    return torch.cat(tuple(stream), dim)
