"""Training through the inverse (issue 17): ``inverse`` and ``inverse_and_log_det`` are
differentiable with grad enabled, equal a hand-written plain-autograd inverse in fp64, and cost
what the forward costs (one node saving only the result, F and G run twice per step)."""
import copy
import math

import pytest
import torch
from torch import nn

import revtriton as rt
from helpers import loss_of, rel_err


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class Conditioned(nn.Module):
    """``tanh(l(x)) * (1 + cond)``: reads a side input ``cond`` of a half's shape."""

    def __init__(self, d):
        super().__init__()
        self.l = nn.Linear(d, d)

    def forward(self, x, cond=None):
        h = torch.tanh(self.l(x))
        return h if cond is None else h * (1 + cond)


def unit(d=3):
    return Conditioned(d)


def make(kind, depth=3, d=3):
    blocks = {
        "additive": lambda i: rt.ReversibleBlock(unit(d), unit(d), dim=-1),
        "affine": lambda i: rt.AffineBlock(unit(d), unit(d), dim=-1, clamp=1.5, swap=i % 2 == 1),
        "momentum": lambda i: rt.MomentumBlock(unit(d), beta=0.8, dim=-1),
        "mixed": lambda i: [rt.ReversibleBlock(unit(d), unit(d), dim=-1), rt.AffineBlock(unit(d), unit(d), dim=-1),
                            rt.MomentumBlock(unit(d), beta=0.8, dim=-1)][i % 3],
    }[kind]
    return rt.ReversibleSequential(*[blocks(i) for i in range(depth)])


def hand_written_inverse(chain, y, **side):
    """The chain's inverse and its log|det dx/dy| per sample, written out with plain autograd."""
    ld = torch.zeros(y.shape[0])
    for block in reversed(list(chain)):
        a, b = y.chunk(2, dim=-1)
        if isinstance(block, rt.AffineBlock):
            cond, moved = (b, a) if block.swap else (a, b)
            s = block.clamp * torch.tanh(block.s(cond, **side) / block.clamp)
            moved = (moved - block.t(cond, **side)) * torch.exp(-s)
            ld = ld - s.flatten(1).sum(1)
            y = torch.cat([moved, cond] if block.swap else [cond, moved], -1)
        elif isinstance(block, rt.MomentumBlock):
            x = a - b
            v = (b - (1 - block.beta) * block.f(x, **side)) / block.beta
            ld = ld - b[0].numel() * math.log(block.beta)
            y = torch.cat([x, v], -1)
        else:
            x2 = b - block.g(a, **side)
            y = torch.cat([a - block.f(x2, **side), x2], -1)
    return y, ld


def step(inverse, model, y, **side):
    """``x, log_det = inverse(y)`` and one backward of a loss of both; returns ``(x, ld, grads)``."""
    y = y.detach().clone().requires_grad_()
    side = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in side.items()}
    x, ld = inverse(y, **side)
    (loss_of(x) + (ld * torch.linspace(-1, 1, ld.numel())).sum()).backward()
    grads = [y.grad, *(p.grad for p in model.parameters()), *(v.grad for v in side.values())]
    return x.detach(), ld.detach(), grads


def assert_same(a, b, tol=1e-10):
    (x, ld, grads), (x_ref, ld_ref, grads_ref) = a, b
    assert rel_err(x, x_ref) <= tol
    assert (ld - ld_ref).abs().max() <= tol * max(1.0, ld_ref.abs().max().item())
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert (g is None) == (g_ref is None), i
        assert g is None or rel_err(g, g_ref) <= tol, (i, rel_err(g, g_ref))


@pytest.mark.parametrize("kind", ["additive", "affine", "momentum", "mixed"])
@pytest.mark.parametrize("with_side_input", [False, True], ids=["plain", "side-input"])
def test_inverse_and_log_det_equal_a_hand_written_inverse(kind, with_side_input):
    chain = make(kind)
    reference = copy.deepcopy(chain)
    y = torch.randn(4, 6)
    side = {"cond": torch.randn(4, 3, requires_grad=True)} if with_side_input else {}
    got = step(chain.inverse_and_log_det, chain, y, **side)
    assert_same(got, step(lambda y, **s: hand_written_inverse(reference, y, **s), reference, y, **side))


@pytest.mark.parametrize("kind", ["additive", "affine", "momentum"])
def test_inverse_equals_the_eager_twins_and_a_block_alone_is_differentiable(kind):
    chain = make(kind, depth=1)
    twin = copy.deepcopy(chain)
    twin.reversible = False
    y = torch.randn(4, 6)
    assert_same(step(lambda y: (chain.inverse(y), torch.zeros(4)), chain, y),
                step(lambda y: (twin.inverse(y), torch.zeros(4)), twin, y))
    block, twin = copy.deepcopy(chain[0]), copy.deepcopy(twin)
    for p in (*block.parameters(), *twin.parameters()):
        p.grad = None
    assert_same(step(lambda y: (block.inverse(y), torch.zeros(4)), block, y),
                step(lambda y: (twin.inverse(y), torch.zeros(4)), twin, y))


def test_without_grad_the_inverse_keeps_nothing_and_leaves_buffers_untouched():
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(nn.Sequential(nn.BatchNorm1d(3), nn.Tanh()), unit(), dim=-1)
                                      for _ in range(2)])
    state = copy.deepcopy(chain.state_dict())
    y = torch.randn(4, 6, requires_grad=True)
    with torch.no_grad():
        x = chain.inverse(y)
    assert x.grad_fn is None
    assert all(torch.equal(v, state[k]) for k, v in chain.state_dict().items())


def test_saved_bytes_of_the_inverse_stay_flat_in_depth():
    saved = {}
    for depth in (2, 16):
        chain = make("mixed", depth=depth, d=8)
        y = torch.randn(4, 16, requires_grad=True)
        _, saved[depth] = rt.saved_activation_bytes(chain.inverse, y)
    assert saved[2] == saved[16] == 4 * 16 * 8  # the result, whatever the depth
    twin = make("mixed", depth=16, d=8)
    twin.reversible = False
    _, eager = rt.saved_activation_bytes(twin.inverse, torch.randn(4, 16, requires_grad=True))
    assert eager > 10 * saved[16]


def test_f_and_g_run_twice_per_step_through_the_inverse():
    calls = []
    chain = make("mixed", depth=3)
    for module in chain.modules():
        if isinstance(module, Conditioned):
            module.register_forward_hook(lambda *args: calls.append(1))
    chain.inverse(torch.randn(4, 6, requires_grad=True)).sum().backward()
    assert len(calls) == 2 * 5  # 2 + 2 + 1 F/G calls, each once forward and once recomputed


def test_dropout_and_batchnorm_in_the_inverse_replay_as_the_eager_twin():
    def noisy():
        return nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3), nn.Dropout(0.3), nn.Tanh())

    chain = rt.ReversibleSequential(rt.ReversibleBlock(noisy(), noisy(), dim=-1),
                                    rt.AffineBlock(noisy(), noisy(), dim=-1))
    twin = copy.deepcopy(chain)
    twin.reversible = False
    y = torch.randn(8, 6)
    results = []
    for model in (chain, twin):
        torch.manual_seed(5)
        results.append(step(lambda y: (model.inverse(y), torch.zeros(8)), model, y))
    assert_same(*results)
    for k, v in chain.state_dict().items():  # BatchNorm statistics updated once, as in eager
        assert rel_err(v.double(), twin.state_dict()[k].double()) <= 1e-12, k


@pytest.mark.parametrize("kind", ["additive", "affine", "momentum"])
def test_an_optimizer_trains_through_the_inverse_as_eager_does(kind):
    """memcnn's fwd_bwd property with bwd=True: a loss on ``block.inverse(X)``, backward and
    an optimizer step change the weights, exactly as the eager twin's."""
    chain = make(kind, depth=2)
    twin = copy.deepcopy(chain)
    twin.reversible = False
    x, target = torch.randn(5, 6), torch.randn(5, 6)
    for model in (chain, twin):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.mse_loss(model.inverse(x), target).backward()
            opt.step()
    before = make(kind, depth=2)
    assert any(not torch.equal(p, q) for p, q in zip(chain.parameters(), before.parameters()))
    for p, q in zip(chain.parameters(), twin.parameters()):
        assert rel_err(p, q) <= 1e-12


def test_reverse_kl_of_a_conditional_flow_through_inverse_and_log_det():
    """A flow trained by reverse KL: z ~ N(0, 1), x = f^-1(z | label), loss = E[U(x) - log|det dx/dz|]
    with a label embedding as the side input; every gradient equals the eager twin's."""
    embed = nn.Embedding(3, 3)

    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x, label):
            return torch.tanh(self.l(x)) + label

    flow = rt.ReversibleSequential(*[rt.AffineBlock(Shift(), Shift(), dim=-1, swap=i % 2 == 1) for i in range(4)])
    twin = copy.deepcopy(flow)
    twin.reversible = False
    z, labels = torch.randn(16, 6), torch.randint(0, 3, (16,))
    grads = []
    for model in (flow, twin):
        emb = copy.deepcopy(embed)
        x, ld = model.inverse_and_log_det(z, label=emb(labels))
        energy = 0.5 * (x.norm(dim=1) - 2).square() / 0.1  # a ring of radius 2
        (energy - ld).mean().backward()
        grads.append([p.grad for p in (*model.parameters(), *emb.parameters())])
    for g, g_twin in zip(*grads):
        assert rel_err(g, g_twin) <= 1e-10


def test_bad_input_to_the_inverse_is_refused_before_any_state_changes():
    chain = make("additive")
    state = copy.deepcopy(chain.state_dict())
    with pytest.raises(ValueError, match="expected an even size"):
        chain.inverse(torch.randn(4, 5, requires_grad=True))
    with pytest.raises(TypeError, match="keyword argument 'colour' reached no F or G"):
        chain.inverse(torch.randn(4, 6, requires_grad=True), colour="red")
    assert all(torch.equal(v, state[k]) for k, v in chain.state_dict().items())


def test_a_tensor_read_any_other_way_in_the_inverse_is_a_clear_error():
    leaf = torch.randn(3, requires_grad=True)
    chain = rt.ReversibleSequential(rt.ReversibleBlock(lambda x: x * leaf, nn.Tanh(), dim=-1))
    x = chain.inverse(torch.randn(4, 6, requires_grad=True))
    with pytest.raises(RuntimeError, match=r"blocks\[0\]\.f \(_Callable\) reads a tensor that requires grad"):
        x.sum().backward()


def test_with_grad_enabled_an_inverse_updates_buffers_as_its_eager_twin_even_if_nothing_requires_grad():
    """Found by the fuzzer's long mode: grad mode, not requires_grad, decides whether an inverse
    is a training pass (a momentum block whose f is a BatchNorm has no parameter that requires grad)."""
    chain = rt.ReversibleSequential(rt.MomentumBlock(nn.Sequential(nn.BatchNorm1d(3), nn.Tanh()), dim=-1))
    chain.requires_grad_(False)
    twin = copy.deepcopy(chain)
    twin.reversible = False
    y = torch.randn(5, 6)
    assert rel_err(chain.inverse(y), twin.inverse(y)) <= 1e-12
    for k, v in chain.state_dict().items():
        assert rel_err(v.double(), twin.state_dict()[k].double()) <= 1e-12, k
    assert chain.state_dict()["0.f.0.num_batches_tracked"] == 1
