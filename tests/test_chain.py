"""ReversibleBlock and ReversibleSequential: gradients, inverse, memory, input safety."""
import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import revtriton as rt
from helpers import DEVICES, conv_chain, conv_unit, eager_twin, loss_of, mlp, randn, rel_err


def _gradcheck_module(module, x):
    """gradcheck with respect to the input and every parameter of ``module``."""
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def fn(x, *params):
        return functional_call(module, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_gradcheck_block_float64():
    block = rt.ReversibleBlock(nn.Conv2d(1, 1, 3, padding=1), nn.Sequential(nn.Tanh(), nn.Conv2d(1, 1, 1)))
    _gradcheck_module(block.double(), torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True))


def test_gradcheck_chain_of_three_float64():
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(mlp(2), mlp(2), dim=-1) for _ in range(3)])
    _gradcheck_module(chain.double(), torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True))


def _mlp_chain_32():
    return rt.ReversibleSequential(*[rt.ReversibleBlock(mlp(8), mlp(8), dim=-1) for _ in range(32)])


# Not the conv chain on CUDA: at depth 32, BatchNorm over batch-2 halves of 2 channels makes it
# ill-conditioned, and 3 of seeds 0-11 miss 1e-5 on CPU too (2.4e-5 worst; eager itself is up
# to 1.3e-5 from fp64). Seed 0 passes at 3.1e-6, but a GPU's rounding is another draw. The MLP
# chain stays within 1.2e-6 to 2.5e-6 over the same seeds.
@pytest.mark.parametrize("make,shape,device", [
    pytest.param(lambda: conv_chain(32), (2, 4, 5, 5), "cpu", id="conv-nchw-dim1-cpu"),
    pytest.param(_mlp_chain_32, (2, 5, 16), "cpu", id="mlp-tokens-dim-1-cpu"),
    pytest.param(_mlp_chain_32, (2, 5, 16), "cuda", id="mlp-tokens-dim-1-cuda", marks=pytest.mark.cuda),
])
def test_gradients_match_eager_at_depth_32(make, shape, device):
    chain = make().to(device)
    twin, eager = eager_twin(chain)
    x = randn(shape, device=device, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    loss_of(chain(x)).backward()
    loss_of(eager(x_twin)).backward()
    assert rel_err(x.grad, x_twin.grad) <= 1e-5
    for (name, p), q in zip(chain.named_parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5, name


@pytest.mark.parametrize("device", DEVICES)
def test_inverse_of_forward_is_the_input_at_depth_32(device):
    chain = conv_chain(32, device=device)
    x = randn(2, 4, 5, 5, device=device)
    with torch.no_grad():
        y = chain(x)
    assert rel_err(chain.inverse(y), x) <= 1e-5
    block = rt.ReversibleBlock(mlp(3), mlp(3), dim=-1).to(device)  # on a strided slice of x
    assert rel_err(block.inverse(block(x.view(2, 10, 10)[..., :6]).detach()), x.view(2, 10, 10)[..., :6]) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_inverse_does_not_touch_its_argument_or_batchnorm_statistics(device):
    """Without grad (sampling); with grad, an inverse is a training step (tests/test_inverse.py)."""
    chain = conv_chain(3, device=device)
    y = randn(2, 4, 5, 5, device=device)
    y_before, stats_before = y.clone(), [b.clone() for b in chain.buffers()]
    with torch.no_grad():
        chain.inverse(y)
    assert torch.equal(y, y_before)
    assert all(torch.equal(a, b) for a, b in zip(chain.buffers(), stats_before))


def test_saved_bytes_do_not_grow_with_depth_while_eager_does():
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    saved = {}
    for depth in (4, 32):
        chain = conv_chain(depth)
        _, saved["reversible", depth] = rt.saved_activation_bytes(chain, x)
        _, saved["eager", depth] = rt.saved_activation_bytes(eager_twin(chain)[1], x)
    output_bytes = x.numel() * x.element_size()
    assert saved["reversible", 4] == saved["reversible", 32] == output_bytes
    assert saved["eager", 32] > 7 * saved["eager", 4] > 7 * output_bytes


@pytest.mark.parametrize("requires_grad", [True, False])
def test_input_is_not_modified_by_forward_or_backward(requires_grad):
    chain = conv_chain(4)
    x = torch.randn(2, 4, 5, 5, requires_grad=requires_grad)
    x_before = x.detach().clone()
    y = chain(x)
    assert torch.equal(x.detach(), x_before)
    loss_of(y).backward()
    assert torch.equal(x.detach(), x_before)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_without_grad_the_chain_runs_forward_only(mode):
    chain = conv_chain(4).eval()
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with mode():
        y = chain(x)
    assert y.grad_fn is None and not y.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(y, eager_twin(chain)[1](x))


def test_chains_compose_with_ordinary_layers():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), conv_chain(2), nn.Conv2d(4, 8, 3, stride=2, padding=1),
        rt.ReversibleSequential(rt.ReversibleBlock(conv_unit(4), conv_unit(4))),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    twin = copy.deepcopy(net)
    for chain in twin:
        if isinstance(chain, rt.ReversibleSequential):
            chain.reversible = False  # the debugging switch: plain autograd, same blocks
    x = torch.randn(2, 3, 6, 6)
    loss_of(net(x)).backward()
    loss_of(twin(x)).backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5, name


@pytest.mark.parametrize("device", DEVICES)
def test_output_is_intact_after_backward_so_inverse_still_rebuilds_the_input(device):
    chain = conv_chain(4, device=device)
    x = randn(2, 4, 5, 5, device=device, requires_grad=True)
    y = chain(x)
    y_before = y.detach().clone()
    loss_of(y).backward()
    assert torch.equal(y.detach(), y_before)
    assert rel_err(chain.inverse(y.detach()), x.detach()) <= 1e-6


def test_retained_graph_runs_backward_twice_with_equal_gradients():
    chain = conv_chain(3)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    loss = loss_of(chain(x))
    loss.backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in chain.parameters()]
    loss.backward()
    second = [x.grad] + [p.grad for p in chain.parameters()]
    assert all(torch.allclose(b, 2 * a, rtol=1e-6, atol=1e-7) for a, b in zip(first, second))


def _spy_on_release(monkeypatch):
    """The results of every ``release_if_unshared`` call the chain's backward makes."""
    from revtriton import function

    results, real = [], function.release_if_unshared
    monkeypatch.setattr(function, "release_if_unshared", lambda *args: results.append(real(*args)) or results[-1])
    return results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep", ["output", "detached output", "view of output", "retained graph", "saved hooks"])
def test_backward_keeps_the_output_storage_when_anything_can_still_read_it(keep, device, monkeypatch):
    released = _spy_on_release(monkeypatch)
    chain = conv_chain(3, device=device)
    x = randn(2, 4, 5, 5, device=device, requires_grad=True)
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with hooks if keep == "saved hooks" else contextlib.nullcontext():
        y = chain(x)
    expected = y.detach().clone()
    kept = {"output": y, "detached output": y.detach(), "view of output": y[1:],
            "retained graph": y, "saved hooks": y}[keep]
    loss = loss_of(y)
    del y
    loss.backward(retain_graph=keep == "retained graph")
    assert released == [False]
    assert torch.equal(kept.detach(), expected[-kept.shape[0]:])  # intact: the view is y[1:]


def test_an_output_saved_as_itself_is_kept_while_the_caller_holds_it(monkeypatch):
    """With saved-tensor hooks that keep the output itself, its storage has no more references
    in backward than an output only autograd holds: the weak reference to the output
    (``output() is not None`` in release_if_unshared) is all that tells the caller still holds it."""
    from revtriton import function

    storage_alone_says_unshared, released, real = [], [], function.release_if_unshared

    def spy(saved, output):
        storage_alone_says_unshared.append(function._storage_refs(saved) <= function._unshared_refs())
        released.append(real(saved, output))
        return released[-1]

    monkeypatch.setattr(function, "release_if_unshared", spy)
    chain = conv_chain(3)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        y = chain(x)
    expected = y.detach().clone()
    loss_of(y).backward()
    assert storage_alone_says_unshared == [True] and released == [False]
    assert torch.equal(y.detach(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_frees_the_output_storage_once_nothing_else_can_read_it(device, monkeypatch):
    released = _spy_on_release(monkeypatch)
    chain = conv_chain(3, device=device)
    x = randn(2, 4, 5, 5, device=device, requires_grad=True)
    twin, run = eager_twin(chain)
    loss_of(chain(x)).backward()  # the output is only in the loss's graph
    loss_of(run(x.detach().requires_grad_())).backward()
    assert released == [True]
    for p, q in zip(chain.parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_chain_inside_activation_checkpointing_equals_eager(use_reentrant):
    """torch.utils.checkpoint around a chain recomputes its output in backward (a fresh tensor
    the chain's backward may free) and must still give eager's gradients."""
    from torch.utils.checkpoint import checkpoint

    chain = conv_chain(3)
    twin, run = eager_twin(chain)
    x = torch.randn(2, 4, 5, 5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_of(checkpoint(lambda t: chain(t) * 2, xa, use_reentrant=use_reentrant)).backward()
    loss_of(run(xb) * 2).backward()
    assert rel_err(xa.grad, xb.grad) <= 1e-5
    for p, q in zip(chain.parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [
    lambda: rt.ReversibleBlock(conv_unit(8), conv_unit(8)),
    lambda: rt.AffineBlock(conv_unit(8), conv_unit(8)),
    lambda: rt.MomentumBlock(conv_unit(8), beta=0.9),
], ids=["additive", "affine", "momentum"])
def test_chain_of_each_coupling_equals_its_eager_path(make, device):
    """Every coupling, with its log-determinant, through the Triton kernels (compiled on CUDA)
    against the same blocks run as plain autograd (the debugging switch)."""
    chain = rt.ReversibleSequential(*[make() for _ in range(8)], log_det=True).to(device)
    twin = copy.deepcopy(chain)
    twin.reversible = False
    x = randn(4, 16, 9, 9, device=device, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    y, log_det = chain(x)
    y_twin, log_det_twin = twin(x_twin)
    (loss_of(y) - log_det.sum()).backward()
    (loss_of(y_twin) - log_det_twin.sum()).backward()
    assert rel_err(y, y_twin) <= 1e-5 and rel_err(log_det, log_det_twin) <= 1e-5
    assert rel_err(x.grad, x_twin.grad) <= 1e-5
    for (name, p), q in zip(chain.named_parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5, name


def _conv(c):
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.Tanh())


MEMORY_FORMATS = {
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "permuted": lambda x: x.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1),  # dense, neither format
    "strided": lambda x: torch.cat([x, x], 3)[..., ::2],  # not dense
}


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("make", [
    lambda: rt.ReversibleBlock(_conv(2), _conv(2)),
    lambda: rt.AffineBlock(_conv(2), _conv(2)),
    lambda: rt.MomentumBlock(_conv(2), beta=0.8),
], ids=["additive", "affine", "momentum"])
def test_chain_of_any_memory_format_equals_its_eager_path(make, memory_format):
    """A channels_last (or permuted, or strided) input runs through the kernels in its own
    layout: forward with and without grad and backward equal the eager twin in float64."""
    chain = rt.ReversibleSequential(make(), make(), log_det=True).double()
    chain.apply(lambda m: m.to(memory_format=torch.channels_last) if isinstance(m, nn.Conv2d) else None)
    twin = copy.deepcopy(chain)
    twin.reversible = False
    values = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    xa, xb = (MEMORY_FORMATS[memory_format](values).requires_grad_() for _ in range(2))
    assert xa.stride() == xb.stride() != values.stride()
    with torch.no_grad():
        y, log_det = chain(xa)
        y_twin, log_det_twin = twin(xb)
    assert rel_err(y, y_twin) <= 1e-12 and rel_err(log_det, log_det_twin) <= 1e-12
    y, log_det = chain(xa)
    y_twin, log_det_twin = twin(xb)
    assert rel_err(y, y_twin) <= 1e-12 and rel_err(log_det, log_det_twin) <= 1e-12
    (loss_of(y) - log_det.sum()).backward()
    (loss_of(y_twin) - log_det_twin.sum()).backward()
    assert rel_err(xa.grad, xb.grad) <= 1e-10
    for (name, p), q in zip(chain.named_parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-10, name


@pytest.mark.parametrize("shape,dim,memory_format", [((2, 6, 3, 5), 1, torch.channels_last),
                                                     ((2, 5, 16), -1, torch.contiguous_format)])
def test_a_gradient_stream_is_laid_out_like_its_stream(shape, dim, memory_format):
    """The backward's gradient stream has the stream's strides (the kernels write both in one
    pass), whatever the layout of the gradient autograd hands in, and holds its halves."""
    from revtriton.stream import from_stream, to_stream

    stream = to_stream(torch.randn(shape).contiguous(memory_format=memory_format), dim)
    grad = torch.randn(shape).transpose(0, -1).contiguous().transpose(0, -1)  # another layout
    grad_stream = to_stream(grad, dim, like=stream)
    assert grad_stream.stride() == stream.stride() and grad_stream.dtype == grad.dtype
    assert torch.equal(from_stream(grad_stream, dim), grad)
