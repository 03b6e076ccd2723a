"""Additive coupling kernels: ``a += b``, ``a -= b`` and the fused backward ``a -= b; c += d``.

Each program handles one tile of rows (see :mod:`revtriton.kernels.layout`). Arithmetic runs in
fp32 (fp64 for fp64 tensors) and is rounded once on store.
"""
import triton
import triton.language as tl

from .layout import at, launch, tile


@triton.jit
def _add_kernel(a_ptr, b_ptr, a_stride, b_stride, n_rows, n_cols, sign: tl.float64,
                ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PARTS: tl.constexpr):
    for part in tl.static_range(PARTS):  # the tile, or its rows' body and tail (layout.tile_of)
        rows, cols, mask = tile(n_rows, n_cols, BLOCK_R, BLOCK_C, part, PARTS)
        a_ptrs = at(a_ptr, a_stride, rows, cols)
        a = tl.load(a_ptrs, mask=mask).to(ACC)
        b = tl.load(at(b_ptr, b_stride, rows, cols), mask=mask).to(ACC)
        tl.store(a_ptrs, (a + tl.full((), sign, ACC) * b).to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sub_add_kernel(a_ptr, b_ptr, c_ptr, d_ptr, a_stride, b_stride, c_stride, d_stride, n_rows, n_cols,
                    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PARTS: tl.constexpr):
    for part in tl.static_range(PARTS):  # the tile, or its rows' body and tail (layout.tile_of)
        rows, cols, mask = tile(n_rows, n_cols, BLOCK_R, BLOCK_C, part, PARTS)
        a_ptrs = at(a_ptr, a_stride, rows, cols)
        c_ptrs = at(c_ptr, c_stride, rows, cols)
        a = tl.load(a_ptrs, mask=mask).to(ACC)
        b = tl.load(at(b_ptr, b_stride, rows, cols), mask=mask).to(ACC)
        c = tl.load(c_ptrs, mask=mask).to(ACC)
        d = tl.load(at(d_ptr, d_stride, rows, cols), mask=mask).to(ACC)
        tl.store(a_ptrs, (a - b).to(a_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptrs, (c + d).to(c_ptr.dtype.element_ty), mask=mask)


def add_(a, b):
    """In place ``a += b`` (the coupling forward, y1 = x1 + F(x2))."""
    launch(_add_kernel, (a, b), (0,), 1.0)


def sub_(a, b):
    """In place ``a -= b`` (the coupling inverse, x1 = y1 - F(x2))."""
    launch(_add_kernel, (a, b), (0,), -1.0)


def sub_add_(a, b, c, d):
    """In one pass, ``a -= b`` and ``c += d`` (rebuild an input half, accumulate its gradient)."""
    launch(_sub_add_kernel, (a, b, c, d), (0, 2))
