"""The momentum coupling: kernels against float64 references, ops, the block's gradients and inverse."""
import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

import revtriton as rt
from helpers import loss_of, mlp, rel_err
from revtriton import kernels
from revtriton.blocks import halves
from test_affine import assert_inverse_is_exact, assert_same_gradients, assert_within_ulps, check_both_cpu_paths
from test_chain import _gradcheck_module
from test_kernels import DTYPES, SPLITS

BETA = 0.7


def _stream(shape, dim, dtype, n=2):
    """``n`` tensors of ``shape``, each as its two halves along ``dim``."""
    return [halves(torch.randn(shape, dtype=dtype), dim) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SPLITS + [((6, 2), 1)], ids=str)
def test_forward_and_inverse_kernels(dtype, shape, dim):
    (x, v), (f, _) = _stream(shape, dim, dtype)
    x64, v64, f64 = x.double(), v.double(), f.double()
    ref_v = BETA * v64 + (1 - BETA) * f64
    kernels.momentum_forward_(x, v, f, BETA)
    terms = v64.abs() + f64.abs()
    assert_within_ulps(v, ref_v, terms)
    assert_within_ulps(x, x64 + ref_v, x64.abs() + terms)
    v64 = v.double()
    kernels.momentum_inverse_(v, f, BETA)
    assert_within_ulps(v, (v64 - (1 - BETA) * f64) / BETA, (v64.abs() + f64.abs()) / BETA)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SPLITS[:2] + [((6, 2), 1)], ids=str)
def test_backward_kernels(dtype, shape, dim):
    (x, v), (dx, dv), (f, fx) = _stream(shape, dim, dtype, n=3)
    x64, v64, dx64, dv64, f64, fx64 = (t.double() for t in (x, v, dx, dv, f, fx))
    kernels.momentum_backward_x_(x, v, dx, dv, BETA)
    assert_within_ulps(x, x64 - v64, x64.abs() + v64.abs())
    assert_within_ulps(dv, (1 - BETA) * (dx64 + dv64), (1 - BETA) * (dx64.abs() + dv64.abs()))
    dv64 = dv.double()
    kernels.momentum_backward_v_(v, f, dx, fx, dv, BETA)
    assert_within_ulps(v, (v64 - (1 - BETA) * f64) / BETA, (v64.abs() + f64.abs()) / BETA)
    assert_within_ulps(dx, dx64 + fx64, dx64.abs() + fx64.abs())
    assert_within_ulps(dv, dv64 * BETA / (1 - BETA), dv64.abs() * BETA / (1 - BETA))


def test_float64_kernels_compute_in_float64():
    (x, v), (f, _) = _stream((3, 8), 1, torch.float64)
    expected_v = 0.9 * v + (1 - 0.9) * f  # 0.9 is not an fp32 number
    expected_x = x + expected_v
    kernels.momentum_forward_(x, v, f, 0.9)
    torch.testing.assert_close(v, expected_v, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(x, expected_x, rtol=1e-15, atol=1e-15)


def _op_args(name, shape=(3, 5)):
    def r():
        return torch.randn(shape)

    return {
        "momentum_forward": lambda: (r(), r(), r(), BETA),
        "momentum_inverse": lambda: (r(), r(), BETA),
        "momentum_backward_x": lambda: (r(), r(), r(), r(), BETA),
        "momentum_backward_v": lambda: (r(), r(), r(), r(), r(), BETA),
        "momentum_inverse_backward": lambda: (r(), r(), r(), BETA),
    }[name]()


MOMENTUM_OPS = ["momentum_forward", "momentum_inverse", "momentum_backward_x", "momentum_backward_v",
                "momentum_inverse_backward"]


@pytest.mark.parametrize("name", MOMENTUM_OPS)
def test_opcheck(name):
    opcheck(getattr(torch.ops.revtriton, name), _op_args(name))


@pytest.mark.parametrize("name", MOMENTUM_OPS)
def test_both_cpu_paths_compute_the_same(name, monkeypatch):
    check_both_cpu_paths(getattr(torch.ops.revtriton, name), _op_args(name, shape=(4, 3, 5)), monkeypatch)


def _momentum_chain(depth, d=4, **kwargs):
    return rt.ReversibleSequential(*[rt.MomentumBlock(mlp(d), beta=0.9, dim=-1) for _ in range(depth)], **kwargs)


def momentum_twin(chain):
    """A deep copy of ``chain`` as plain autograd ops: ``x, v = chunk``, the MomentumNet step, ``cat``."""
    twin = copy.deepcopy(chain)

    def run(xv):
        for block in twin:
            x, v = xv.chunk(2, dim=block.dim)
            v = block.beta * v + (1 - block.beta) * block.f(x)
            xv = torch.cat([x + v, v], dim=block.dim)
        return xv

    return twin, run


def test_gradcheck_float64():
    chain = rt.ReversibleSequential(rt.MomentumBlock(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), beta=0.6, dim=-1),
                                    rt.MomentumBlock(nn.Linear(2, 2), beta=0.3, dim=-1))
    _gradcheck_module(chain.double(), torch.randn(2, 4, dtype=torch.float64, requires_grad=True))


def test_gradients_match_eager_at_depth_16():
    chain = _momentum_chain(16)
    twin, eager = momentum_twin(chain)
    x = torch.randn(3, 2, 8, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    loss_of(chain(x)).backward()
    loss_of(eager(x_twin)).backward()
    assert_same_gradients(chain, twin, inputs=[(x, x_twin)])


def test_inverse_is_exact_up_to_rounding_at_depth_16():
    assert_inverse_is_exact(_momentum_chain(16), torch.randn(3, 2, 8))  # rounding grows like 0.9**-16 = 5.4


class _Bias(nn.Module):
    """F(x) = a learned bias, whatever x is."""

    def __init__(self, n):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return self.bias.expand_as(x)


def test_f_that_ignores_x_gets_no_input_gradient_and_the_block_still_differentiates():
    f = _Bias(3)
    chain = rt.ReversibleSequential(rt.MomentumBlock(f, dim=-1))
    x = torch.randn(2, 6, requires_grad=True)
    loss_of(chain(x)).backward()
    eager_x = x.detach().clone().requires_grad_()
    eager_bias = f.bias.detach().clone().requires_grad_()
    x1, v = eager_x.chunk(2, dim=-1)
    v = 0.9 * v + 0.1 * eager_bias.expand_as(x1)
    loss_of(torch.cat([x1 + v, v], dim=-1)).backward()
    assert rel_err(x.grad, eager_x.grad) <= 1e-6
    assert rel_err(f.bias.grad, eager_bias.grad) <= 1e-6


def test_bad_beta_is_refused_with_a_clear_error():
    for beta in (0, 1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"beta is .*; expected a float strictly between 0 and 1"):
            rt.MomentumBlock(nn.Identity(), beta=beta)
    with pytest.raises(TypeError, match="beta is True; expected a float"):
        rt.MomentumBlock(nn.Identity(), beta=True)
