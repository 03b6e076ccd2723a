"""Affine and momentum couplings: reversible blocks beyond the additive one.

Both split their input along ``dim`` into two halves (views, never copies) and implement the
block protocol of :mod:`revtriton.blocks`, so they chain in
:class:`~revtriton.ReversibleSequential` with O(1) activation memory, RNG and autocast
replay and BatchNorm statistics updated once, like :class:`~revtriton.ReversibleBlock`.
"""
import math

import torch
from torch import nn

from . import ops
from .ops import on_stream
from .blocks import ReversibleBlock, _as_module, _step_back, call, halves


def _number(name, value, inside, expected):
    """``value`` as a float, or a clear error unless it is a real number for which ``inside`` holds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} is {value!r}; expected a float")
    if not inside(value):
        raise ValueError(f"{name} is {value!r}; expected {expected}")
    return float(value)


def _add_grad_(dy, grad):
    """``dy += grad`` unless ``grad`` is None (the output does not depend on that input)."""
    if grad is not None:
        on_stream.coupling_forward(dy, grad)


class _Coupling(nn.Module):
    """The split along ``dim`` and the standalone forward (a chain of one) and inverse, as in
    :class:`~revtriton.ReversibleBlock`."""

    def __init__(self, dim, preserve_rng_state):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim is {dim!r}; expected an int")
        self.dim = dim
        self.preserve_rng_state = preserve_rng_state

    check_input = ReversibleBlock.check_input
    forward = ReversibleBlock.forward
    inverse = ReversibleBlock.inverse


class AffineBlock(_Coupling):
    """Affine coupling (RealNVP, Glow) of the halves ``x1, x2`` of the input split along ``dim``::

        y1 = x1                              x1 = y1
        y2 = x2 * exp(s_c) + t(x1)           x2 = (y2 - t(y1)) * exp(-s_c)
        s_c = clamp * tanh(s(x1) / clamp)    log|det dy/dx| = sum of s_c over the sample

    The soft clamp leaves small log-scales almost unchanged (s_c ~ s for |s| << clamp) and
    keeps every scale within exp(+-clamp), so that no value of s overflows. Only one half is
    transformed: alternate ``swap`` along a chain so that every feature is.

    Args:
        s, t: nn.Modules (or callables) mapping the conditioning half to a tensor of its
            shape: the raw log-scale and the shift.
        dim: the dimension split in two; its size must be even.
        clamp: the bound on the log-scale (a positive float).
        swap: transform the first half instead, conditioned on the second
            (``y2 = x2, y1 = x1 * exp(s_c(x2)) + t(x2)``).
        preserve_rng_state: replay the RNG state of s and t in the backward recompute.
    """

    FUNCTIONS = ("s", "t")

    def __init__(self, s, t, dim=1, clamp=2.0, swap=False, preserve_rng_state=True):
        super().__init__(dim, preserve_rng_state)
        self.s = _as_module("s", s)
        self.t = _as_module("t", t)
        self.clamp = _number("clamp", clamp, lambda c: 0 < c < math.inf, "a positive finite float")
        self.swap = bool(swap)

    def extra_repr(self):
        return f"dim={self.dim}, clamp={self.clamp}, swap={self.swap}"

    def _halves(self, pair):
        """The conditioning half and the transformed half of a pair of halves (a stream)."""
        first, second = pair
        return (second, first) if self.swap else (first, second)

    def forward_inplace(self, x, run, log_det=None):
        x1, x2 = self._halves(x)
        s, t = run("s", self.s, x1), run("t", self.t, x1)
        on_stream.affine_forward(x2, s, t, log_det, self.clamp)

    def inverse_inplace(self, y, run, log_det=None):
        y1, y2 = self._halves(y)
        t = run("t", self.t, y1)  # t before s: the inverse's backward recomputes s first
        s = run("s", self.s, y1)
        on_stream.affine_inverse(y2, s, t, self.clamp)
        if log_det is not None:
            log_det -= ops.per_sample_sum(ops.soft_clamp(s.to(log_det.dtype), self.clamp))

    def backward_inplace(self, y, dy, vjp, log_det_grad=None):
        y1, y2 = self._halves(y)
        dy1, dy2 = self._halves(dy)
        t, t_y1, t_params = vjp(self.t, y1, dy2)  # dL/dt = dy2
        _add_grad_(dy1, t_y1)  # before dy2 (which t_y1 may alias) becomes dx2
        del t_y1  # freed before the recompute of s

        def scale_grad(s):  # x2, dx2 = dy2 * exp(s_c) and dL/ds in one pass
            ds = torch.empty_like(y2, dtype=s.dtype)  # in the stream's layout, as the kernels need
            on_stream.affine_backward(y2, dy2, s, t, ds, log_det_grad, self.clamp)
            return ds

        # y1.data: y1 with a version counter of its own, as y2 (same buffer) is rebuilt while
        # the recompute of s keeps y1 for its backward; y1 itself is not written.
        _, s_y1, s_params = vjp(self.s, y1.data, scale_grad)
        _add_grad_(dy1, s_y1)
        return s_params + t_params

    def inverse_backward_inplace(self, x, dx, vjp, log_det_grad=None):
        x1, x2 = self._halves(x)
        dx1, dx2 = self._halves(dx)

        def scale_grad(s):  # x2 * exp(s_c), dy2 = dx2 / exp(s_c) and dL/ds in one pass
            ds = torch.empty_like(x2, dtype=s.dtype)  # laid out like x2, which the kernel writes with it
            on_stream.affine_inverse_backward(x2, dx2, s, ds, log_det_grad, self.clamp)
            return ds

        # x1.data: a version counter of its own, as x2 (same buffer) changes while the
        # recompute of s keeps x1 for its backward (see backward_inplace)
        _, s_x1, s_params = vjp(self.s, x1.data, scale_grad)
        _add_grad_(dx1, s_x1)
        del s_x1
        # y2 = x2 * exp(s_c) + t(y1);  dL/dt = -dy2
        t_params = _step_back(vjp, self.t, x1, dx2, x2, dx1, negate=True)
        return t_params + s_params

    def eager_forward(self, x, log_det=None, run=call):
        """The same function with plain autograd, keeping every activation (for debugging)."""
        x1, x2 = self._halves(halves(x, self.dim))
        s = ops.soft_clamp(run("s", self.s, x1), self.clamp)
        y2 = x2 * s.exp() + run("t", self.t, x1)
        if log_det is not None:
            log_det += ops.per_sample_sum(s)
        return torch.cat([y2, x1] if self.swap else [x1, y2], dim=self.dim)

    def eager_inverse(self, y, log_det=None, run=call):
        """The inverse with plain autograd: ``x2 = (y2 - t(y1)) * exp(-s_c(y1))``."""
        y1, y2 = self._halves(halves(y, self.dim))
        t = run("t", self.t, y1)
        s = ops.soft_clamp(run("s", self.s, y1), self.clamp)
        x2 = (y2 - t) * (-s).exp()
        if log_det is not None:
            log_det -= ops.per_sample_sum(s)
        return torch.cat([x2, y1] if self.swap else [y1, x2], dim=self.dim)


class MomentumBlock(_Coupling):
    """MomentumNet coupling (Sander et al., 2021) of the halves ``x, v`` (position and
    velocity) of the input split along ``dim``::

        v' = beta * v + (1 - beta) * f(x)    x = x' - v'
        x' = x + v'                          v = (v' - (1 - beta) * f(x)) / beta

    The Jacobian ``[[I + (1 - beta) J, beta I], [(1 - beta) J, beta I]]`` (J that of f)
    becomes ``[[I, 0], [(1 - beta) J, beta I]]`` once its second block row is subtracted from
    the first, so log|det| = d_v * log(beta) per sample, d_v the size of a sample's v half.
    The inverse divides by beta: rounding errors grow like beta**-depth along a chain.

    Args:
        f: an nn.Module (or callable) mapping the x half to a tensor of its shape.
        beta: the momentum, strictly between 0 (not invertible) and 1 (f unused).
        dim: the dimension split in two; its size must be even.
        preserve_rng_state: replay the RNG state of f in the backward recompute.
    """

    FUNCTIONS = ("f",)

    def __init__(self, f, beta=0.9, dim=1, preserve_rng_state=True):
        super().__init__(dim, preserve_rng_state)
        self.f = _as_module("f", f)
        self.beta = _number("beta", beta, lambda b: 0 < b < 1, "a float strictly between 0 and 1")

    def extra_repr(self):
        return f"dim={self.dim}, beta={self.beta}"

    def _log_det(self, v):
        """log|det| per sample: log(beta) for each element of a sample's v half."""
        return math.prod(v.shape[1:]) * math.log(self.beta)

    def forward_inplace(self, xv, run, log_det=None):
        x, v = xv
        on_stream.momentum_forward(x, v, run("f", self.f, x), self.beta)
        if log_det is not None:
            log_det += self._log_det(v)

    def inverse_inplace(self, y, run, log_det=None):
        x, v = y
        on_stream.coupling_inverse(x, v)  # x = x' - v'
        on_stream.momentum_inverse(v, run("f", self.f, x), self.beta)
        if log_det is not None:
            log_det -= self._log_det(v)

    def backward_inplace(self, y, dy, vjp, log_det_grad=None):  # log|det| is constant
        (x, v), (dx, dv) = y, dy
        on_stream.momentum_backward_x(x, v, dx, dv, self.beta)  # x = x' - v', dv = (1 - beta)(dx' + dv')
        f, f_x, f_params = vjp(self.f, x, dv)
        on_stream.momentum_backward_v(v, f, dx, torch.zeros_like(f) if f_x is None else f_x, dv, self.beta)
        return f_params

    def inverse_backward_inplace(self, xv, dxv, vjp, log_det_grad=None):  # log|det| is constant
        (x, v), (dx, dv) = xv, dxv
        dv.mul_(-(1 - self.beta) / self.beta)  # dL/dF(x) = -(1 - beta) / beta * dv
        f, f_x, f_params = vjp(self.f, x, dv)
        on_stream.momentum_forward(x, v, f, self.beta)  # v' = beta * v + (1 - beta) * f,  x' = x + v'
        on_stream.momentum_inverse_backward(dx, torch.zeros_like(f) if f_x is None else f_x, dv, self.beta)
        return f_params

    def eager_forward(self, xv, log_det=None, run=call):
        """The same function with plain autograd, keeping every activation (for debugging)."""
        x, v = halves(xv, self.dim)
        v = self.beta * v + (1 - self.beta) * run("f", self.f, x)
        if log_det is not None:
            log_det += self._log_det(v)
        return torch.cat([x + v, v], dim=self.dim)

    def eager_inverse(self, xv, log_det=None, run=call):
        """The inverse with plain autograd: ``x = x' - v'``, ``v = (v' - (1 - beta) f(x)) / beta``."""
        x, v = halves(xv, self.dim)
        x = x - v
        v = (v - (1 - self.beta) * run("f", self.f, x)) / self.beta
        if log_det is not None:
            log_det -= self._log_det(v)
        return torch.cat([x, v], dim=self.dim)
