"""Reversible blocks: one coupling each, computed in place on a chain's stream buffer.

A block implements three in-place steps that :mod:`revtriton.function` drives on a chain's
stream, a ``(2, ...)`` buffer whose two contiguous entries are the halves of the input split
along the block's ``dim``: each step gets the pair of halves (``x1, x2 = x``), views of it.

- ``forward_inplace(x, run, log_det)``: x becomes y; unless ``log_det`` is None, the block
  adds its log|det dy/dx| per sample (index of dim 0) to that tensor in place.
- ``inverse_inplace(y, run, log_det)``: y becomes x; unless ``log_det`` is None, the block
  adds its log|det dx/dy| (minus the forward's) to it.
- ``backward_inplace(y, dy, vjp, log_det_grad)``: y becomes x and dy becomes dx (Algorithm 1,
  DESIGN.md), counting the per-sample gradient ``log_det_grad`` of the log-determinant (or
  None); returns the parameter gradients as ``[(param, grad), ...]``.
- ``inverse_backward_inplace(x, dx, vjp, log_det_grad)``: the backward of the inverse, its
  mirror: x becomes y (F and G run forward again) and dx becomes dy.

``eager_forward(x, log_det=None, run=call)`` and ``eager_inverse(y, log_det=None, run=call)``
compute the same with plain autograd (for debugging). ``FUNCTIONS`` names the block's F and G
submodules: the ones that take side inputs.

``run(name, module, input)`` and ``vjp(module, input, grad, negate=False)`` call F and G; the chain picks
them so that the recompute replays the forward's RNG and autocast state and every call gets
its side inputs.
"""
import torch
from torch import nn

from .ops import on_stream
from .function import inverse_chain, reversible_chain
from .stream import halves


def call(name, module, x):
    """``module(x)``: how ``eager_forward`` calls F and G when no chain passes its own ``run``."""
    return module(x)


def _step_back(vjp, fn, inp, grad_out, rebuilt, grad_in, negate=False):
    """One step of Algorithm 1: recompute ``out = fn(inp)`` and pull ``grad_out`` back through
    it, then in one fused pass ``rebuilt -= out`` and ``grad_in += dfn/dinp^T grad_out``
    (``rebuilt`` alone if ``out`` does not depend on ``inp``). With ``negate``, ``out = -fn(inp)``:
    the mirror step of an inverse's backward, ``rebuilt += fn(inp)``. Returns the parameter
    gradients; ``out`` and the input gradient are freed on return, before the next step's
    recompute."""
    out, grad_inp, params = vjp(fn, inp, grad_out, negate)
    if grad_inp is None:
        on_stream.coupling_inverse(rebuilt, out)
    else:
        on_stream.coupling_backward(rebuilt, out, grad_in, grad_inp)
    return params


def _as_module(name, fn):
    if isinstance(fn, nn.Module):
        return fn
    if callable(fn):
        return _Callable(fn)
    raise TypeError(f"{name} is {type(fn).__name__}; expected an nn.Module or a callable")


class _Callable(nn.Module):
    """Wraps a plain callable (no parameters of its own) as an nn.Module whose forward is the
    callable itself, so that its signature says which side inputs it takes."""

    def __init__(self, fn):
        super().__init__()
        self.forward = fn


class ReversibleBlock(nn.Module):
    """Additive coupling of two halves of the input split along ``dim``::

        y1 = x1 + F(x2)            x2 = y2 - G(y1)
        y2 = x2 + G(y1)            x1 = y1 - F(x2)

    Args:
        f, g: nn.Modules (or callables) mapping a half to a tensor of the same shape,
            dtype and device.
        dim: the dimension split in two (1 for NCHW, -1 for (batch, tokens, features));
            its size must be even.
        preserve_rng_state: replay the RNG state of F and G in the backward recompute, so
            dropout masks match the forward. Costs nothing when F and G draw no numbers.

    Used alone, a block is a chain of one: it keeps only its output for backward. Prefer
    :class:`~revtriton.ReversibleSequential` for many blocks (one autograd node for all).
    ``block(x, **kwargs)`` passes side inputs to F and G as a chain does.
    """

    FUNCTIONS = ("f", "g")

    def __init__(self, f, g, dim=1, preserve_rng_state=True):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim is {dim!r}; expected an int")
        self.f = _as_module("f", f)
        self.g = _as_module("g", g)
        self.dim = dim
        self.preserve_rng_state = preserve_rng_state

    def extra_repr(self):
        return f"dim={self.dim}"

    def check_input(self, x):
        """Raise a clear error unless ``x`` can be split in two along ``self.dim``."""
        if not -x.ndim <= self.dim < x.ndim:
            raise ValueError(f"dim={self.dim} is out of range for an input of shape {tuple(x.shape)} "
                             f"(expected -{x.ndim} <= dim < {x.ndim})")
        if x.shape[self.dim] % 2:
            raise ValueError(f"the input's size along dim={self.dim} is {x.shape[self.dim]}; expected an "
                             f"even size to split into two halves (input shape {tuple(x.shape)})")

    def forward(self, x, **kwargs):
        return reversible_chain((self,), x, self.preserve_rng_state, kwargs=kwargs)

    def inverse(self, y, **kwargs):
        """Rebuild the input from the output ``y`` (``y`` is not modified), given the side inputs
        of the forward call: differentiable with grad enabled, as a chain of one's ``inverse``."""
        return inverse_chain((self,), y, self.preserve_rng_state, False, kwargs)

    def forward_inplace(self, x, run, log_det=None):  # volume-preserving: adds 0 to log_det
        x1, x2 = x
        on_stream.coupling_forward(x1, run("f", self.f, x2))
        on_stream.coupling_forward(x2, run("g", self.g, x1))

    def inverse_inplace(self, y, run, log_det=None):
        y1, y2 = y
        on_stream.coupling_inverse(y2, run("g", self.g, y1))
        on_stream.coupling_inverse(y1, run("f", self.f, y2))

    def backward_inplace(self, y, dy, vjp, log_det_grad=None):
        (y1, y2), (dy1, dy2) = y, dy
        g_params = _step_back(vjp, self.g, y1, dy2, y2, dy1)  # x2 = y2 - G(y1);  dy1 += dG/dy1^T dy2
        f_params = _step_back(vjp, self.f, y2, dy1, y1, dy2)  # x1 = y1 - F(x2);  dx2 = dy2 + dF/dx2^T dy1
        return f_params + g_params

    def inverse_backward_inplace(self, x, dx, vjp, log_det_grad=None):
        (x1, x2), (dx1, dx2) = x, dx
        f_params = _step_back(vjp, self.f, x2, dx1, x1, dx2, negate=True)  # y1 = x1 + F(x2); dx2 -= dF^T dx1
        g_params = _step_back(vjp, self.g, x1, dx2, x2, dx1, negate=True)  # y2 = x2 + G(y1); dy1 = dx1 - dG^T dy2
        return g_params + f_params

    def eager_forward(self, x, log_det=None, run=call):
        """The same function with plain autograd, keeping every activation (for debugging)."""
        x1, x2 = halves(x, self.dim)
        y1 = x1 + run("f", self.f, x2)
        return torch.cat([y1, x2 + run("g", self.g, y1)], dim=self.dim)

    def eager_inverse(self, y, log_det=None, run=call):
        """The inverse with plain autograd: ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``."""
        y1, y2 = halves(y, self.dim)
        x2 = y2 - run("g", self.g, y1)
        return torch.cat([y1 - run("f", self.f, x2), x2], dim=self.dim)
