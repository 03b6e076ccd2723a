"""Momentum coupling kernels on the halves (x, v) of a block (see revtriton.couplings)::

    forward       v = beta * v + (1 - beta) * f;   x = x + v          (f = F(x) before the step)
    inverse       v = (v - (1 - beta) * f) / beta                     (after x = x - v, f = F(x))
    backward_x    x = x - v;   dv = (1 - beta) * (dx + dv)
    backward_v    v = (v - (1 - beta) * f) / beta;   dx = dx + fx;   dv = dv * beta / (1 - beta)

The backward of the inverse (training through ``inverse``) rebuilds the forward's output with
``forward`` and then, in a pass over the gradients alone (the operands are disjoint, so one
fused pass would move no fewer bytes, and with six operands it spilled registers):

    inverse_backward    dx = dx + fx;  dv = -dv / (1 - beta) - dx

after ``dv *= -(1 - beta) / beta`` and the vjp of F at x with that gradient, which gives ``fx``.

Between the two backward passes, the vjp of F at x with the gradient ``dv`` gives ``fx``: the
first pass scales the gradient by ``1 - beta`` so that F's parameter gradients come out scaled.
Arithmetic runs in fp32 (fp64 for fp64 tensors). ``beta`` is a runtime fp64 argument: one
compiled kernel serves every value, exact in fp64; ``1 - beta`` is formed in fp64 before it is
rounded to the arithmetic's precision, as a PyTorch expression with a Python float would, and
the division by beta is a multiplication by ``1 / beta``, formed once per program.
"""
import triton
import triton.language as tl

from .layout import at, launch, tile


@triton.jit
def _forward_kernel(x_ptr, v_ptr, f_ptr, x_stride, v_stride, f_stride, n_rows, n_cols, beta: tl.float64,
                    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PARTS: tl.constexpr):
    for part in tl.static_range(PARTS):  # the tile, or its rows' body and tail (layout.tile_of)
        rows, cols, mask = tile(n_rows, n_cols, BLOCK_R, BLOCK_C, part, PARTS)
        x_ptrs = at(x_ptr, x_stride, rows, cols)
        v_ptrs = at(v_ptr, v_stride, rows, cols)
        x = tl.load(x_ptrs, mask=mask).to(ACC)
        v = tl.load(v_ptrs, mask=mask).to(ACC)
        f = tl.load(at(f_ptr, f_stride, rows, cols), mask=mask).to(ACC)
        v = tl.full((), beta, ACC) * v + tl.full((), 1.0 - beta, ACC) * f
        tl.store(v_ptrs, v.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(x_ptrs, (x + v).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inverse_kernel(v_ptr, f_ptr, v_stride, f_stride, n_rows, n_cols, beta: tl.float64,
                    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PARTS: tl.constexpr):
    for part in tl.static_range(PARTS):  # the tile, or its rows' body and tail (layout.tile_of)
        rows, cols, mask = tile(n_rows, n_cols, BLOCK_R, BLOCK_C, part, PARTS)
        v_ptrs = at(v_ptr, v_stride, rows, cols)
        v = tl.load(v_ptrs, mask=mask).to(ACC)
        f = tl.load(at(f_ptr, f_stride, rows, cols), mask=mask).to(ACC)
        v = (v - tl.full((), 1.0 - beta, ACC) * f) * (1 / tl.full((), beta, ACC))
        tl.store(v_ptrs, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_x_kernel(x_ptr, v_ptr, dx_ptr, dv_ptr, x_stride, v_stride, dx_stride, dv_stride, n_rows, n_cols,
                       beta: tl.float64, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       PARTS: tl.constexpr):
    for part in tl.static_range(PARTS):  # the tile, or its rows' body and tail (layout.tile_of)
        rows, cols, mask = tile(n_rows, n_cols, BLOCK_R, BLOCK_C, part, PARTS)
        x_ptrs = at(x_ptr, x_stride, rows, cols)
        dv_ptrs = at(dv_ptr, dv_stride, rows, cols)
        x = tl.load(x_ptrs, mask=mask).to(ACC)
        v = tl.load(at(v_ptr, v_stride, rows, cols), mask=mask).to(ACC)
        dx = tl.load(at(dx_ptr, dx_stride, rows, cols), mask=mask).to(ACC)
        dv = tl.load(dv_ptrs, mask=mask).to(ACC)
        tl.store(x_ptrs, (x - v).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptrs, (tl.full((), 1.0 - beta, ACC) * (dx + dv)).to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_v_kernel(v_ptr, f_ptr, dx_ptr, fx_ptr, dv_ptr, v_stride, f_stride, dx_stride, fx_stride, dv_stride,
                       n_rows, n_cols, beta: tl.float64, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr, PARTS: tl.constexpr):
    for part in tl.static_range(PARTS):  # the tile, or its rows' body and tail (layout.tile_of)
        rows, cols, mask = tile(n_rows, n_cols, BLOCK_R, BLOCK_C, part, PARTS)
        v_ptrs = at(v_ptr, v_stride, rows, cols)
        dx_ptrs = at(dx_ptr, dx_stride, rows, cols)
        dv_ptrs = at(dv_ptr, dv_stride, rows, cols)
        v = tl.load(v_ptrs, mask=mask).to(ACC)
        f = tl.load(at(f_ptr, f_stride, rows, cols), mask=mask).to(ACC)
        dx = tl.load(dx_ptrs, mask=mask).to(ACC)
        fx = tl.load(at(fx_ptr, fx_stride, rows, cols), mask=mask).to(ACC)
        dv = tl.load(dv_ptrs, mask=mask).to(ACC)
        v = (v - tl.full((), 1.0 - beta, ACC) * f) * (1 / tl.full((), beta, ACC))
        tl.store(v_ptrs, v.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptrs, (dx + fx).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptrs, (dv * (tl.full((), beta, ACC) / tl.full((), 1.0 - beta, ACC))).to(dv_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _inverse_backward_kernel(dx_ptr, fx_ptr, dv_ptr, dx_stride, fx_stride, dv_stride, n_rows, n_cols,
                             dv_scale: tl.float64, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_C: tl.constexpr, PARTS: tl.constexpr):
    for part in tl.static_range(PARTS):  # the tile, or its rows' body and tail (layout.tile_of)
        rows, cols, mask = tile(n_rows, n_cols, BLOCK_R, BLOCK_C, part, PARTS)
        dx_ptrs = at(dx_ptr, dx_stride, rows, cols)
        dv_ptrs = at(dv_ptr, dv_stride, rows, cols)
        dx = tl.load(dx_ptrs, mask=mask).to(ACC) + tl.load(at(fx_ptr, fx_stride, rows, cols), mask=mask).to(ACC)
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dv = tl.load(dv_ptrs, mask=mask).to(ACC) * tl.full((), dv_scale, ACC) - dx
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def momentum_forward_(x, v, f, beta):
    """In place ``v = beta * v + (1 - beta) * f``, then ``x += v``."""
    launch(_forward_kernel, (x, v, f), (0, 1), beta)


def momentum_inverse_(v, f, beta):
    """In place ``v = (v - (1 - beta) * f) / beta``."""
    launch(_inverse_kernel, (v, f), (0,), beta)


def momentum_backward_x_(x, v, dx, dv, beta):
    """In one pass, ``x -= v`` and ``dv = (1 - beta) * (dx + dv)``."""
    launch(_backward_x_kernel, (x, v, dx, dv), (0, 3), beta)


def momentum_backward_v_(v, f, dx, fx, dv, beta):
    """In one pass, ``v = (v - (1 - beta) * f) / beta``, ``dx += fx`` and ``dv *= beta / (1 - beta)``."""
    launch(_backward_v_kernel, (v, f, dx, fx, dv), (0, 2, 4), beta)


def momentum_inverse_backward_(dx, fx, dv, beta):
    """In one pass, ``dx += fx`` and ``dv = -dv / (1 - beta) - dx`` (the new dx)."""
    launch(_inverse_backward_kernel, (dx, fx, dv), (0, 2), -1.0 / (1.0 - beta))
