"""The Triton kernels (through the interpreter on CPU) against float64 references."""
import pytest
import torch
import triton
import triton.language as tl

from revtriton import kernels
from revtriton.kernels import layout
from revtriton.blocks import halves

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close_to_reference(out, ref):
    """Rounded once from fp32: within one ulp of the output dtype (the interpreter truncates
    bf16 stores instead of rounding, DESIGN.md)."""
    ulp = torch.finfo(out.dtype).eps * ref.abs().clamp_min(1.0)
    assert ((out.double() - ref).abs() <= ulp).all(), (out.double() - ref).abs().max()


# (shape, dim): split along dim 1 of NCHW and the last dim of (batch, tokens, features),
# with odd sizes that are not multiples of the block.
SPLITS = [((3, 10, 5, 7), 1), ((2, 9, 14), -1), ((5, 6), 0), ((1, 2, 4099), 1), ((300, 2), 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SPLITS)
def test_add_and_sub_update_one_half_in_place(dtype, shape, dim):
    x = torch.randn(shape, dtype=dtype)
    x1, x2 = halves(x, dim)
    untouched = x2.clone()
    b = torch.randn(x1.shape, dtype=dtype)
    expected = x1.double() + b.double()
    kernels.add_(x1, b)
    assert_close_to_reference(x1, expected)
    assert torch.equal(x2, untouched)
    expected = x1.double() - b.double()
    kernels.sub_(x1, b)
    assert_close_to_reference(x1, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SPLITS)
def test_fused_sub_add_rebuilds_and_accumulates_in_one_launch(dtype, shape, dim):
    y, dy = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    (y1, y2), (dy1, dy2) = halves(y, dim), halves(dy, dim)
    g, gy1 = torch.randn(y2.shape, dtype=dtype), torch.randn(y1.shape, dtype=dtype)
    ref_y2, ref_dy1 = y2.double() - g.double(), dy1.double() + gy1.double()
    y1_before, dy2_before = y1.clone(), dy2.clone()
    kernels.sub_add_(y2, g, dy1, gy1)
    assert_close_to_reference(y2, ref_y2)
    assert_close_to_reference(dy1, ref_dy1)
    assert torch.equal(y1, y1_before) and torch.equal(dy2, dy2_before)


def test_mixed_dtypes_accumulate_in_fp32():
    """A fp32 stream updated with a bf16 F output (autocast) stays exact in fp32."""
    a = torch.randn(4, 33)
    b = torch.randn(4, 33, dtype=torch.bfloat16)
    expected = a.double() + b.double()
    kernels.add_(a, b)
    assert_close_to_reference(a, expected)


def test_float64_is_computed_in_float64():
    a, b = torch.randn(7, 9, dtype=torch.float64), torch.randn(7, 9, dtype=torch.float64)
    expected = a + b
    kernels.add_(a, b)
    assert torch.equal(a, expected)


def test_non_contiguous_read_only_operand_is_handled():
    a = torch.randn(6, 5)
    b = torch.randn(5, 6).t()  # transposed: no unit stride along the last dim
    expected = a.double() + b.double()
    kernels.add_(a, b)
    assert_close_to_reference(a, expected)


def test_strided_mutated_operand_is_handled():
    base = torch.randn(4, 6, 8)
    a = base[:, ::2, :]  # rows of 8 with a row stride of 16
    b = torch.randn(a.shape)
    expected = a.double() + b.double()
    kernels.add_(a, b)
    assert_close_to_reference(a, expected)


def test_a_written_tensor_is_addressed_in_its_own_memory_order():
    """A transposed written tensor is dense in its own order: the contiguous operand read with
    it is copied into that order, once, and the result is exact."""
    a = torch.randn(5, 6).t()
    b = torch.randn(6, 5)
    expected = a.double() + b.double()
    kernels.add_(a, b)
    assert_close_to_reference(a, expected)
    n_rows, n_cols, (_, copy), strides = layout.row_layout([a, b], (0,))
    assert (n_rows, n_cols, strides) == (1, 30, [0, 0]) and copy.stride() == a.stride()


def test_written_tensors_of_two_memory_layouts_are_refused_with_a_clear_error():
    a, c = torch.randn(6, 5), torch.randn(5, 6).t()
    with pytest.raises(ValueError, match=r"strided rows, in the memory order of the first one \(strides \(5, 1\)\); "
                                         r"got shape \(6, 5\) with strides \(1, 6\)"):
        kernels.sub_add_(a, torch.randn(6, 5), c, torch.randn(6, 5))


def test_a_read_tensor_that_limits_a_written_ones_rows_is_copied():
    """``a`` is rows of 12 elements 24 apart; ``b`` has unit stride along its last dim only, so
    rows of 4 would not be evenly spaced in ``a``: ``b`` is copied, not ``a`` refused."""
    a = torch.randn(2, 6, 4)[:, :3]
    b = torch.randn(2, 3, 8)[..., :4]
    expected = a.double() + b.double()
    assert layout.row_layout([a, b], (0,))[:2] == (2, 12)
    kernels.add_(a, b)
    assert_close_to_reference(a, expected)


def _channels_last_halves():
    """The halves of a chain's stream of a channels_last input, and a conv's output on one."""
    x = torch.randn(2, 6, 3, 5).to(memory_format=torch.channels_last)
    stream = torch.stack(halves(x, 1))
    f = torch.nn.Conv2d(3, 3, 1)(stream[1])
    assert stream[0].is_contiguous(memory_format=torch.channels_last) and not stream[0].is_contiguous()
    assert f.is_contiguous(memory_format=torch.channels_last)
    return stream, f


@pytest.mark.parametrize("keep_samples", [False, True])
def test_channels_last_halves_are_addressed_as_they_are_without_a_copy(keep_samples):
    stream, f = _channels_last_halves()
    tensors = [stream[0], stream[1], f.detach()]
    n_rows, n_cols, addressed, strides = layout.row_layout(tensors, (0, 1), keep_samples=keep_samples)
    assert all(a is t for a, t in zip(addressed, tensors))
    assert (n_rows, n_cols, strides) == ((2, 45, [45, 45, 45]) if keep_samples else (1, 90, [0, 0, 0]))


@pytest.mark.parametrize("make", [
    lambda: halves(torch.randn(2, 6, 3, 5).to(memory_format=torch.channels_last), 1),
    lambda: halves(torch.randn(3, 5, 2, 6).permute(2, 3, 0, 1), 1),
    lambda: halves(torch.randn(2, 16, 5).transpose(1, 2), -1),
], ids=["channels_last", "permuted-4d", "transposed-tokens"])
def test_halves_of_any_memory_format_are_computed_in_place(make):
    x1, x2 = make()
    b = torch.randn(x1.shape)
    x2_before, expected = x2.clone(), x1.double() + b.double()
    kernels.add_(x1, b)
    assert_close_to_reference(x1, expected)
    assert torch.equal(x2, x2_before)


def test_empty_tensors_are_a_no_op():
    a = torch.empty(0, 4)
    kernels.sub_add_(a, a.clone(), a.clone(), a.clone())
    assert a.shape == (0, 4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_reference(dtype):
    y = torch.randn(8, 64, 33, 17, device="cuda", dtype=dtype)
    y1, y2 = halves(y, 1)
    g = torch.randn(y2.shape, device="cuda", dtype=dtype)
    ref = y2.double() - g.double()
    kernels.sub_add_(y2, g, y1, g)
    assert_close_to_reference(y2, ref)


@pytest.mark.cuda
def test_cuda_64_bit_offsets():
    """A half of over 2**31 elements: its tail lies beyond any 32-bit offset."""
    n = 2**31 + 4096
    try:
        y = torch.zeros(2, n, device="cuda", dtype=torch.float16)
        b = torch.ones(1, n, device="cuda", dtype=torch.float16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for two 2**31-element halves")
    y1, y2 = halves(y, 0)
    kernels.add_(y2, b)
    assert y2[0, -8:].eq(1).all() and y2[0, :8].eq(1).all() and y1[0, -8:].eq(0).all()


@pytest.mark.parametrize("n_rows,n_cols", [(1, 2**40), (2**33, 1), (2**20, 3), (7, 4097), (2**20, 2**20 + 1)])
@pytest.mark.parametrize("acc_bytes", [4, 8])
def test_tiles_keep_the_grid_far_below_its_limit(n_rows, n_cols, acc_bytes):
    """A tile holds whole short rows or a piece of a long row, at least half full, so a launch needs
    at most numel / 1024 + 1 programs: the halves of an (N, 2) tensor no longer take one each."""
    block_r, block_c, num_warps, programs = layout.tiling(n_rows, n_cols, acc_bytes)
    assert block_r * block_c <= layout.TILE_BYTES // acc_bytes and 1 <= num_warps <= 8
    assert programs == triton.cdiv(n_rows, block_r) * triton.cdiv(n_cols, block_c) <= layout.MAX_PROGRAMS
    assert programs <= n_rows * n_cols // 1024 + 1


def test_short_rows_are_stacked_into_one_tile():
    assert layout.tiling(4096, 1) == (4096, 1, 8, 1)
    assert layout.tiling(3, 5) == (4, 8, 1, 1)


def test_a_grid_beyond_the_launch_limit_is_refused():
    with pytest.raises(ValueError, match="need 4294967296 programs; a launch takes at most 2147483647"):
        layout.tiling(2**44, 1)


@triton.jit
def _tiles_of(pids_ptr, rows_ptr, cols_ptr, mask_ptr, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Store the rows, columns and mask of tile ``pids[i]`` (as ``tile`` computes them) at ``i``."""
    i = tl.program_id(0)
    rows, cols, mask = layout.tile_of(tl.load(pids_ptr + i), n_rows, n_cols, BLOCK_R, BLOCK_C)
    tl.store(rows_ptr + i * BLOCK_R + tl.arange(0, BLOCK_R), rows)
    tl.store(cols_ptr + i * BLOCK_C + tl.arange(0, BLOCK_C), cols)
    tl.store(mask_ptr + i * BLOCK_R * BLOCK_C + tl.arange(0, BLOCK_R)[:, None] * BLOCK_C
             + tl.arange(0, BLOCK_C)[None, :], mask.to(tl.int8))


def test_last_tiles_of_a_row_near_2_31_elements_cover_exactly_its_last_columns():
    """Rows of 2**31 - 100 fp16 elements: ceil(n_cols / BLOCK_C) formed as n_cols + BLOCK_C - 1
    wraps in int32, and the last programs of such a launch re-added tile 0 instead of writing the
    row's end. The last programs are replayed here without allocating the rows."""
    n_rows, n_cols = 2, 2**31 - 100
    acc_bytes = layout.accumulator([torch.empty(0, dtype=torch.float16)]).primitive_bitwidth // 8
    block_r, block_c, _, programs = layout.tiling(n_rows, n_cols, acc_bytes)
    col_tiles = triton.cdiv(n_cols, block_c)
    assert block_r == 1 and programs == n_rows * col_tiles
    pids = torch.tensor([0, col_tiles - 2, col_tiles - 1, programs - 2, programs - 1], dtype=torch.int32)
    rows = torch.empty(len(pids), block_r, dtype=torch.int64)
    cols = torch.empty(len(pids), block_c, dtype=torch.int64)
    mask = torch.empty(len(pids), block_r, block_c, dtype=torch.int8)
    _tiles_of[(len(pids),)](pids, rows, cols, mask, n_rows, n_cols, BLOCK_R=block_r, BLOCK_C=block_c)
    assert rows.flatten().tolist() == [0, 0, 0, 1, 1]
    second_last, last = (col_tiles - 2) * block_c, (col_tiles - 1) * block_c
    starts = torch.tensor([0, second_last, last, second_last, last])
    assert torch.equal(cols, starts[:, None] + torch.arange(block_c))
    assert torch.equal(mask[:, 0].bool(), cols < n_cols)
    for end in (cols[1:3][mask[1:3, 0].bool()], cols[3:][mask[3:, 0].bool()]):  # rows 0 and 1
        assert torch.equal(end, torch.arange(second_last, n_cols))


def test_per_sample_rows_never_span_two_samples():
    """Halves split along dim 2: rows are (sample, channel) pairs, four rows to a sample."""
    x = torch.randn(3, 4, 6, 5)
    (n_rows, n_cols, _, strides), kept = layout.row_layout([x[:, :, 3:]], (0,)), \
        layout.row_layout([x[:, :, 3:]], (0,), keep_samples=True)
    assert (n_rows, n_cols) == (12, 15) and kept[:2] == (12, 15)
    flat = torch.randn(3, 10)
    assert layout.row_layout([flat], (0,))[:2] == (1, 30)
    assert layout.row_layout([flat], (0,), keep_samples=True)[:2] == (3, 10)


@pytest.mark.cuda
def test_cuda_halves_of_n_by_2_beyond_2_31_rows():
    """The halves of an (N, 2) tensor are rows of one element: with N > 2**31 one program per row
    could not launch; stacked into tiles, N / 4096 programs do."""
    n = 2**31 + 8
    try:
        x = torch.zeros(n, 2, device="cuda")
        b = torch.ones(n, 1, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a (2**31 + 8, 2) fp32 tensor")
    x1, x2 = halves(x, 1)
    kernels.add_(x2, b)
    assert x2[-8:].eq(1).all() and x2[:8].eq(1).all() and x1[-8:].eq(0).all()


def _c(value):
    """A float argument as the kernels hold it: rounded to fp32 (``tl.full((), value, ACC)``)."""
    return torch.tensor(value, dtype=torch.float32)


def _soft_clamp_tanh(s, clamp):
    """tanh(s / clamp) as the affine kernels form it: one exp of -2|x|, x = s * (1 / clamp)."""
    x = s * (1 / _c(clamp))
    z = torch.exp(-2 * x.abs())
    return torch.where(x < 0, -(1 - z) / (1 + z), (1 - z) / (1 + z))


def _affine_backward(y, dy, s, t, ld_grad, clamp):
    th = _soft_clamp_tanh(s, clamp)
    scale, shifted = torch.exp(_c(clamp) * th), y - t
    return {0: shifted * torch.exp(-_c(clamp) * th), 1: dy * scale,
            4: (dy * shifted + ld_grad[:, None]) * (1 - th * th)}


def _momentum_forward(x, v, f, beta):
    v = _c(beta) * v + _c(1 - beta) * f
    return {0: x + v, 1: v}


# Each op's tensor operands (same shape), its other arguments, and its arithmetic in fp32 as
# the kernel does it: the values of the written operands by index.
OPS = {
    "coupling_forward": (2, (), lambda a, b: {0: a + b}),
    "coupling_inverse": (2, (), lambda a, b: {0: a - b}),
    "coupling_backward": (4, (), lambda a, b, c, d: {0: a - b, 2: c + d}),
    "affine_forward": (3, (None, 2.0), lambda x, s, t: {0: x * torch.exp(2.0 * _soft_clamp_tanh(s, 2.0)) + t}),
    "affine_inverse": (3, (2.0,), lambda y, s, t: {0: (y - t) / torch.exp(2.0 * _soft_clamp_tanh(s, 2.0))}),
    "affine_backward": (5, (torch.linspace(-1, 1, 4), 2.0),
                        lambda y, dy, s, t, ds: _affine_backward(y, dy, s, t, torch.linspace(-1, 1, 4), 2.0)),
    "momentum_forward": (3, (0.9,), lambda x, v, f: _momentum_forward(x, v, f, 0.9)),
    "momentum_inverse": (2, (0.9,), lambda v, f: {0: (v - _c(0.1) * f) * (1 / _c(0.9))}),
    "momentum_backward_x": (4, (0.9,), lambda x, v, dx, dv: {0: x - v, 3: _c(0.1) * (dx + dv)}),
    "momentum_backward_v": (5, (0.9,), lambda v, f, dx, fx, dv: {0: (v - _c(0.1) * f) * (1 / _c(0.9)), 2: dx + fx,
                                                                   4: dv * (_c(0.9) / _c(0.1))}),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", OPS)
def test_half_precision_results_are_the_fp32_computation_rounded_once(name, dtype):
    """The kernels accumulate in fp32 (DESIGN.md): each written operand equals the kernel's
    arithmetic done in fp32 and rounded once, bitwise in fp16 and within one bf16 ulp in bf16
    (the interpreter truncates bf16 stores). Arithmetic in fp16 would round at each step."""
    n_tensors, extra, fp32 = OPS[name]
    tensors = [torch.randn(4, 33).to(dtype) for _ in range(n_tensors)]
    expected = fp32(*[t.float() for t in tensors])
    getattr(torch.ops.revtriton, name)(*tensors, *extra)
    for i, value in expected.items():
        if dtype == torch.float16:
            assert torch.equal(tensors[i], value.to(dtype)), i
        else:
            assert ((tensors[i].float() - value).abs() <= torch.finfo(dtype).eps * value.abs()).all(), i


# Row lengths around a split row's body (BODY = 16 elements) and around the largest tile's
# columns (4096 in fp32, fp16 and bf16; 2048 in fp64)
ROW_LENGTHS = [1, 15, 16, 17, 31, 33, 2047, 2049, 4095, 4097]
PAD = 4112  # a row stride that is a multiple of 16: every row of a padded tensor starts 16-byte aligned


def _padded(n_rows, n_cols, dtype=torch.float32, values=torch.randn):
    """``(rows, base)``: ``n_rows`` rows of ``n_cols`` elements, PAD apart, viewed in ``base``."""
    base = values(n_rows, PAD, dtype=dtype)
    return base[:, :n_cols], base


@pytest.mark.parametrize("n_rows", [1, 5])
@pytest.mark.parametrize("n_cols", ROW_LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_of_any_length_are_computed_once_each_and_exactly(dtype, n_cols, n_rows):
    """A row longer than 16 elements but not a multiple of 16, in rows that start 16-byte aligned,
    runs as a body and a tail (layout.tile_of): adding ones to zeros touches every element of the
    rows exactly once and nothing past them; sums and the momentum step equal PyTorch's bitwise."""
    split = n_cols > 16 and n_cols % 16 != 0
    assert layout.parts(n_rows, n_cols, [_padded(n_rows, n_cols, dtype)[0]], [PAD]) == (2 if split else 1)
    (a, base), (b, _) = _padded(n_rows, n_cols, dtype, torch.zeros), _padded(n_rows, n_cols, dtype, torch.ones)
    kernels.add_(a, b)
    assert torch.equal(a, torch.ones_like(a)) and not base[:, n_cols:].any()
    (a, _), (b, _), (c, _), (d, base) = (_padded(n_rows, n_cols, dtype) for _ in range(4))
    expected, after = (a - b, c + d), base[:, n_cols:].clone()
    kernels.sub_add_(a, b, c, d)
    assert torch.equal(a, expected[0]) and torch.equal(c, expected[1]) and torch.equal(base[:, n_cols:], after)
    if dtype == torch.float64:  # beta and 1 - beta are exact fp64 arguments
        (x, _), (v, _), (f, _) = (_padded(n_rows, n_cols, dtype) for _ in range(3))
        expected_v = 0.9 * v + (1 - 0.9) * f
        expected_x = x + expected_v
        kernels.momentum_forward_(x, v, f, 0.9)
        assert torch.equal(v, expected_v) and torch.equal(x, expected_x)


@pytest.mark.parametrize("n_cols", [1, 15, 17, 31, 4095, 4097])
@pytest.mark.parametrize("name", OPS)
def test_every_op_computes_split_rows_as_it_computes_whole_ones(name, n_cols):
    """fp16, 4 rows of ``n_cols`` elements: rows PAD apart start aligned, so rows longer than 16
    but not a multiple of it run as a body and a tail; the same values in rows that start 2 bytes
    off (no tensor aligned: one part) give bitwise the same results, within one fp16 ulp of the
    fp32 arithmetic (not bitwise: the interpreter's exp is numpy's, the reference's torch's, and
    one in a few thousand rounds the other way), and the padding past each row is kept."""
    n_tensors, extra, fp32 = OPS[name]
    padded = [_padded(4, n_cols, torch.float16) for _ in range(n_tensors)]
    aligned = [rows for rows, _ in padded]
    offset = [torch.zeros(4, PAD + 1, dtype=torch.float16)[:, 1:n_cols + 1].copy_(t) for t in aligned]
    assert layout.parts(4, n_cols, aligned, [PAD] * n_tensors) == (2 if n_cols > 16 and n_cols % 16 else 1)
    assert layout.parts(4, n_cols, offset, [PAD + 1] * n_tensors) == 1
    pads = [base[:, n_cols:].clone() for _, base in padded]
    expected = fp32(*[t.float() for t in aligned])
    for tensors in (aligned, offset):
        getattr(torch.ops.revtriton, name)(*tensors, *extra)
    for i, value in expected.items():
        assert torch.equal(aligned[i], offset[i]), i
        assert_close_to_reference(aligned[i], value.double())
    assert all(torch.equal(base[:, n_cols:], pad) for (_, base), pad in zip(padded, pads))


@pytest.mark.parametrize("n_cols", ROW_LENGTHS)
def test_the_log_det_of_split_rows_sums_body_and_tail(n_cols):
    """fp64: ``ld[i]`` gains the sum of s_c over sample i's row, its body's and its tail's parts."""
    (x, _), (s, _), (t, _) = (_padded(3, n_cols, torch.float64) for _ in range(3))
    ld = torch.zeros(3, dtype=torch.float64)
    s_c = 2.0 * torch.tanh(s / 2.0)
    expected = x * torch.exp(s_c) + t
    kernels.affine_forward_(x, s, t, ld, 2.0)
    torch.testing.assert_close(x, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ld, s_c.sum(1), rtol=1e-13, atol=1e-13)


@triton.jit
def _samples_of(rows_ptr, out_ptr, n_rows, rows_per_sample, BLOCK: tl.constexpr):
    rows = tl.load(rows_ptr + tl.arange(0, BLOCK))
    tl.store(out_ptr + tl.arange(0, BLOCK), layout.sample_of(rows, n_rows, rows_per_sample))


@pytest.mark.parametrize("n_rows", [2**31 - 1, 2**31 + 9])
def test_a_rows_sample_is_exact_on_either_side_of_2_31_rows(n_rows):
    """``sample_of`` divides in 32 bits where n_rows < 2**31 (Triton passes it as i32) and in 64
    bits past it; rows near n_rows and near 2**31 get ``row // rows_per_sample`` either way."""
    rows = torch.tensor([0, 1, 2**31 - 9, 2**31 - 2, n_rows - 3, n_rows - 2, n_rows - 1, n_rows - 1])
    out = torch.empty_like(rows)
    for rows_per_sample in (1, 3, 2**30):
        _samples_of[(1,)](rows, out, n_rows, rows_per_sample, BLOCK=len(rows))
        assert torch.equal(out, rows // rows_per_sample), rows_per_sample


def test_a_changed_stride_dtype_or_alignment_misses_the_launch_cache_and_stays_correct():
    """Each launch is cached under its shapes, strides, dtypes and 16-byte alignment: a launch
    that differs in any of them makes its own plan and computes its own right values."""
    base = torch.randn(4, 66)
    variants = {
        "contiguous": lambda: (base[:, :64].contiguous(), base[:, 1:65].contiguous()),
        "strided": lambda: (base[:, :64].clone(), base[:, :64]),  # b's rows 66 apart
        "unaligned": lambda: (base[:, :64].contiguous(), base.flatten()[1:257].view(4, 64)),  # b 4 bytes off
        "fp64": lambda: (base[:, :64].double(), base[:, 1:65].double()),
        "shape": lambda: (base[:, :64].reshape(8, 32).clone(), base[:, 1:65].reshape(8, 32)),
    }
    keys = set()
    for _ in range(2):  # the second round hits each plan the first made
        for name, make in variants.items():
            a, b = make()
            expected = a.double() + b.double()
            key = layout._key(kernels.additive._add_kernel, (a, b), (0,), None, {})
            keys.add(key)
            kernels.add_(a, b)
            torch.testing.assert_close(a.double(), expected, msg=name)
            assert layout._plans[key] is not None, name
    assert len(keys) == len(variants)


def test_a_read_tensor_that_needs_a_copy_is_copied_on_every_launch():
    """Such a launch's plan is not cached (the copy is of the values at the launch)."""
    a = torch.zeros(4, 3, 5).permute(1, 0, 2)  # written in its own memory order
    b = torch.randn(5, 3, 4).permute(1, 2, 0)  # read: no row layout in a's order
    key = layout._key(kernels.additive._add_kernel, (a, b), (0,), None, {})
    expected = torch.zeros(3, 4, 5)
    for _ in range(2):
        kernels.add_(a, b)
        expected += b
        torch.testing.assert_close(a, expected)
        b.add_(1)  # the same tensor with new values: copied again
    assert layout._plans[key] is None


_STUB_LAUNCHES = r"""
import json, torch
from triton.runtime.jit import JITFunction
from bench import host
import revtriton
from revtriton import kernels
from revtriton.kernels import layout

calls, runs = [], []
class Launcher(host._Launcher):
    def __call__(self, *args):
        calls.append(args)
class Driver(host.StubDriver):
    launcher_cls = Launcher
jit_run = JITFunction.run
def counted(self, *args, **kwargs):
    runs.append(self)
    return jit_run(self, *args, **kwargs)
JITFunction.run = counted

def same(x, y):
    return x is y if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) else x == y

out = {}
with host.stub_driver():
    from triton.runtime import driver
    driver.set_active(Driver())
    for name, (op, args) in host.calls().items():
        del calls[:], runs[:]
        layout._plans.clear()  # ops that share a kernel would share a plan
        with torch.no_grad():
            op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)  # through JITFunction.run
            op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)  # the compiled kernel, direct
        first, second = calls
        out[name] = {"jit_runs": len(runs), "n": len(first),
                     "same": len(first) == len(second) and all(same(x, y) for i, (x, y) in enumerate(zip(first, second))
                                                                if i not in (6, 7, 8)),
                     "hooks": [second[i] for i in (6, 7, 8)]}
    # a 4-byte offset operand is specialised otherwise: a new compile, not the aligned plan's kernel
    base = torch.randn(1024 + 1)
    a, b = torch.randn(1024), base[:1024]
    kernels.add_(a, b)
    aligned = layout._plans[layout._key(kernels.additive._add_kernel, (a, b), (0,), None, {})].compiled
    b = base[1:]
    del runs[:]
    kernels.add_(a, b)
    unaligned = layout._plans[layout._key(kernels.additive._add_kernel, (a, b), (0,), None, {})].compiled
    out["alignment"] = {"jit_runs": len(runs), "distinct": aligned is not unaligned}
print(json.dumps(out))
"""


def test_a_cached_launch_passes_the_launcher_what_the_jit_passes(tmp_path):
    """Compiled for sm_90 with Triton's driver stubbed (bench/host.py): for every op, the
    second, cached launch calls the driver's launcher with the very arguments the first launch,
    through ``JITFunction.run``, passed it (the launch hooks aside: none is set, so None), and
    runs no JIT; a differently aligned operand compiles a kernel of its own."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _STUB_LAUNCHES], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=root), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    alignment = out.pop("alignment")
    assert alignment == {"jit_runs": 1, "distinct": True}
    for name, r in out.items():
        assert r["jit_runs"] == 1 and r["same"] and r["hooks"] == [None, None, None], (name, r)
