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
grid's limit of 2**31 - 1. A row longer than 16 elements but not a multiple of 16 is run as a
body and a tail where some tensor's rows start 16-byte aligned (:func:`tile_of`), so the body
moves 128 bits per access and only the tail is masked element by element. Offsets are 64-bit,
so tensors over 2**31 elements are addressed correctly; the division that finds a program's
tile runs once per program, in 32 bits unless a row is longer than 2**31 elements.

A launch's host work (the row layout, the tiling, Triton's argument binding, specialisation and
kernel-cache lookup) depends only on the operands' shapes, strides, dtypes, device and 16-byte
alignment: it is done once per such key (:func:`_key`) and the compiled kernel is then launched
directly (``CompiledKernel.run``, as inductor's generated launchers do), about 1.5 µs where
``kernel[grid](...)`` took 20 (``python -m bench host``). Triton's interpreter has no compiled
kernel: there the cached layout and tiling go through ``kernel[grid]`` every time.
"""
import math

import torch
import triton
import triton.language as tl
from triton import knobs

TILE_BYTES = 16384  # of each operand, in the arithmetic's dtype, per program
MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on the x dimension of a grid
BODY = tl.constexpr(16)  # elements: a split row's body is a multiple of 16 long, its tail shorter (tile_of)


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


def _next_power_of_2(n):
    """The least power of two >= ``n`` (n >= 1): ``triton.next_power_of_2`` in plain integer
    arithmetic (triton's is a ConstexprFunction wrapper costing ~2 µs a call)."""
    return 1 << (n - 1).bit_length()


def tiling(n_rows, n_cols, acc_bytes=4):
    """``(BLOCK_R, BLOCK_C, num_warps, programs)`` for ``n_rows`` rows of ``n_cols`` elements and
    arithmetic in ``acc_bytes``-byte floats: tiles of up to TILE_BYTES (powers of two), 256
    elements a warp in fp32 (128 in fp64), up to 8 warps."""
    max_block = TILE_BYTES // acc_bytes
    block_c = min(max_block, _next_power_of_2(n_cols))
    block_r = min(_next_power_of_2(n_rows), max_block // block_c)
    programs = -(-n_rows // block_r) * -(-n_cols // block_c)
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{n_rows} rows of {n_cols} elements need {programs} programs; a launch takes at "
                         f"most {MAX_PROGRAMS}")
    return block_r, block_c, max(1, min(8, block_r * block_c * acc_bytes // 1024)), programs


def parts(n_rows, n_cols, tensors, row_strides):
    """2 where a kernel should split each row into a body and a tail (:func:`tile_of`), else 1:
    where rows are longer than BODY but not a multiple of it and at least one tensor's rows all
    start 16-byte aligned (its data pointer, and its row stride in elements unless there is one
    row, divisible by 16: what Triton specialises on), so that the body can move 128 bits per
    access. Where no tensor's rows are so aligned (rows of odd length packed one after another)
    wide accesses are impossible and the split would only add the tail's instructions."""
    if n_cols <= BODY.value or n_cols % BODY.value == 0:
        return 1
    aligned = any(not t.data_ptr() % 16 and (n_rows == 1 or not stride % 16) for t, stride in zip(tensors, row_strides))
    return 2 if aligned else 1


def accumulator(tensors):
    """The dtype arithmetic runs in: fp64 for fp64 inputs, fp32 otherwise (fp16/bf16 too)."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


@triton.jit
def tile(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PART: tl.constexpr = 0,
         PARTS: tl.constexpr = 1):
    """This program's rows and columns (int64 vectors) and the mask of its tile's elements, or of
    part ``PART`` of them (see :func:`tile_of`)."""
    return tile_of(tl.program_id(0), n_rows, n_cols, BLOCK_R, BLOCK_C, PART, PARTS)


@triton.jit
def tile_of(pid, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PART: tl.constexpr = 0,
            PARTS: tl.constexpr = 1):
    """The rows and columns (int64 vectors) of tile ``pid`` and the mask of its elements: tile
    ``pid`` covers rows ``pid // col_tiles`` and columns ``pid % col_tiles`` in blocks, with
    ``col_tiles = ceil(n_cols / BLOCK_C)`` formed as ``(n_cols - 1) // BLOCK_C + 1`` (n_cols >= 1):
    ``tl.cdiv`` adds ``BLOCK_C - 1`` first, which wraps in int32 for a row within BLOCK_C of 2**31.

    With ``PARTS == 2`` (rows longer than BODY that are not a multiple of it) a kernel runs its
    arithmetic once per part, ``for part in tl.static_range(PARTS)``. With ``body = n_cols // BODY
    * BODY``, part 0 is the tile's columns below ``body`` and part 1 the row's tail, columns
    ``body`` to ``n_cols - 1`` (fewer than BODY), taken as BODY columns from ``body`` by the
    programs of the last column tile (which holds the whole tail: BLOCK_C is a power of two >=
    BODY) and as BODY columns past the row's end, all masked, by the others. Each element of the
    tile is in exactly one part. The body's bound is a multiple of 16 the compiler can see, so its mask is
    uniform over every 16 aligned columns, and where a tensor's rows start 16-byte aligned (the
    data pointer and row stride divisible by 16, as Triton specialises them) its loads and stores
    are 128 bits wide; a mask against ``n_cols`` itself, not a multiple of 16, makes every access
    a scalar one."""
    col_tiles = (n_cols - 1) // BLOCK_C + 1
    col_tile = pid % col_tiles
    rows = (pid // col_tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    if PARTS == 1:
        cols = col_tile.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_row = cols < n_cols
    elif PART == 0:
        cols = col_tile.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_row = cols < n_cols // BODY * BODY
    else:
        start = tl.where(col_tile == col_tiles - 1, n_cols // BODY * BODY, n_cols)  # others: past the row's end
        cols = start.to(tl.int64) + tl.arange(0, BODY)
        in_row = cols < n_cols
    return rows, cols, (rows < n_rows)[:, None] & in_row[None, :]


@triton.jit
def sample_of(rows, n_rows, rows_per_sample):
    """``rows // rows_per_sample`` (int64): the sample of each row. The division runs in 32 bits
    where ``n_rows < 2**31`` (Triton passes such an int as i32, or 1 as a constant): every row
    below ``n_rows`` then fits in int32, and a masked row of the last tile past it may wrap
    harmlessly. Rows past 2**31 divide in 64 bits (a PTX subroutine of some 70 instructions)."""
    if (tl.zeros((), tl.int32) + n_rows).dtype == tl.int64:
        sample = rows // rows_per_sample
    else:
        sample = (rows.to(tl.int32) // rows_per_sample).to(tl.int64)
    return sample


@triton.jit
def at(ptr, stride, rows, cols):
    """Pointers to the elements ``rows x cols`` of a tensor whose rows are ``stride`` apart."""
    return ptr + rows[:, None] * stride + cols[None, :]


class _Plan:
    """What a launch depends on besides the tensors' data pointers and the scalars' values, for
    one key of :func:`_key`: the row layout's integers (``middle``: the row strides, ``n_rows``,
    ``n_cols``; ``after``: for a per-sample kernel, the samples' stride and rows per sample), the
    tiling (``grid``, ``options``) and, after the first launch, the compiled kernel."""

    __slots__ = ("middle", "after", "grid", "options", "compiled", "device", "tail", "get_device", "get_stream",
                 "run", "function", "packed_metadata")

    def __init__(self, middle, after, grid, options):
        self.middle, self.after, self.grid, self.options = middle, after, grid, options
        self.compiled = None


_plans = {}  # _key -> _Plan, or None where a read tensor needs a copy (launched the slow way every time)
MAX_PLANS = 4096  # a process that launches on ever new shapes clears the cache when it holds this many


def _key(kernel, tensors, mutated, samples, constexprs):
    """Everything a launch's layout, tiling and compiled kernel depend on: the kernel, which
    tensors are written, the device of the first tensor (the launch's), each operand's shape,
    strides, dtype and whether its data pointer is 16-byte aligned (Triton specialises on that),
    whether ``samples`` is None, and the constexprs. Integer arguments (strides, ``n_rows``,
    ``n_cols``, ``rows_per_sample``), which Triton specialises on too, follow from the shapes and
    strides; the scalars are runtime fp64 arguments of every kernel."""
    key = [kernel, mutated, tensors[0].get_device()]
    for t in tensors:
        key += (t.shape, t.stride(), t.dtype, not t.data_ptr() & 15)
    if samples is None:
        key.append(None)
    else:
        key += (samples.shape, samples.stride(), samples.dtype, not samples.data_ptr() & 15)
    if constexprs:
        key.append(tuple(constexprs.items()))
    return tuple(key)


def _plan(kernel, tensors, mutated, samples, constexprs, per_sample):
    """``(cached, plan, tensors)`` for a launch not seen before: the plan to launch with, the
    tensors to launch on (a read tensor the kernel cannot address as rows is replaced by a
    copy) and what to cache: the plan, or None where a copy was made (made again every time)."""
    n_rows, n_cols, laid_out, strides = row_layout(tensors, mutated, keep_samples=samples is not None)
    acc = accumulator(laid_out)
    block_r, block_c, num_warps, programs = tiling(n_rows, n_cols, acc.primitive_bitwidth // 8)
    after = () if not per_sample else (0, 1) if samples is None else (samples.stride(0), n_rows // tensors[0].shape[0])
    plan = _Plan((*strides, n_rows, n_cols), after, programs,
                 dict(constexprs, ACC=acc, BLOCK_R=block_r, BLOCK_C=block_c,
                      PARTS=parts(n_rows, n_cols, laid_out, strides), num_warps=num_warps))
    copied = any(a is not b for a, b in zip(laid_out, tensors))
    return (None if copied else plan), plan, laid_out


def _compiled(plan, kernel, result, n_args, tensors):
    """Keep the compiled kernel ``result`` of the plan's first launch, to launch it directly."""
    from triton.compiler import CompiledKernel
    from triton.runtime import driver

    if not isinstance(result, CompiledKernel):
        return  # Triton's interpreter: launched through kernel[grid] every time
    active = driver.active
    plan.tail = tuple(plan.options[name] for name in kernel.arg_names[n_args:])
    plan.device = tensors[0].get_device()
    plan.get_device, plan.get_stream = active.get_current_device, active.get_current_stream
    plan.run, plan.function, plan.packed_metadata = result.run, result.function, result.packed_metadata
    plan.compiled = result


def _launch_compiled(plan, args):
    """Launch ``plan.compiled`` as ``JITFunction.run`` does, less its binding, specialisation and
    cache lookup (the plan's key stands for them): ``CompiledKernel.run`` with the grid, the
    current stream and every argument, the constexprs included. Launch hooks run as Triton runs
    them, when any is set."""
    device = plan.device
    if device >= 0 and plan.get_device() != device:
        with torch.cuda.device(device):
            return _launch_compiled(plan, args)
    stream = plan.get_stream(plan.get_device() if device < 0 else device)
    hooks = knobs.runtime
    enter, exit_ = hooks.launch_enter_hook, hooks.launch_exit_hook
    if getattr(enter, "calls", True) or getattr(exit_, "calls", True):  # a hook is set: run it as Triton does
        metadata = plan.compiled.launch_metadata((plan.grid, 1, 1), stream, *args, *plan.tail)
        plan.run(plan.grid, 1, 1, stream, plan.function, plan.packed_metadata, metadata, enter, exit_, *args,
                 *plan.tail)
    else:
        plan.run(plan.grid, 1, 1, stream, plan.function, plan.packed_metadata, None, None, None, *args, *plan.tail)


def _launch(kernel, tensors, mutated, samples, scalars, constexprs, per_sample):
    key = _key(kernel, tensors, mutated, samples, constexprs)
    plan = _plans.get(key)
    if plan is not None and plan.compiled is not None:
        if per_sample:
            _launch_compiled(plan, (*tensors, *plan.middle, samples, *plan.after, *scalars))
        else:
            _launch_compiled(plan, (*tensors, *plan.middle, *scalars))
        return
    if plan is None:  # not seen before, or a read tensor needs a copy
        cached, plan, tensors = _plan(kernel, tensors, mutated, samples, constexprs, per_sample)
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[key] = cached
    args = (*tensors, *plan.middle, samples, *plan.after, *scalars) if per_sample else \
        (*tensors, *plan.middle, *scalars)
    if tensors[0].is_cuda:
        with torch.cuda.device(tensors[0].device):
            result = kernel[(plan.grid,)](*args, **plan.options)
    else:
        result = kernel[(plan.grid,)](*args, **plan.options)
    if _plans.get(key) is plan:
        _compiled(plan, kernel, result, len(args), tensors)


def launch(kernel, tensors, mutated, *scalars, **constexprs):
    """Launch an elementwise tile kernel whose arguments are ``*tensors, *row_strides, n_rows,
    n_cols, *scalars``, then the constexprs: ``constexprs``, ``ACC``, ``BLOCK_R``, ``BLOCK_C``,
    ``PARTS`` (:func:`parts`).

    The row layout, tiling and compiled kernel are cached under :func:`_key`; a launch seen
    before calls the compiled kernel directly, as inductor's generated launchers do."""
    if tensors[0].numel():
        _launch(kernel, tensors, mutated, None, scalars, constexprs, False)


def launch_per_sample(kernel, tensors, mutated, samples, *scalars, **constexprs):
    """:func:`launch` for a kernel that also takes ``samples, its stride, rows_per_sample`` before
    the scalars: ``samples`` holds one value per index of dim 0 of the tensors (or is None), and
    row ``r`` lies in sample ``r // rows_per_sample``."""
    if tensors[0].numel():
        _launch(kernel, tensors, mutated, samples, scalars, constexprs, True)
