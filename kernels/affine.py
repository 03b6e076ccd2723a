"""Affine coupling kernels on the transformed half ``x2`` of a block (see revtriton.couplings)::

    s_c = clamp * tanh(s / clamp)          the soft-clamped log-scale, |s_c| < clamp
    forward     y2 = x2 * exp(s_c) + t     and ld[sample] += sum of s_c over the sample
    inverse     x2 = (y2 - t) / exp(s_c)
    backward    x2 = (y2 - t) / exp(s_c),  dx2 = dy2 * exp(s_c),
                ds = (dy2 * (y2 - t) + ld_grad[sample]) * (1 - tanh(s / clamp)^2)
    inverse_backward (the backward of the inverse, whose log-determinant is -sum of s_c)
                x2 * exp(s_c) (y2 less t),  dy2 = dx2 / exp(s_c),
                ds = -(dx2 * x2 + ld_grad[sample]) * (1 - tanh(s / clamp)^2)

``s`` is the raw output of the scale function and ``ds`` the gradient flowing into it; the
gradient flowing into ``t`` is ``dy2`` itself. ``ld`` and ``ld_grad`` hold one value per index
of dim 0 (a sample), with any stride (autograd hands in expanded gradients), or are None.
``clamp`` is a runtime argument: one compiled kernel serves every value, exact in fp64.
Each step is one pass over memory; arithmetic runs in fp32 (fp64 for fp64 tensors). The
backward forms x2 as ``(y2 - t) * exp(-s_c)``: its division made ptxas spill a few bytes, at
48 to 64 registers, where rows split into body and tail (triton 3.6 and 3.8). With a
per-sample operand, rows never span samples, so a row's sample is found once per row (no
integer division per element) and each row's sum is added with one relaxed atomic add: on a
GPU the last bits of ``ld`` depend on the order the programs of a sample finish in.
"""
import triton
import triton.language as tl

from .layout import at, launch_per_sample, sample_of, tile


@triton.jit
def _tanh(x):
    """tanh from one exp of a non-positive number: exactly +-1 for large |x|, never inf/nan."""
    z = tl.exp(-2.0 * tl.abs(x))
    th = (1 - z) / (1 + z)
    return tl.where(x < 0, -th, th)


@triton.jit
def _affine_kernel(x_ptr, s_ptr, t_ptr, x_stride, s_stride, t_stride, n_rows, n_cols,
                   ld_ptr, ld_stride, rows_per_sample, clamp: tl.float64,
                   INVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                   PARTS: tl.constexpr):
    row_sums = tl.zeros((BLOCK_R,), ACC)
    c = tl.full((), clamp, ACC)
    inv_c = 1 / c
    for part in tl.static_range(PARTS):  # the tile, or its rows' body and tail (layout.tile_of)
        rows, cols, mask = tile(n_rows, n_cols, BLOCK_R, BLOCK_C, part, PARTS)
        x_ptrs = at(x_ptr, x_stride, rows, cols)
        x = tl.load(x_ptrs, mask=mask).to(ACC)
        s = tl.load(at(s_ptr, s_stride, rows, cols), mask=mask).to(ACC)
        t = tl.load(at(t_ptr, t_stride, rows, cols), mask=mask).to(ACC)
        s = c * _tanh(s * inv_c)
        if INVERSE:
            x = (x - t) / tl.exp(s)
        else:
            x = x * tl.exp(s) + t
        tl.store(x_ptrs, x.to(x_ptr.dtype.element_ty), mask=mask)
        if ld_ptr is not None:  # a row's s_c, summed over its parts
            row_sums += tl.sum(tl.where(mask, s, 0.0), axis=1)
    if ld_ptr is not None:  # one atomic add per row, into the row's sample
        tl.atomic_add(ld_ptr + sample_of(rows, n_rows, rows_per_sample) * ld_stride,
                      row_sums.to(ld_ptr.dtype.element_ty), mask=rows < n_rows, sem="relaxed")


@triton.jit
def _backward_kernel(y_ptr, dy_ptr, s_ptr, t_ptr, ds_ptr, y_stride, dy_stride, s_stride, t_stride, ds_stride,
                     n_rows, n_cols, ld_grad_ptr, ld_grad_stride, rows_per_sample, clamp: tl.float64,
                     ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PARTS: tl.constexpr):
    c = tl.full((), clamp, ACC)
    inv_c = 1 / c
    for part in tl.static_range(PARTS):  # the tile, or its rows' body and tail (layout.tile_of)
        rows, cols, mask = tile(n_rows, n_cols, BLOCK_R, BLOCK_C, part, PARTS)
        y_ptrs = at(y_ptr, y_stride, rows, cols)
        dy_ptrs = at(dy_ptr, dy_stride, rows, cols)
        y = tl.load(y_ptrs, mask=mask).to(ACC)
        dy = tl.load(dy_ptrs, mask=mask).to(ACC)
        th = _tanh(tl.load(at(s_ptr, s_stride, rows, cols), mask=mask).to(ACC) * inv_c)
        t = tl.load(at(t_ptr, t_stride, rows, cols), mask=mask).to(ACC)
        scale = tl.exp(c * th)
        shifted = y - t  # x2 * exp(s_c)
        ds = dy * shifted
        if ld_grad_ptr is not None:  # one load per row and part, from the row's sample
            samples = sample_of(rows, n_rows, rows_per_sample)
            ld_grad = tl.load(ld_grad_ptr + samples * ld_grad_stride, mask=rows < n_rows)
            ds += ld_grad.to(ACC)[:, None]
        tl.store(y_ptrs, (shifted * tl.exp(-c * th)).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_ptrs, (dy * scale).to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(at(ds_ptr, ds_stride, rows, cols), (ds * (1 - th * th)).to(ds_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inverse_backward_kernel(x_ptr, dx_ptr, s_ptr, ds_ptr, x_stride, dx_stride, s_stride, ds_stride,
                             n_rows, n_cols, ld_grad_ptr, ld_grad_stride, rows_per_sample, clamp: tl.float64,
                             ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PARTS: tl.constexpr):
    c = tl.full((), clamp, ACC)
    inv_c = 1 / c
    for part in tl.static_range(PARTS):  # the tile, or its rows' body and tail (layout.tile_of)
        rows, cols, mask = tile(n_rows, n_cols, BLOCK_R, BLOCK_C, part, PARTS)
        x_ptrs = at(x_ptr, x_stride, rows, cols)
        dx_ptrs = at(dx_ptr, dx_stride, rows, cols)
        x = tl.load(x_ptrs, mask=mask).to(ACC)
        dx = tl.load(dx_ptrs, mask=mask).to(ACC)
        th = _tanh(tl.load(at(s_ptr, s_stride, rows, cols), mask=mask).to(ACC) * inv_c)
        ds = dx * x
        if ld_grad_ptr is not None:  # one load per row and part, from the row's sample
            samples = sample_of(rows, n_rows, rows_per_sample)
            ld_grad = tl.load(ld_grad_ptr + samples * ld_grad_stride, mask=rows < n_rows)
            ds += ld_grad.to(ACC)[:, None]
        # two exps rather than a division: a full-precision division spilled registers (triton 3.6, sm_100)
        tl.store(x_ptrs, (x * tl.exp(c * th)).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptrs, (dx * tl.exp(-c * th)).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(at(ds_ptr, ds_stride, rows, cols), (-ds * (1 - th * th)).to(ds_ptr.dtype.element_ty), mask=mask)


def affine_forward_(x, s, t, ld, clamp):
    """In place ``x = x * exp(s_c) + t``; ``ld[i] += sum(s_c)`` over sample i unless ld is None."""
    launch_per_sample(_affine_kernel, (x, s, t), (0,), ld, clamp, INVERSE=False)


def affine_inverse_(y, s, t, clamp):
    """In place ``y = (y - t) / exp(s_c)``."""
    launch_per_sample(_affine_kernel, (y, s, t), (0,), None, clamp, INVERSE=True)


def affine_backward_(y, dy, s, t, ds, ld_grad, clamp):
    """In one pass: ``y`` becomes x2, ``dy`` becomes dx2 and ``ds`` the gradient into ``s``."""
    launch_per_sample(_backward_kernel, (y, dy, s, t, ds), (0, 1, 4), ld_grad, clamp)


def affine_inverse_backward_(x, dx, s, ds, ld_grad, clamp):
    """In one pass: ``x`` becomes ``x * exp(s_c)`` (y2 less t), ``dx`` becomes dy2 and ``ds`` the
    gradient into ``s`` of the inverse and its log-determinant."""
    launch_per_sample(_inverse_backward_kernel, (x, dx, s, ds), (0, 1, 3), ld_grad, clamp)
