"""Additive coupling kernels: ``a += b``, ``a -= b`` and the fused backward ``a -= b; c += d``.

Each program handles ``BLOCK`` columns of one row; offsets are 64-bit so tensors over 2**31
elements are addressed correctly. Arithmetic runs in fp32 (fp64 for fp64 tensors) and is
rounded once on store.
"""
import triton
import triton.language as tl

from .layout import launch, row_cols


@triton.jit
def _add_kernel(a_ptr, b_ptr, a_stride, b_stride, n_cols,
                SIGN: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = row_cols(n_cols, BLOCK)
    a_ptrs = a_ptr + row * a_stride + cols
    a = tl.load(a_ptrs, mask=mask).to(ACC)
    b = tl.load(b_ptr + row * b_stride + cols, mask=mask).to(ACC)
    tl.store(a_ptrs, (a + SIGN * b).to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sub_add_kernel(a_ptr, b_ptr, c_ptr, d_ptr, a_stride, b_stride, c_stride, d_stride, n_cols,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = row_cols(n_cols, BLOCK)
    a_ptrs = a_ptr + row * a_stride + cols
    c_ptrs = c_ptr + row * c_stride + cols
    a = tl.load(a_ptrs, mask=mask).to(ACC)
    b = tl.load(b_ptr + row * b_stride + cols, mask=mask).to(ACC)
    c = tl.load(c_ptrs, mask=mask).to(ACC)
    d = tl.load(d_ptr + row * d_stride + cols, mask=mask).to(ACC)
    tl.store(a_ptrs, (a - b).to(a_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptrs, (c + d).to(c_ptr.dtype.element_ty), mask=mask)


def add_(a, b):
    """In place ``a += b`` (the coupling forward, y1 = x1 + F(x2))."""
    launch(_add_kernel, (a, b), mutated=(0,), SIGN=1.0)


def sub_(a, b):
    """In place ``a -= b`` (the coupling inverse, x1 = y1 - F(x2))."""
    launch(_add_kernel, (a, b), mutated=(0,), SIGN=-1.0)


def sub_add_(a, b, c, d):
    """In one pass, ``a -= b`` and ``c += d`` (rebuild an input half, accumulate its gradient)."""
    launch(_sub_add_kernel, (a, b, c, d), mutated=(0, 2))
