"""Address same-shaped tensors as ``n_rows`` rows of ``n_cols`` contiguous elements, in tiles.

Dimensions are taken in the memory order of the (first) written tensor, outermost first, so
any memory format (channels_last, a permuted tensor) is addressed as it lies. A half of a
dense tensor split along ``dim`` is then such a view: the dimensions outside ``dim`` collapse
into rows, the half's slice of ``dim`` and everything inside it is one contiguous run per
row. Each tensor keeps its own row stride.

A kernel program handles one tile of ``BLOCK_R`` rows by ``BLOCK_C`` columns, at most 4096
elements (2048 in fp64: 64 bytes of each operand per thread of 8 warps, four 128-bit
accesses): a long row is cut into tiles of one row, short rows are stacked into one tile, so
that every program has a full block of work (not one warp per element for the halves of an
``(N, 2)`` tensor) and a launch needs at most ``numel / 1024 + 1`` programs, far below the
grid's limit of 2**31 - 1. Offsets are 64-bit, so tensors over 2**31 elements are addressed
correctly; the division that finds a program's tile runs once per program, in 32 bits unless
a row is longer than 2**31 elements.
"""
import contextlib
import math

import torch
import triton
import triton.language as tl

TILE_BYTES = 16384  # of each operand, in the arithmetic's dtype, per program
MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on the x dimension of a grid


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


def _copy_in_order(t, dims):
    """A copy of ``t`` whose elements lie in the order of ``dims``, outermost first (the
    other dims have size 1)."""
    order = [d for d in range(t.ndim) if d not in dims] + list(dims)
    return t.permute(order).contiguous().permute([order.index(d) for d in range(t.ndim)])


def row_layout(tensors, mutated, keep_samples=False):
    """Return ``(n_rows, n_cols, tensors, row_strides)`` addressing every tensor as rows.

    ``tensors`` share one shape; those at the indices in ``mutated`` are written in place and
    must be addressable as they are, in the memory order of ``tensors[mutated[0]]`` (its dims
    by decreasing stride). Any other tensor without that row layout is replaced by a copy laid
    out in that order in the returned list; the others are returned as they are. With
    ``keep_samples``, dim 0 (the sample) is outermost and never merged into a row, so each row
    lies in one sample and rows ``i * n_rows / N`` to ``(i + 1) * n_rows / N - 1`` are sample
    ``i``'s. Raises ValueError for a written tensor that cannot be addressed so (for example a
    transposed view written along with a contiguous tensor).
    """
    shape, order = tensors[0].shape, tensors[mutated[0]].stride()
    dims = sorted((d for d, size in enumerate(shape) if size != 1),
                  key=lambda d: (keep_samples and d != 0, -order[d]))
    innermost = len(dims) - (1 if keep_samples and dims and dims[0] == 0 else 0)
    tensors = list(tensors)
    while True:
        inner = min(innermost, *(_trailing_contiguous(t, dims) for t in tensors))
        outer = dims[: len(dims) - inner]
        strides = [_row_stride(t, outer) if inner or not dims else None for t in tensors]
        bad = [i for i, s in enumerate(strides) if s is None]
        if not bad:
            n_cols = math.prod(shape[d] for d in dims[len(outer):])
            return math.prod(shape[d] for d in outer), n_cols, tensors, strides
        dense = [_trailing_contiguous(t, dims) == len(dims) for t in tensors]
        written_bad = any(i in mutated for i in bad)
        if written_bad and all(dense[i] for i in range(len(tensors)) if i not in mutated):
            strides = [_row_stride(t, dims) for t in tensors]  # rows of one element: halves of (N, 2)
            if None not in strides:
                return math.prod(shape[d] for d in dims), 1, tensors, strides
            i = strides.index(None)
            raise ValueError(
                f"in-place coupling needs every written tensor addressable as strided rows, in the memory "
                f"order of the first one (strides {order}); got shape {tuple(shape)} with strides "
                f"{tensors[i].stride()}: give the written tensors one memory layout")
        # copy the read tensors in the way: the bad ones, or all that limit a written one's rows
        tensors = [_copy_in_order(t, dims) if i not in mutated and not dense[i] and (written_bad or i in bad) else t
                   for i, t in enumerate(tensors)]


def tiling(n_rows, n_cols, acc_bytes=4):
    """``(BLOCK_R, BLOCK_C, num_warps, programs)`` for ``n_rows`` rows of ``n_cols`` elements and
    arithmetic in ``acc_bytes``-byte floats: tiles of up to TILE_BYTES (powers of two), 256
    elements a warp in fp32 (128 in fp64), up to 8 warps."""
    max_block = TILE_BYTES // acc_bytes
    block_c = min(max_block, triton.next_power_of_2(n_cols))
    block_r = min(triton.next_power_of_2(n_rows), max_block // block_c)
    programs = triton.cdiv(n_rows, block_r) * triton.cdiv(n_cols, block_c)
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{n_rows} rows of {n_cols} elements need {programs} programs; a launch takes at "
                         f"most {MAX_PROGRAMS}")
    return block_r, block_c, max(1, min(8, block_r * block_c * acc_bytes // 1024)), programs


def accumulator(tensors):
    """The dtype arithmetic runs in: fp64 for fp64 inputs, fp32 otherwise (fp16/bf16 too)."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


@triton.jit
def tile(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's rows and columns (int64 vectors) and the mask of its tile's elements."""
    return tile_of(tl.program_id(0), n_rows, n_cols, BLOCK_R, BLOCK_C)


@triton.jit
def tile_of(pid, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The rows and columns (int64 vectors) of tile ``pid`` and the mask of its elements: tile
    ``pid`` covers rows ``pid // col_tiles`` and columns ``pid % col_tiles`` in blocks, with
    ``col_tiles = ceil(n_cols / BLOCK_C)`` formed as ``(n_cols - 1) // BLOCK_C + 1`` (n_cols >= 1):
    ``tl.cdiv`` adds ``BLOCK_C - 1`` first, which wraps in int32 for a row within BLOCK_C of 2**31."""
    col_tiles = (n_cols - 1) // BLOCK_C + 1
    rows = (pid // col_tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % col_tiles).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows, cols, (rows < n_rows)[:, None] & (cols < n_cols)[None, :]


@triton.jit
def at(ptr, stride, rows, cols):
    """Pointers to the elements ``rows x cols`` of a tensor whose rows are ``stride`` apart."""
    return ptr + rows[:, None] * stride + cols[None, :]


def _launch(kernel, layout, args, constexprs):
    n_rows, n_cols, tensors, strides = layout
    acc = accumulator(tensors)
    block_r, block_c, num_warps, programs = tiling(n_rows, n_cols, acc.primitive_bitwidth // 8)
    device = torch.cuda.device(tensors[0].device) if tensors[0].is_cuda else contextlib.nullcontext()
    with device:
        kernel[(programs,)](*tensors, *strides, n_rows, n_cols, *args, ACC=acc, BLOCK_R=block_r, BLOCK_C=block_c,
                            num_warps=num_warps, **constexprs)


def launch(kernel, tensors, mutated, *scalars, **constexprs):
    """Launch an elementwise tile kernel whose arguments are ``*tensors, *row_strides, n_rows,
    n_cols, *scalars``, then the constexprs: ``constexprs``, ``ACC``, ``BLOCK_R``, ``BLOCK_C``."""
    if tensors[0].numel():
        _launch(kernel, row_layout(tensors, mutated), scalars, constexprs)


def launch_per_sample(kernel, tensors, mutated, samples, *scalars, **constexprs):
    """:func:`launch` for a kernel that also takes ``samples, its stride, rows_per_sample`` before
    the scalars: ``samples`` holds one value per index of dim 0 of the tensors (or is None), and
    row ``r`` lies in sample ``r // rows_per_sample``."""
    if not tensors[0].numel():
        return
    layout = row_layout(tensors, mutated, keep_samples=samples is not None)
    per_sample = (None, 0, 1) if samples is None else (samples, samples.stride(0), layout[0] // tensors[0].shape[0])
    _launch(kernel, layout, (*per_sample, *scalars), constexprs)
