"""Address same-shaped tensors as ``n_rows`` rows of ``n_cols`` contiguous elements.

A half of a contiguous tensor split along ``dim`` is such a view: the dimensions before
``dim`` collapse into rows, the half's slice of ``dim`` and everything after it is one
contiguous run per row. Each tensor keeps its own row stride.
"""
import contextlib
import math

import torch
import triton
import triton.language as tl


def _trailing_contiguous(t, dims):
    """How many of ``dims`` (counted from the last) form one unit-stride block of ``t``."""
    count, expected = 0, 1
    for d in reversed(dims):
        if t.stride(d) != expected:
            break
        expected *= t.shape[d]
        count += 1
    return count


def _row_stride(t, outer):
    """Stride between rows of ``t`` when the ``outer`` dims collapse into one, else None."""
    if not outer:
        return 0
    stride = expected = t.stride(outer[-1])
    for d in reversed(outer):
        if t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return stride


def row_layout(tensors, mutated):
    """Return ``(n_rows, n_cols, tensors, row_strides)`` addressing every tensor as rows.

    ``tensors`` share one shape; those at the indices in ``mutated`` are written in place and
    must be addressable as they are. Any other tensor without a shared row layout is replaced
    by a contiguous copy in the returned list. Raises ValueError for a mutated tensor that
    cannot be addressed (for example a transposed view).
    """
    shape = tensors[0].shape
    dims = [d for d, size in enumerate(shape) if size != 1]
    tensors = list(tensors)
    while True:
        inner = min(_trailing_contiguous(t, dims) for t in tensors)
        outer = dims[: len(dims) - inner]
        strides = [_row_stride(t, outer) if inner or not dims else None for t in tensors]
        bad = [i for i, s in enumerate(strides) if s is None]
        if not bad:
            n_cols = math.prod(shape[d] for d in dims[len(outer):])
            return math.prod(shape[d] for d in outer), n_cols, tensors, strides
        if any(i in mutated for i in bad) and all(tensors[i].is_contiguous() for i in bad if i not in mutated):
            strides = [_row_stride(t, dims) for t in tensors]  # rows of one element: halves of (N, 2)
            if None not in strides:
                return math.prod(shape[d] for d in dims), 1, tensors, strides
            i = strides.index(None)
            raise ValueError(
                f"in-place coupling needs a tensor addressable as strided rows with unit stride "
                f"inside each row; got shape {tuple(shape)} with strides {tensors[i].stride()}: "
                f"make the stream tensor contiguous")
        tensors = [t.contiguous() if i not in mutated else t for i, t in enumerate(tensors)]


def launch_config(n_cols):
    """Block size (a power of two, at most 4096) and warp count for rows of ``n_cols``."""
    block = min(4096, max(16, triton.next_power_of_2(n_cols)))
    return block, max(1, min(8, block // 256))


def accumulator(tensors):
    """The dtype arithmetic runs in: fp64 for fp64 inputs, fp32 otherwise (fp16/bf16 too)."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


@triton.jit
def row_cols(n_cols, BLOCK: tl.constexpr):
    """Row index and column offsets (int64) of this program, and the tail mask."""
    pid = tl.program_id(0).to(tl.int64)
    n_col_blocks = tl.cdiv(n_cols, BLOCK)
    row = pid // n_col_blocks
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return row, cols, cols < n_cols


def launch(kernel, tensors, mutated, **constexprs):
    """Launch an elementwise row kernel whose arguments are ``*tensors, *row_strides, n_cols``."""
    if tensors[0].numel() == 0:
        return
    n_rows, n_cols, tensors, strides = row_layout(tensors, mutated)
    block, num_warps = launch_config(n_cols)
    grid = (n_rows * triton.cdiv(n_cols, block),)
    device = torch.cuda.device(tensors[0].device) if tensors[0].is_cuda else contextlib.nullcontext()
    with device:
        kernel[grid](*tensors, *strides, n_cols, ACC=accumulator(tensors), BLOCK=block,
                     num_warps=num_warps, **constexprs)
