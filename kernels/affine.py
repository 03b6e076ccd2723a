"""Affine coupling kernels on the transformed half ``x2`` of a block (see revtriton.couplings)::

    s_c = clamp * tanh(s / clamp)          the soft-clamped log-scale, |s_c| < clamp
    forward     y2 = x2 * exp(s_c) + t     and ld[sample] += sum of s_c over the sample
    inverse     x2 = (y2 - t) / exp(s_c)
    backward    x2 = (y2 - t) / exp(s_c),  dx2 = dy2 * exp(s_c),
                ds = (dy2 * (y2 - t) + ld_grad[sample]) * (1 - tanh(s / clamp)^2)

``s`` is the raw output of the scale function and ``ds`` the gradient flowing into it; the
gradient flowing into ``t`` is ``dy2`` itself. ``ld`` and ``ld_grad`` hold one value per index
of dim 0 (a sample), with any stride (autograd hands in expanded gradients), or are None.
Each step is one pass over memory; arithmetic runs in fp32 (fp64 for fp64 tensors). The
per-sample sum uses atomic adds: on a GPU its last bits depend on the order the blocks of a
sample finish in.
"""
import triton
import triton.language as tl

from .layout import launch, row_cols


@triton.jit
def _tanh(x):
    """tanh from one exp of a non-positive number: exactly +-1 for large |x|, never inf/nan."""
    z = tl.exp(-2.0 * tl.abs(x))
    th = (1 - z) / (1 + z)
    return tl.where(x < 0, -th, th)


@triton.jit
def _add_per_sample(ld_ptr, ld_stride, values, flat, mask, per_sample):
    """``ld[flat // per_sample] += values``: one atomic add when the block lies in one sample."""
    sample = flat // per_sample
    first = tl.min(sample)  # lane 0 is always inside the row
    last = tl.max(tl.where(mask, sample, first))
    values = tl.where(mask, values, 0.0)
    if first == last:
        tl.atomic_add(ld_ptr + first * ld_stride, tl.sum(values).to(ld_ptr.dtype.element_ty))
    else:
        tl.atomic_add(ld_ptr + sample * ld_stride, values.to(ld_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_kernel(x_ptr, s_ptr, t_ptr, x_stride, s_stride, t_stride, n_cols, ld_ptr, ld_stride, per_sample,
                   INVERSE: tl.constexpr, CLAMP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = row_cols(n_cols, BLOCK)
    x_ptrs = x_ptr + row * x_stride + cols
    x = tl.load(x_ptrs, mask=mask).to(ACC)
    s = CLAMP * _tanh(tl.load(s_ptr + row * s_stride + cols, mask=mask).to(ACC) / CLAMP)
    t = tl.load(t_ptr + row * t_stride + cols, mask=mask).to(ACC)
    if INVERSE:
        x = (x - t) / tl.exp(s)
    else:
        x = x * tl.exp(s) + t
    tl.store(x_ptrs, x.to(x_ptr.dtype.element_ty), mask=mask)
    if ld_ptr is not None:
        _add_per_sample(ld_ptr, ld_stride, s, row * n_cols + cols, mask, per_sample)


@triton.jit
def _backward_kernel(y_ptr, dy_ptr, s_ptr, t_ptr, ds_ptr, y_stride, dy_stride, s_stride, t_stride, ds_stride,
                     n_cols, ld_grad_ptr, ld_grad_stride, per_sample,
                     CLAMP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = row_cols(n_cols, BLOCK)
    y_ptrs = y_ptr + row * y_stride + cols
    dy_ptrs = dy_ptr + row * dy_stride + cols
    y = tl.load(y_ptrs, mask=mask).to(ACC)
    dy = tl.load(dy_ptrs, mask=mask).to(ACC)
    th = _tanh(tl.load(s_ptr + row * s_stride + cols, mask=mask).to(ACC) / CLAMP)
    t = tl.load(t_ptr + row * t_stride + cols, mask=mask).to(ACC)
    scale = tl.exp(CLAMP * th)
    shifted = y - t  # x2 * exp(s_c)
    ds = dy * shifted
    if ld_grad_ptr is not None:
        sample = (row * n_cols + cols) // per_sample
        ds += tl.load(ld_grad_ptr + sample * ld_grad_stride, mask=mask).to(ACC)
    tl.store(y_ptrs, (shifted / scale).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(dy_ptrs, (dy * scale).to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(ds_ptr + row * ds_stride + cols, (ds * (1 - th * th)).to(ds_ptr.dtype.element_ty), mask=mask)


def _per_sample(x, samples):
    """The stride of the per-sample tensor ``samples`` and how many elements of ``x`` (whose
    dim 0 indexes samples) each of its entries covers."""
    if samples is None:
        return 0, 1
    return samples.stride(0), x.numel() // max(1, samples.numel())


def affine_forward_(x, s, t, ld, clamp):
    """In place ``x = x * exp(s_c) + t``; ``ld[i] += sum(s_c)`` over sample i unless ld is None."""
    stride, per_sample = _per_sample(x, ld)
    launch(_affine_kernel, (x, s, t), mutated=(0,), ld_ptr=ld, ld_stride=stride, per_sample=per_sample,
           INVERSE=False, CLAMP=clamp)


def affine_inverse_(y, s, t, clamp):
    """In place ``y = (y - t) / exp(s_c)``."""
    launch(_affine_kernel, (y, s, t), mutated=(0,), ld_ptr=None, ld_stride=0, per_sample=1, INVERSE=True, CLAMP=clamp)


def affine_backward_(y, dy, s, t, ds, ld_grad, clamp):
    """In one pass: ``y`` becomes x2, ``dy`` becomes dx2 and ``ds`` the gradient into ``s``."""
    stride, per_sample = _per_sample(y, ld_grad)
    launch(_backward_kernel, (y, dy, s, t, ds), mutated=(0, 1, 4), ld_grad_ptr=ld_grad, ld_grad_stride=stride,
           per_sample=per_sample, CLAMP=clamp)
