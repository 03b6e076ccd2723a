"""The affine coupling: kernels against float64 references, ops, the block's gradients and inverse."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.library import opcheck

import revtriton as rt
from helpers import DEVICES, loss_of, mlp, rel_err
from revtriton import kernels
from revtriton.blocks import halves
from test_chain import _gradcheck_module
from test_kernels import DTYPES, SPLITS

ULPS = {torch.float32: 8, torch.float16: 1, torch.bfloat16: 1}  # fp32: exp and tanh add a few ulps


def assert_within_ulps(out, ref, scale):
    """``|out - ref| <= ULPS[dtype]`` ulps of ``out``'s dtype relative to ``scale`` (the size of
    the terms the kernel combined, at least 1): fp16/bf16 are rounded once from fp32."""
    tol = ULPS[out.dtype] * torch.finfo(out.dtype).eps * scale.clamp_min(1.0)
    err = (out.double() - ref).abs()
    assert (err <= tol).all(), (err - tol).max()


def assert_same_gradients(chain, twin, tol=1e-5, inputs=()):
    """Every parameter of ``chain`` and each input ``(x, x_twin)`` has its ``twin``'s gradient."""
    for x, x_twin in inputs:
        assert rel_err(x.grad, x_twin.grad) <= tol
    for (name, p), q in zip(chain.named_parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) <= tol, name


def assert_inverse_is_exact(chain, x):
    """``chain.inverse(chain(x))`` is ``x`` up to rounding: 1e-5 in fp32, 1e-13 in fp64."""
    for x, tol in ((x, 1e-5), (x.double(), 1e-13)):
        chain.to(x.dtype)
        with torch.no_grad():
            assert rel_err(chain.inverse(chain(x)), x) <= tol


def check_both_cpu_paths(op, args, monkeypatch):
    """The op's Triton kernel (interpreter) and its PyTorch reference write the same values."""
    results = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        op(*copies)
        results.append([c for c in copies if isinstance(c, torch.Tensor)])
    for kernel, reference in zip(*results):
        torch.testing.assert_close(kernel, reference)


def _affine_reference(x, s, t, clamp):
    """float64: ``(x * exp(s_c) + t, s_c)``."""
    s_c = clamp * torch.tanh(s.double() / clamp)
    return x.double() * torch.exp(s_c) + t.double(), s_c


def _operands(shape, dim, dtype, device="cpu"):
    """The second half along ``dim`` of a random tensor of ``shape`` (a view), and a raw
    log-scale and a shift shaped like it (contiguous)."""
    x = torch.randn(shape, dtype=dtype).to(device)
    _, x2 = halves(x, dim)
    s, t = (3 * torch.randn(x2.shape, dtype=dtype)).to(device), torch.randn(x2.shape, dtype=dtype).to(device)
    return x2, s, t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SPLITS + [((6, 2), 1)], ids=str)
def test_forward_kernel_and_its_per_sample_log_det(dtype, shape, dim):
    x2, s, t = _operands(shape, dim, dtype)
    ref, s_c = _affine_reference(x2, s, t, 2.0)
    ld = torch.zeros(x2.shape[0])
    scale = (x2.double() * s_c.exp()).abs() + t.double().abs()
    kernels.affine_forward_(x2, s, t, ld, 2.0)
    assert_within_ulps(x2, ref, scale)
    torch.testing.assert_close(ld.double(), s_c.reshape(len(ld), -1).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SPLITS[:2] + [((6, 2), 1)], ids=str)
def test_inverse_kernel(dtype, shape, dim):
    y2, s, t = _operands(shape, dim, dtype)
    s_c = 2.0 * torch.tanh(s.double() / 2.0)
    ref = (y2.double() - t.double()) * torch.exp(-s_c)
    scale = (y2.double().abs() + t.double().abs()) * torch.exp(-s_c)
    kernels.affine_inverse_(y2, s, t, 2.0)
    assert_within_ulps(y2, ref, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SPLITS[:2] + [((6, 2), 1)], ids=str)
def test_backward_kernel_rebuilds_and_differentiates_in_one_launch(dtype, shape, dim):
    y2, s, t = _operands(shape, dim, dtype)
    dy = torch.randn(shape, dtype=dtype)
    dy1, dy2 = halves(dy, dim)
    dy1_before = dy1.clone()
    ld_grad = torch.randn(y2.shape[0])
    per_sample = ld_grad.view(-1, *[1] * (y2.ndim - 1)).double()
    th = torch.tanh(s.double() / 1.5)
    scale, shifted = torch.exp(1.5 * th), y2.double() - t.double()
    ref_x2, ref_dx2 = shifted / scale, dy2.double() * scale
    ref_ds = (dy2.double() * shifted + per_sample) * (1 - th * th)
    magnitudes = y2.double().abs() + t.double().abs()
    ds_scale = dy2.double().abs() * magnitudes + per_sample.abs()
    ds = torch.empty(y2.shape, dtype=dtype)
    kernels.affine_backward_(y2, dy2, s, t, ds, ld_grad, 1.5)
    assert_within_ulps(y2, ref_x2, magnitudes / scale)
    assert_within_ulps(dy2, ref_dx2, ref_dx2.abs())
    assert_within_ulps(ds, ref_ds, ds_scale)
    assert torch.equal(dy1, dy1_before)


def test_float64_kernels_compute_in_float64():
    x2, s, t = _operands((4, 6), 1, torch.float64)
    ref, s_c = _affine_reference(x2, s, t, 0.7)  # 0.7 is not an fp32 number
    ld = torch.zeros(4, dtype=torch.float64)
    kernels.affine_forward_(x2, s, t, ld, 0.7)
    torch.testing.assert_close(x2, ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ld, s_c.sum(1), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", [
    ((5, 7), None),     # contiguous operands are one row of the kernel: one block holds all 5 samples
    ((3, 4, 50), None),
    ((2, 5000), None),  # blocks of 4096: sample 0 spans two blocks, the second block holds both samples
    ((6, 2), 1),        # the (6, 1) half of a (6, 2) tensor: rows of one element
    ((4, 6, 9), 1),     # the (4, 3, 9) half: one strided row per sample
], ids=str)
def test_log_det_is_the_per_sample_sum_up_to_fp32_rounding(shape, dim, device):
    """The forward kernel adds each sample's sum of s_c to ``ld`` with atomic adds, whose order
    (and so the last bits) varies from run to run on a GPU: checked against float64 within
    1e-5 per element of the sample plus 1e-5 of its sum of |s_c|. An fp32 s_c is off by a few
    ulps of ``clamp`` (a GPU's approximate exp included) and a few thousand fp32 additions in
    any order by far less than 1e-5 of the sum; a block lost or added twice is far outside."""
    if dim is None:
        x, s, t = (torch.randn(shape).to(device) for _ in range(3))
    else:
        x, s, t = _operands(shape, dim, torch.float32, device)
    ld = torch.ones(shape[0], device=device)
    kernels.affine_forward_(x, s, t, ld, 2.0)
    s_c = rt.ops.soft_clamp(s.cpu().double(), 2.0)
    error = (ld.cpu().double() - 1 - rt.ops.per_sample_sum(s_c)).abs()
    assert (error <= 1e-5 * (s[0].numel() + rt.ops.per_sample_sum(s_c.abs()))).all(), error


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_operands_may_be_strided(device):
    """Autograd hands the log-det gradient in expanded (stride 0), e.g. the gradient of a sum."""
    x, s, t = _operands((4, 6), 1, torch.float32, device)
    ld = torch.zeros(8, device=device)[::2]
    kernels.affine_forward_(x, s, t, ld, 2.0)
    torch.testing.assert_close(ld, rt.ops.per_sample_sum(rt.ops.soft_clamp(s, 2.0)))
    th = torch.tanh(s / 2.0)
    expected = (x - t + 0.5) * (1 - th * th)  # dy2 = 1, ld_grad = 0.5 for every sample
    ds = torch.empty(s.shape, device=device)
    kernels.affine_backward_(x, torch.ones(s.shape, device=device), s, t, ds,
                             torch.tensor(0.5, device=device).expand(4), 2.0)
    torch.testing.assert_close(ds, expected)


def _op_args(name, shape=(3, 5), per_sample=True):
    def r():
        return torch.randn(shape)

    n = shape[0]
    return {
        "affine_forward": lambda: (r(), r(), r(), torch.zeros(n) if per_sample else None, 1.5),
        "affine_inverse": lambda: (r(), r(), r(), 1.5),
        "affine_backward": lambda: (r(), r(), r(), r(), torch.empty(shape), torch.randn(n) if per_sample else None, 1.5),
        "affine_inverse_backward": lambda: (r(), r(), r(), torch.empty(shape), torch.randn(n) if per_sample else None,
                                            1.5),
    }[name]()


AFFINE_OPS = ["affine_forward", "affine_inverse", "affine_backward", "affine_inverse_backward"]


@pytest.mark.parametrize("name", AFFINE_OPS)
@pytest.mark.parametrize("per_sample", [True, False], ids=["log-det", "no-log-det"])
def test_opcheck(name, per_sample):
    opcheck(getattr(torch.ops.revtriton, name), _op_args(name, per_sample=per_sample))


@pytest.mark.parametrize("name", AFFINE_OPS)
def test_both_cpu_paths_compute_the_same(name, monkeypatch):
    check_both_cpu_paths(getattr(torch.ops.revtriton, name), _op_args(name, shape=(4, 3, 5)), monkeypatch)


def test_a_per_sample_operand_of_the_wrong_shape_is_a_clear_error():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"ld has shape \(4,\); expected \(3,\), one value per index of dim 0"):
        torch.ops.revtriton.affine_forward(x, x.clone(), x.clone(), torch.zeros(4), 2.0)


def _affine_chain(depth, d=4, **kwargs):
    return rt.ReversibleSequential(*[rt.AffineBlock(mlp(d), mlp(d), dim=-1, clamp=1.5, swap=i % 2 == 1)
                                     for i in range(depth)], **kwargs)


def affine_twin(chain):
    """A deep copy of ``chain`` as plain autograd ops (chunk, tanh, exp, cat): ``(y, log_det)``."""
    twin = copy.deepcopy(chain)

    def run(x):
        log_det = 0
        for block in twin:
            first, second = x.chunk(2, dim=block.dim)
            x1, x2 = (second, first) if block.swap else (first, second)
            s = block.clamp * torch.tanh(block.s(x1) / block.clamp)
            y2 = x2 * torch.exp(s) + block.t(x1)
            log_det = log_det + s.flatten(1).sum(1)
            x = torch.cat([y2, x1] if block.swap else [x1, y2], dim=block.dim)
        return x, log_det

    return twin, run


def test_gradcheck_float64_with_log_det():
    chain = rt.ReversibleSequential(*[rt.AffineBlock(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), nn.Linear(2, 2),
                                                     dim=-1, clamp=1.5, swap=swap) for swap in (False, True)],
                                    log_det=True)
    _gradcheck_module(chain.double(), torch.randn(2, 4, dtype=torch.float64, requires_grad=True))


def test_gradcheck_float64_when_s_and_t_return_their_input():
    """The vjp of an identity hands back the gradient buffer itself: it is read before it changes."""
    chain = rt.ReversibleSequential(rt.AffineBlock(nn.Identity(), nn.Identity(), dim=-1, clamp=1.5), log_det=True)
    _gradcheck_module(chain, torch.randn(3, 4, dtype=torch.float64, requires_grad=True))


def test_gradients_with_log_det_match_eager_at_depth_16():
    chain = _affine_chain(16, log_det=True)
    twin, eager = affine_twin(chain)
    x = torch.randn(3, 2, 8, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    w = torch.tensor([1.0, -2.0, 0.5])
    y, log_det = chain(x)
    y_twin, log_det_twin = eager(x_twin)
    assert rel_err(log_det, log_det_twin) <= 1e-5
    (loss_of(y) + (w * log_det).sum()).backward()
    (loss_of(y_twin) + (w * log_det_twin).sum()).backward()
    assert_same_gradients(chain, twin, inputs=[(x, x_twin)])


def test_inverse_is_exact_up_to_rounding_at_depth_16():
    assert_inverse_is_exact(_affine_chain(16), torch.randn(3, 2, 8))


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["huge-positive", "huge-negative"])
def test_extreme_scales_stay_finite(sign):
    block = rt.AffineBlock(lambda x: sign * 1e30 * (x.abs() + 1), nn.Linear(3, 3), dim=-1, clamp=2.0)
    chain = rt.ReversibleSequential(block, log_det=True)
    x = torch.randn(4, 6, requires_grad=True)
    y, log_det = chain(x)
    assert torch.isfinite(y).all()
    assert torch.equal(log_det, torch.full((4,), sign * 2.0 * 3))  # s_c = +-clamp on every element
    (y.sum() + log_det.sum()).backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in chain.parameters())
    assert rel_err(chain.inverse(y.detach()), x.detach()) <= 1e-6


def test_bad_arguments_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match=r"clamp is 0; expected a positive finite float"):
        rt.AffineBlock(nn.Identity(), nn.Identity(), clamp=0)
    with pytest.raises(TypeError, match=r"clamp is '2'; expected a float"):
        rt.AffineBlock(nn.Identity(), nn.Identity(), clamp="2")
    with pytest.raises(TypeError, match="s is int; expected an nn.Module or a callable"):
        rt.AffineBlock(3, nn.Identity())
    with pytest.raises(ValueError, match="expected an even size"):
        rt.AffineBlock(nn.Identity(), nn.Identity(), dim=-1)(torch.randn(2, 3))


def test_saved_bytes_do_not_grow_with_depth():
    x = torch.randn(2, 3, 8, requires_grad=True)
    saved = [rt.saved_activation_bytes(_affine_chain(depth, log_det=True), x)[1] for depth in (2, 16)]
    assert saved[0] == saved[1] == x.numel() * x.element_size()


def test_scale_is_soft_clamped():
    s = torch.tensor([-1e6, -2.0, -1e-3, 0.0, 1e-3, 2.0, 1e6], dtype=torch.float64)
    s_c = rt.ops.soft_clamp(s, 2.0)
    assert (s_c.abs() < 2.0 + 1e-12).all() and torch.equal(s_c.sign(), s.sign())
    assert abs(s_c[4].item() - 1e-3) < 1e-9 and math.isclose(s_c[5].item(), 2.0 * math.tanh(1.0))


def test_ops_compile_fullgraph():
    def step(y, dy, s, t, ld):
        ds = torch.empty_like(s)
        torch.ops.revtriton.affine_forward(y, s, t, ld, 2.0)
        torch.ops.revtriton.affine_backward(y, dy, s, t, ds, ld, 2.0)
        return y * 2, dy, ds, ld

    args = _op_args("affine_backward")[:4] + (torch.zeros(3),)
    expected = step(*[a.clone() for a in args])
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*[a.clone() for a in args])
    torch.testing.assert_close(got, expected)
