"""Chains with ``log_det=True``: the log-determinant, its gradient and the normalizing-flow example."""
import copy
import importlib.util
import math
import pathlib

import pytest
import torch
from torch import nn

import revtriton as rt
from helpers import loss_of
from test_affine import assert_same_gradients


def _mixed_chain(make, dim, **kwargs):
    """Affine (both halves in turn), momentum and additive blocks over ``make()`` modules."""
    return rt.ReversibleSequential(
        rt.AffineBlock(make(), make(), dim=dim, clamp=1.5), rt.MomentumBlock(make(), beta=0.8, dim=dim),
        rt.AffineBlock(make(), make(), dim=dim, swap=True), rt.ReversibleBlock(make(), make(), dim=dim), **kwargs)


def _linear():
    return nn.Sequential(nn.Linear(2, 2), nn.Tanh())


def _conv():
    return nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Tanh())


@pytest.mark.parametrize("make,dim,shape", [(_linear, -1, (3, 4)), (_conv, 1, (2, 2, 3, 3))], ids=["mlp", "conv"])
def test_log_det_equals_the_log_determinant_of_the_jacobian(make, dim, shape):
    chain = _mixed_chain(make, dim, log_det=True).double()
    x = 2 * torch.randn(shape, dtype=torch.float64)
    _, log_det = chain(x)
    for i in range(shape[0]):
        jacobian = torch.autograd.functional.jacobian(lambda z: chain(z)[0], x[i:i + 1])
        n = x[i].numel()
        sign, expected = torch.linalg.slogdet(jacobian.reshape(n, n))
        assert sign != 0
        torch.testing.assert_close(log_det[i], expected, rtol=1e-10, atol=1e-10)


def test_additive_blocks_add_zero_and_momentum_blocks_a_constant():
    x = torch.randn(3, 2, 10)
    additive = rt.ReversibleSequential(rt.ReversibleBlock(nn.Linear(5, 5), nn.Linear(5, 5), dim=-1), log_det=True)
    momentum = rt.ReversibleSequential(*[rt.MomentumBlock(nn.Linear(5, 5), beta=0.5, dim=-1)] * 2, log_det=True)
    assert torch.equal(additive(x)[1], torch.zeros(3))
    torch.testing.assert_close(momentum(x)[1], torch.full((3,), 2 * 10 * math.log(0.5)))  # 2 blocks, d_v = 2 * 5


def test_debug_switch_computes_the_same_output_log_det_and_gradients():
    chain = _mixed_chain(_linear, -1, log_det=True)
    twin = copy.deepcopy(chain)
    twin.reversible = False  # eager_forward of every block, plain autograd
    x = torch.randn(5, 4, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    (y, log_det), (y_twin, log_det_twin) = chain(x), twin(x_twin)
    torch.testing.assert_close(y, y_twin)
    torch.testing.assert_close(log_det, log_det_twin)
    w = torch.linspace(-1, 2, 5)
    (loss_of(y) - (w * log_det).sum()).backward()
    (loss_of(y_twin) - (w * log_det_twin).sum()).backward()
    assert_same_gradients(chain, twin, inputs=[(x, x_twin)])


def test_without_grad_the_log_det_is_returned_and_nothing_is_kept():
    chain = _mixed_chain(_linear, -1, log_det=True)
    x = torch.randn(5, 4)
    with torch.no_grad():
        y, log_det = chain(x)
    assert not y.requires_grad and not log_det.requires_grad
    y_grad, log_det_grad = chain(x.requires_grad_())
    assert torch.equal(y, y_grad.detach()) and torch.equal(log_det, log_det_grad.detach())
    assert log_det.dtype == torch.float32 and chain.half()(x.half())[1].dtype == torch.float32


def test_a_loss_of_the_log_det_alone_reaches_the_input_and_s_but_not_t():
    chain = rt.ReversibleSequential(rt.AffineBlock(nn.Linear(2, 2), nn.Linear(2, 2), dim=-1), log_det=True)
    x = torch.randn(3, 4, requires_grad=True)
    chain(x)[1].sum().backward()
    block = chain[0]
    assert x.grad[:, :2].any() and not x.grad[:, 2:].any()  # the log-det depends on x1 only
    assert block.s.weight.grad.any() and not block.t.weight.grad.any()


def test_splitting_the_sample_dimension_is_refused_with_log_det():
    chain = rt.ReversibleSequential(rt.AffineBlock(nn.Identity(), nn.Identity(), dim=0), log_det=True)
    with pytest.raises(ValueError, match=r"log_det=True sums the log-determinant per sample .* dim=0"):
        chain(torch.randn(4, 3))


@pytest.mark.parametrize("kind", ["affine", "momentum"])
def test_dropout_and_batchnorm_train_as_in_eager(kind):
    def unit():
        return nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3), nn.Dropout(0.3))

    block = rt.AffineBlock(unit(), unit(), dim=-1) if kind == "affine" else rt.MomentumBlock(unit(), dim=-1)
    chain = rt.ReversibleSequential(block, copy.deepcopy(block), log_det=True)
    twin = copy.deepcopy(chain)
    twin.reversible = False
    x = torch.randn(6, 6)
    for model in (chain, twin):
        torch.manual_seed(1)
        y, log_det = model(x.clone().requires_grad_())
        (loss_of(y) - log_det.sum()).backward()
    assert_same_gradients(chain, twin)
    for a, b in zip(chain.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)


def test_autocast_is_replayed_for_affine_and_momentum_blocks():
    chain = _mixed_chain(_linear, -1, log_det=True)
    twin = copy.deepcopy(chain)
    twin.reversible = False
    x = torch.randn(5, 4)
    for model in (chain, twin):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, log_det = model(x.clone().requires_grad_())
        assert y.dtype == torch.float32
        (loss_of(y) - log_det.sum()).backward()
    assert_same_gradients(chain, twin, tol=2e-2)


def test_the_density_example_lowers_the_negative_log_likelihood(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # rows of one element: the interpreter is too slow here
    path = pathlib.Path(__file__).parents[1] / "examples" / "flow_2d.py"
    spec = importlib.util.spec_from_file_location("flow_2d", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    _, history = example.fit(steps=100, batch=256, depth=4, every=50)
    assert sum(history[-10:]) / 10 < history[0] - 1.0
    assert "negative log-likelihood" in capsys.readouterr().out


def test_a_compiled_flow_trains_like_the_uncompiled_one():
    torch._dynamo.reset()
    flow = _mixed_chain(_linear, -1, log_det=True)
    twin = copy.deepcopy(flow)
    x = torch.randn(5, 4)

    def nll(model, x):
        z, log_det = model(x)
        return (0.5 * z.pow(2).sum(1) - log_det).mean()

    nll(flow, x).backward()
    torch.compile(nll, backend="aot_eager")(twin, x).backward()
    assert_same_gradients(twin, flow, tol=1e-6)
