"""A chain's training step captured in a CUDA graph and replayed gives its eager twin's gradients
(issue 18). Whole-network capture as PyTorch's CUDA graphs notes describe it (warm-up steps on a
side stream, static inputs, gradients set to None before capture: the capture allocates them in
the graph's pool and every replay writes them; no optimizer), the way ``python -m bench graphs``
captures its steps; and partial-network capture with torch.cuda.make_graphed_callables. Additive
and affine blocks (with a log-determinant), fp32. Unrun so far: written on a machine without a
GPU.

When the RNG state is preserved (the default), the chain's recorder reads
torch.cuda.get_rng_state() as the forward starts and after each F/G call (revtriton/replay.py,
Recorder), and PyTorch forbids that during capture ("Cannot call
CUDAGeneratorImpl::current_seed during CUDA graph capture"): capture works with
``preserve_rng_state=False``; with the default, the chain refuses capture with an error that
says so.
"""
import copy

import pytest
import torch

import revtriton as rt
from bench.graphs import WARMUP, captured

from helpers import loss_of, mlp, randn, rel_err

pytestmark = pytest.mark.cuda

BATCH, TOKENS, WIDTH = 4, 8, 32


def chain(preserve_rng_state):
    """Additive and affine blocks, alternating, on (batch, tokens, features) split along features."""
    torch.manual_seed(0)
    half = WIDTH // 2
    blocks = [rt.ReversibleBlock(mlp(half), mlp(half), dim=-1), rt.AffineBlock(mlp(half), mlp(half), dim=-1),
              rt.ReversibleBlock(mlp(half), mlp(half), dim=-1),
              rt.AffineBlock(mlp(half), mlp(half), dim=-1, swap=True)]
    return rt.ReversibleSequential(*blocks, log_det=True, preserve_rng_state=preserve_rng_state).cuda()


def loss(out):
    y, log_det = out
    return loss_of(y) - log_det.mean()


def eager_gradients(model, x):
    """``(loss, {name: grad}, dx)`` of one step of ``model``'s eager twin on ``x``."""
    twin = copy.deepcopy(model)
    twin.reversible = False
    twin.zero_grad(set_to_none=True)  # the copy holds the captured model's gradients
    x = x.detach().clone().requires_grad_()
    value = loss(twin(x))
    value.backward()
    return value.detach(), {n: p.grad for n, p in twin.named_parameters()}, x.grad


def captured_step(model, static_x):
    """Capture ``loss(model(static_x)).backward()`` in a CUDA graph as ``python -m bench graphs``
    does (:func:`bench.graphs.captured`); return ``(graph, static loss)``."""
    static = {}

    def step():
        static["loss"] = loss(model(static_x))  # the last call is the captured one
        static["loss"].backward()

    graph = captured(model, static_x, step)
    return graph, static["loss"]


def assert_twins_gradients(model, x, value, grads, dx):
    expected_value, expected, expected_dx = eager_gradients(model, x)
    assert rel_err(value, expected_value) < 1e-5
    assert rel_err(dx, expected_dx) < 1e-5
    for name, g in grads.items():
        assert rel_err(g, expected[name]) < 1e-5, name


def test_a_captured_training_step_replays_the_eager_twins_gradients():
    model = chain(preserve_rng_state=False)
    static_x = randn(BATCH, TOKENS, WIDTH, device="cuda", requires_grad=True)
    graph, static_loss = captured_step(model, static_x)
    for seed in (1, 2):  # new data in the static input: each replay computes its own step
        x = torch.randn(BATCH, TOKENS, WIDTH, generator=torch.Generator().manual_seed(seed)).cuda()
        with torch.no_grad():
            static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None for g in grads.values())
        assert_twins_gradients(model, x, static_loss, grads, static_x.grad)


def test_a_chain_graphed_by_make_graphed_callables_trains_like_its_eager_twin():
    model = chain(preserve_rng_state=False)
    reference = copy.deepcopy(model)
    sample = randn(BATCH, TOKENS, WIDTH, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(model, (sample,), num_warmup_iters=WARMUP)
    for seed in (1, 2):
        x = torch.randn(BATCH, TOKENS, WIDTH, generator=torch.Generator().manual_seed(seed)).cuda()
        graphed.zero_grad(set_to_none=True)
        x_leaf = x.clone().requires_grad_()
        value = loss(graphed(x_leaf))
        value.backward()
        torch.cuda.synchronize()
        assert_twins_gradients(reference, x, value, {n: p.grad for n, p in model.named_parameters()}, x_leaf.grad)


def test_capture_with_the_rng_state_preserved_is_refused_with_what_to_do():
    model = chain(preserve_rng_state=True)
    static_x = randn(BATCH, TOKENS, WIDTH, device="cuda", requires_grad=True)
    with pytest.raises(RuntimeError, match="cannot run while a CUDA graph is captured.*preserve_rng_state=False"):
        captured_step(model, static_x)
