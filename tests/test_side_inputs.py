"""Side inputs: keyword arguments of a chain's call reach F and G and get their gradients (issue 10).

Most tests compare a chain with its eager twin: a deep copy run with ``reversible=False`` (plain
autograd through ``eager_forward``, no kernels, no recompute), from the same RNG state.
"""
import copy
import math

import pytest
import torch
from torch import nn

import revtriton as rt
from helpers import loss_of, rel_err
from revtriton import models


def twin_of(model):
    twin = copy.deepcopy(model)
    for chain in [m for m in twin.modules() if isinstance(m, rt.ReversibleSequential)]:
        chain.reversible = False
    return twin


def assert_same_step(model, twin, run, inputs, tol=1e-5, seed=7):
    """``run(model, *inputs)`` and ``run(twin, *copies)`` from the same RNG state give the same
    output and the same gradients for every input that requires grad and every parameter."""
    copies = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outputs = []
    for m, args in ((model, inputs), (twin, copies)):
        torch.manual_seed(seed)
        out = run(m, *args)
        loss_of(out).backward()
        outputs.append(out)
    assert rel_err(outputs[0], outputs[1]) <= tol
    for i, (a, b) in enumerate(zip(inputs, copies)):
        if a.requires_grad:
            assert a.grad is not None and rel_err(a.grad, b.grad) <= tol, (i, rel_err(a.grad, b.grad))
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or rel_err(p.grad, q.grad) <= tol, (name, rel_err(p.grad, q.grad))


def padding_mask(lengths, tokens):
    """(batch, tokens), True after each sample's length."""
    return torch.arange(tokens)[None, :] >= torch.tensor(lengths)[:, None]


def test_self_attention_with_a_padding_mask_per_sample_and_dropout_equals_eager():
    model = models.reversible_transformer(16, 3, 2, dropout=0.3)
    mask = padding_mask([6, 3, 1], 6)
    x = torch.randn(3, 6, 16, requires_grad=True)
    assert_same_step(model, twin_of(model), lambda m, x: m(x, key_padding_mask=mask, causal=True), [x])
    # the mask matters: another mask gives another output
    with torch.no_grad():
        model.eval()
        assert not torch.allclose(model(x, key_padding_mask=mask)[1], model(x)[1])


def test_gradients_reach_the_encoder_through_cross_attention():
    model = models.EncoderDecoder(16, 2, 2)
    src, tgt = torch.randn(3, 5, 16, requires_grad=True), torch.randn(3, 4, 16, requires_grad=True)
    src_pad, tgt_pad = padding_mask([5, 2, 4], 5), padding_mask([4, 4, 2], 4)
    assert_same_step(model, twin_of(model), lambda m, s, t: m(s, t, src_pad, tgt_pad), [src, tgt])
    assert all(p.grad.abs().sum() > 0 for p in model.encoder.parameters())


class Conditioned(nn.Module):
    """``tanh(W x + cond) * scale``, or with ``**kwargs`` (G) ``W x * sigmoid(cond)``."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, cond, scale=1.0):
        return torch.tanh(self.lin(x) + cond) * scale


class ConditionedAnyKeyword(Conditioned):
    def forward(self, x, **kwargs):
        assert set(kwargs) == {"cond", "scale", "flag"}, kwargs  # takes **kwargs: gets every keyword
        return self.lin(x) * kwargs["cond"].sigmoid()


def test_kwargs_conditioning_in_f_and_g_gives_a_leaf_side_tensor_its_gradient():
    """Against an independent eager computation: y1 = x1 + F(x2, cond), y2 = x2 + G(y1, cond)."""
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(Conditioned(4), ConditionedAnyKeyword(4), dim=-1)
                                      for _ in range(3)])
    x = torch.randn(2, 5, 8, requires_grad=True)
    cond = torch.randn(2, 5, 4, requires_grad=True)
    twin = copy.deepcopy(chain)
    x_twin, cond_twin = x.detach().clone().requires_grad_(), cond.detach().clone().requires_grad_()
    loss_of(chain(x, cond=cond, scale=0.5, flag=True)).backward()
    h = x_twin
    for block in twin:
        h1, h2 = h.chunk(2, dim=-1)
        y1 = h1 + block.f(h2, cond=cond_twin, scale=0.5)
        h = torch.cat([y1, h2 + block.g(y1, cond=cond_twin, scale=0.5, flag=True)], dim=-1)
    loss_of(h).backward()
    assert rel_err(x.grad, x_twin.grad) <= 1e-5 and rel_err(cond.grad, cond_twin.grad) <= 1e-5
    for p, q in zip(chain.parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5


class Rotary(nn.Module):
    """F reading a tuple side input: ``Linear(x * cos + rotate(x) * sin)``."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, rotary):
        cos, sin = rotary
        return self.lin(x * cos + x.roll(1, -1) * sin)


def test_a_tuple_side_input_gets_the_gradients_of_its_tensors():
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(Rotary(4), nn.Tanh(), dim=-1) for _ in range(2)])
    x = torch.randn(3, 6, 8, requires_grad=True)
    cos, sin = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    assert_same_step(chain, twin_of(chain), lambda m, x, c, s: m(x, rotary=(c, s)), [x, cos, sin])


def test_one_chain_called_twice_with_different_side_inputs_in_one_graph():
    """Paired losses: each call's recompute reads its own side inputs, and a side tensor read by
    both calls gets the sum of both gradients."""
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(Conditioned(4), nn.Tanh(), dim=-1) for _ in range(3)])
    x = torch.randn(2, 8, requires_grad=True)
    a, b = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    assert_same_step(chain, twin_of(chain),
                     lambda m, x, a, b: m(x, cond=a) - m(x, cond=b) * m(x, cond=a + b), [x, a, b])


def test_inverse_takes_the_side_inputs_of_the_forward():
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(Conditioned(4), ConditionedAnyKeyword(4), dim=-1)
                                      for _ in range(4)])
    x, cond = torch.randn(3, 8), torch.randn(3, 4)
    with torch.no_grad():
        y = chain(x, cond=cond, scale=2.0, flag=False)
    assert rel_err(chain.inverse(y, cond=cond, scale=2.0, flag=False), x) <= 1e-6
    assert rel_err(chain.inverse(y, cond=-cond, scale=2.0, flag=False), x) > 1e-2


def test_an_unknown_keyword_is_a_type_error_before_any_state_changes():
    chain = rt.ReversibleSequential(rt.ReversibleBlock(Conditioned(2), nn.Sequential(nn.BatchNorm1d(2)), dim=-1))
    state = copy.deepcopy(chain.state_dict())
    with pytest.raises(TypeError, match=r"keyword arguments 'colour', 'size' reached no F or G of the chain"):
        chain(torch.randn(4, 4), cond=torch.zeros(4, 2), colour="red", size=3)
    with pytest.raises(TypeError, match=r"keyword argument 'mask' reached no F or G"):
        chain.inverse(torch.randn(4, 4), mask=None)
    assert all(torch.equal(v, state[k]) for k, v in chain.state_dict().items())


def test_a_side_tensor_modified_in_place_before_backward_is_an_error():
    chain = rt.ReversibleSequential(rt.ReversibleBlock(Conditioned(2), nn.Tanh(), dim=-1))
    cond = torch.randn(3, 2)
    y = chain(torch.randn(3, 4, requires_grad=True), cond=cond)
    cond.add_(1)  # the recompute would read another cond than the forward did
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


class ReadsAttribute(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.memory = None  # set from outside: the workaround issue 10 found silently wrong

    def forward(self, x):
        return self.lin(x) + self.memory


@pytest.mark.parametrize("how,reaches", [("attribute", "a parameter"), ("closure", "a leaf tensor"),
                                         ("foreign parameter", "a parameter")])
def test_a_tensor_f_reads_any_other_way_is_a_clear_error_in_backward(how, reaches):
    """Read as an attribute (the encoder's output), in a closure (a leaf) or from a module that is
    not F's, a tensor would get no gradient from the recompute: backward refuses, naming the block."""
    encoder = nn.Linear(4, 2)
    leaf = torch.randn(2, requires_grad=True)
    if how == "attribute":
        f = ReadsAttribute(2)
        f.memory = encoder(torch.randn(3, 4))  # requires grad through the encoder's parameters
    elif how == "closure":
        def f(x):
            return x * leaf
    else:
        def f(x):
            return x * encoder.bias
    chain = rt.ReversibleSequential(rt.ReversibleBlock(nn.Tanh(), nn.Tanh(), dim=-1),
                                    rt.ReversibleBlock(f, nn.Tanh(), dim=-1))
    y = chain(torch.randn(3, 4, requires_grad=True))
    with pytest.raises(RuntimeError, match=rf"blocks\[1\]\.f \(\w+\) reads a tensor that requires grad .* reaches "
                                           rf"{reaches} of shape .* Pass the tensor to the chain as a keyword argument"):
        y.sum().backward()


def test_saved_bytes_stay_flat_in_depth_with_a_side_input():
    x = torch.randn(2, 6, 8, requires_grad=True)
    cond = torch.randn(2, 6, 4, requires_grad=True)
    saved = {}
    for depth in (2, 16):
        chain = rt.ReversibleSequential(*[rt.ReversibleBlock(Conditioned(4), Conditioned(4), dim=-1)
                                          for _ in range(depth)])
        _, saved[depth] = rt.saved_activation_bytes(lambda: chain(x, cond=cond))
    assert saved[2] == saved[16] == (x.numel() + cond.numel()) * 4  # the output and cond, once


class ConditionalNet(nn.Module):
    """A scale or shift network of a conditional flow: MLP of ``x1`` and a label embedding."""

    def __init__(self, classes=3):
        super().__init__()
        self.embed = nn.Embedding(classes, 8)
        self.net = nn.Sequential(nn.Linear(1 + 8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, label):
        return self.net(torch.cat([x, self.embed(label)], dim=-1))


def test_a_conditional_flows_log_det_is_the_log_determinant_of_its_jacobian():
    flow = rt.ReversibleSequential(*[rt.AffineBlock(ConditionalNet(), ConditionalNet(), dim=1, swap=i % 2 == 1)
                                     for i in range(4)], log_det=True).double()
    x, label = torch.randn(5, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    _, log_det = flow(x, label=label)
    for i in range(len(x)):
        jacobian = torch.autograd.functional.jacobian(lambda xi: flow(xi[None], label=label[i:i + 1])[0][0], x[i])
        assert math.isclose(log_det[i].item(), torch.linalg.slogdet(jacobian).logabsdet.item(), rel_tol=1e-10)
    flow.float()
    assert_same_step(flow, twin_of(flow), lambda m, x: torch.cat([m(x, label=label)[0], m(x, label=label)[1][:, None]], 1),
                     [torch.randn(5, 2, requires_grad=True)])


def test_compiled_f_and_g_take_side_inputs():
    """Regional compilation: F and G compiled with torch.compile, called with keyword arguments."""
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(Conditioned(4), ConditionedAnyKeyword(4), dim=-1)
                                      for _ in range(2)])
    twin = twin_of(chain)
    for block in chain:
        block.f, block.g = torch.compile(block.f, backend="aot_eager"), torch.compile(block.g, backend="aot_eager")
    cond = torch.randn(3, 4, requires_grad=True)
    assert_same_step(chain, twin, lambda m, x, c: m(x, cond=c, scale=1.5, flag=True),
                     [torch.randn(3, 8, requires_grad=True), cond])


def test_momentum_blocks_take_side_inputs():
    chain = rt.ReversibleSequential(*[rt.MomentumBlock(Conditioned(4), beta=0.8, dim=-1) for _ in range(3)])
    assert_same_step(chain, twin_of(chain), lambda m, x, c: m(x, cond=c),
                     [torch.randn(3, 8, requires_grad=True), torch.randn(3, 4, requires_grad=True)])


def test_a_builtin_without_a_signature_as_f_takes_no_side_inputs():
    chain = rt.ReversibleSequential(rt.ReversibleBlock(torch.tanh, Conditioned(2), dim=-1))
    x, cond = torch.randn(3, 4, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    chain(x, cond=cond).sum().backward()
    assert x.grad is not None and cond.grad is not None
