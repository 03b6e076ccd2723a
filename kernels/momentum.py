"""Momentum coupling kernels on the halves (x, v) of a block (see revtriton.couplings)::

    forward       v = beta * v + (1 - beta) * f;   x = x + v          (f = F(x) before the step)
    inverse       v = (v - (1 - beta) * f) / beta                     (after x = x - v, f = F(x))
    backward_x    x = x - v;   dv = (1 - beta) * (dx + dv)
    backward_v    v = (v - (1 - beta) * f) / beta;   dx = dx + fx;   dv = dv * beta / (1 - beta)

Between the two backward passes, the vjp of F at x with the gradient ``dv`` gives ``fx``: the
first pass scales the gradient by ``1 - beta`` so that F's parameter gradients come out scaled.
Arithmetic runs in fp32 (fp64 for fp64 tensors); ``beta`` is a compile-time constant, exact
in fp64.
"""
import triton
import triton.language as tl

from .layout import launch, row_cols


@triton.jit
def _forward_kernel(x_ptr, v_ptr, f_ptr, x_stride, v_stride, f_stride, n_cols,
                    BETA: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = row_cols(n_cols, BLOCK)
    x_ptrs = x_ptr + row * x_stride + cols
    v_ptrs = v_ptr + row * v_stride + cols
    x = tl.load(x_ptrs, mask=mask).to(ACC)
    v = tl.load(v_ptrs, mask=mask).to(ACC)
    f = tl.load(f_ptr + row * f_stride + cols, mask=mask).to(ACC)
    v = BETA * v + (1 - BETA) * f
    tl.store(v_ptrs, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptrs, (x + v).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inverse_kernel(v_ptr, f_ptr, v_stride, f_stride, n_cols,
                    BETA: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = row_cols(n_cols, BLOCK)
    v_ptrs = v_ptr + row * v_stride + cols
    v = tl.load(v_ptrs, mask=mask).to(ACC)
    f = tl.load(f_ptr + row * f_stride + cols, mask=mask).to(ACC)
    tl.store(v_ptrs, ((v - (1 - BETA) * f) / BETA).to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_x_kernel(x_ptr, v_ptr, dx_ptr, dv_ptr, x_stride, v_stride, dx_stride, dv_stride, n_cols,
                       BETA: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = row_cols(n_cols, BLOCK)
    x_ptrs = x_ptr + row * x_stride + cols
    dv_ptrs = dv_ptr + row * dv_stride + cols
    x = tl.load(x_ptrs, mask=mask).to(ACC)
    v = tl.load(v_ptr + row * v_stride + cols, mask=mask).to(ACC)
    dx = tl.load(dx_ptr + row * dx_stride + cols, mask=mask).to(ACC)
    dv = tl.load(dv_ptrs, mask=mask).to(ACC)
    tl.store(x_ptrs, (x - v).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, ((1 - BETA) * (dx + dv)).to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_v_kernel(v_ptr, f_ptr, dx_ptr, fx_ptr, dv_ptr, v_stride, f_stride, dx_stride, fx_stride, dv_stride,
                       n_cols, BETA: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = row_cols(n_cols, BLOCK)
    v_ptrs = v_ptr + row * v_stride + cols
    dx_ptrs = dx_ptr + row * dx_stride + cols
    dv_ptrs = dv_ptr + row * dv_stride + cols
    v = tl.load(v_ptrs, mask=mask).to(ACC)
    f = tl.load(f_ptr + row * f_stride + cols, mask=mask).to(ACC)
    dx = tl.load(dx_ptrs, mask=mask).to(ACC)
    fx = tl.load(fx_ptr + row * fx_stride + cols, mask=mask).to(ACC)
    dv = tl.load(dv_ptrs, mask=mask).to(ACC)
    tl.store(v_ptrs, ((v - (1 - BETA) * f) / BETA).to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptrs, (dx + fx).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, (dv * (BETA / (1 - BETA))).to(dv_ptr.dtype.element_ty), mask=mask)


def momentum_forward_(x, v, f, beta):
    """In place ``v = beta * v + (1 - beta) * f``, then ``x += v``."""
    launch(_forward_kernel, (x, v, f), mutated=(0, 1), BETA=beta)


def momentum_inverse_(v, f, beta):
    """In place ``v = (v - (1 - beta) * f) / beta``."""
    launch(_inverse_kernel, (v, f), mutated=(0,), BETA=beta)


def momentum_backward_x_(x, v, dx, dv, beta):
    """In one pass, ``x -= v`` and ``dv = (1 - beta) * (dx + dv)``."""
    launch(_backward_x_kernel, (x, v, dx, dv), mutated=(0, 3), BETA=beta)


def momentum_backward_v_(v, f, dx, fx, dv, beta):
    """In one pass, ``v = (v - (1 - beta) * f) / beta``, ``dx += fx`` and ``dv *= beta / (1 - beta)``."""
    launch(_backward_v_kernel, (v, f, dx, fx, dv), mutated=(0, 2, 4), BETA=beta)
