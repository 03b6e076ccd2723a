"""No silent wrong gradient (issue 15): each case a user reached, run as a reversible chain and
as its eager twin (``reversible=False`` on a deep copy) in float64. Each ends as "equals eager"
or as an error, raised before anything is corrupted, that names the block."""
import copy

import pytest
import torch
from torch import nn

import revtriton as rt
from revtriton import replay
from helpers import AddendParam, AddendSide, loss_of, rel_err

@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def run_both(chain, x, between=None, **side):
    """``(reversible, eager)``, each ``(output, [input grad, *parameter grads, *side grads], state)``
    after one step of ``loss_of`` on ``chain`` and on its eager twin; ``between(model)`` runs
    between forward and backward."""
    twin = copy.deepcopy(chain)
    twin.reversible = False
    results = []
    for model in (chain, twin):
        x_ = x.detach().clone().requires_grad_()
        side_ = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in side.items()}
        torch.manual_seed(3)
        y = model(x_, **side_)
        out = y[0] if isinstance(y, tuple) else y
        loss = loss_of(out) + (y[1].square().sum() if isinstance(y, tuple) else 0)
        if between is not None:
            between(model)
        loss.backward()
        grads = [x_.grad, *(p.grad for p in model.parameters()), *(v.grad for v in side_.values())]
        results.append((out.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}))
    return results


def assert_equal_to_eager(chain, x, between=None, tol=1e-10, **side):
    (y, grads, state), (y_twin, grads_twin, state_twin) = run_both(chain, x, between, **side)
    assert rel_err(y, y_twin) <= tol
    for i, (g, g_twin) in enumerate(zip(grads, grads_twin)):
        assert (g is None) == (g_twin is None), i
        assert g is None or rel_err(g, g_twin) <= tol, (i, rel_err(g, g_twin))
    for k in state:
        assert rel_err(state[k].double(), state_twin[k].double()) <= tol, k


def tanh_linear(d):
    return nn.Sequential(nn.Linear(d, d), nn.Tanh())


@pytest.mark.parametrize("where", ["f", "g", "both"])
def test_a_side_input_of_a_halfs_shape_added_in_f_or_g_gets_eagers_gradient(where):
    f = AddendSide(3) if where in ("f", "both") else tanh_linear(3)
    g = AddendSide(3) if where in ("g", "both") else tanh_linear(3)
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(copy.deepcopy(f), copy.deepcopy(g), dim=-1)
                                      for _ in range(3)])
    assert_equal_to_eager(chain, torch.randn(4, 6), cond=torch.randn(4, 3, requires_grad=True))


def test_a_parameter_of_a_halfs_shape_gets_eagers_gradient():
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(AddendParam((1, 3)), AddendParam((1, 3)), dim=-1)
                                      for _ in range(3)])
    assert_equal_to_eager(chain, torch.randn(1, 6))


@pytest.mark.parametrize("log_det", [False, True])
def test_an_affine_shift_that_adds_a_side_input_gets_eagers_gradient(log_det):
    chain = rt.ReversibleSequential(*[rt.AffineBlock(tanh_linear(3), AddendSide(3), dim=-1, swap=i % 2 == 1)
                                      for i in range(3)], log_det=log_det)
    assert_equal_to_eager(chain, torch.randn(4, 6), cond=torch.randn(4, 3, requires_grad=True))


def test_a_momentum_f_that_adds_a_side_input_gets_eagers_gradient():
    chain = rt.ReversibleSequential(*[rt.MomentumBlock(AddendSide(3), dim=-1) for _ in range(3)])
    assert_equal_to_eager(chain, torch.randn(4, 6), cond=torch.randn(4, 3, requires_grad=True))


def test_a_gradient_hook_on_a_parameter_fires_once_as_in_eager():
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(tanh_linear(3), tanh_linear(3), dim=-1) for _ in range(2)])
    twin = copy.deepcopy(chain)
    twin.reversible = False
    fired = {}
    for name, model in (("rev", chain), ("eager", twin)):
        model[0].f[0].weight.register_hook(lambda g, name=name: fired.setdefault(name, []).append(1) or g * 2)
    x = torch.randn(4, 6)
    for model in (chain, twin):
        loss_of(model(x.clone().requires_grad_())).backward()
    assert fired == {"rev": [1], "eager": [1]}
    assert rel_err(chain[0].f[0].weight.grad, twin[0].f[0].weight.grad) <= 1e-10


def test_a_parameter_replaced_between_forward_and_backward_gets_the_gradient_as_in_eager():
    """The recompute runs the module as it is only while its slots hold the forward's tensors;
    here it swaps the forward's weight back in, and the new one gets no gradient, as in eager."""
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(tanh_linear(3), tanh_linear(3), dim=-1) for _ in range(2)])
    twin = copy.deepcopy(chain)
    twin.reversible = False
    x = torch.randn(4, 6)
    grads = []
    for model in (chain, twin):
        old = model[0].f[0].weight
        loss = loss_of(model(x.clone().requires_grad_()))
        model[0].f[0].weight = nn.Parameter(torch.randn(3, 3))
        loss.backward()
        assert model[0].f[0].weight.grad is None
        grads.append(old.grad)
    assert rel_err(*grads) <= 1e-10


class EMANormaliser(nn.Module):
    """Updates its running mean (in training), then subtracts it: the forward reads the buffer
    it has just written."""

    def __init__(self, d, momentum=0.5):
        super().__init__()
        self.l = nn.Linear(d, d)
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(d))

    def forward(self, x):
        h = self.l(x)
        if self.training:
            with torch.no_grad():
                self.mean.mul_(self.momentum).add_((1 - self.momentum) * h.mean(0))
        return torch.tanh(h - self.mean)


def old_spectral_norm(d):
    return nn.Sequential(torch.nn.utils.spectral_norm(nn.Linear(d, d)), nn.Tanh())


def new_spectral_norm(d):
    return nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(nn.Linear(d, d)), nn.Tanh())


@pytest.mark.parametrize("make", [EMANormaliser, old_spectral_norm, new_spectral_norm])
def test_buffers_read_after_their_update_replay_as_the_forward_read_them(make):
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(make(3), make(3), dim=-1) for _ in range(3)])
    assert_equal_to_eager(chain, torch.randn(5, 6))


def test_a_module_shared_by_two_blocks_replays_each_calls_buffers():
    f = EMANormaliser(3)
    chain = rt.ReversibleSequential(rt.ReversibleBlock(f, tanh_linear(3), dim=-1),
                                    rt.ReversibleBlock(f, EMANormaliser(3), dim=-1))
    assert_equal_to_eager(chain, torch.randn(5, 6))


def test_create_graph_is_refused_with_a_clear_error():
    chain = rt.ReversibleSequential(rt.ReversibleBlock(tanh_linear(3), tanh_linear(3), dim=-1))
    x = torch.randn(4, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"create_graph=True.*reversible=False"):
        torch.autograd.grad(chain(x).sum(), x, create_graph=True)


@pytest.mark.parametrize("batch_norm", [True, False], ids=["with-buffers", "parameters-only"])
def test_eval_between_forward_and_backward_replays_the_forwards_training_flags(batch_norm):
    def unit():
        return nn.Sequential(*[nn.BatchNorm1d(3)] * batch_norm, nn.Linear(3, 3), nn.Dropout(0.5), nn.Tanh())

    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(unit(), unit(), dim=-1) for _ in range(2)])
    assert_equal_to_eager(chain, torch.randn(5, 6), between=lambda model: model.eval())
    assert not chain.training  # the recompute left the flags as the caller set them


def test_a_parameter_modified_in_place_before_backward_raises_as_in_eager():
    chain = rt.ReversibleSequential(rt.ReversibleBlock(tanh_linear(3), tanh_linear(3), dim=-1))
    y = chain(torch.randn(4, 6, requires_grad=True))
    with torch.no_grad():
        chain[0].f[0].weight.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_buffer_the_forward_read_modified_in_place_before_backward_raises():
    chain = rt.ReversibleSequential(rt.ReversibleBlock(EMANormaliser(3), tanh_linear(3), dim=-1)).eval()
    y = chain(torch.randn(4, 6, requires_grad=True))
    chain[0].f.mean.add_(1)
    with pytest.raises(RuntimeError, match=r"blocks\[0\]\.f .*buffer 'mean'.*modified in place"):
        y.sum().backward()


@pytest.mark.parametrize("grad", [True, False])
def test_an_in_place_first_op_is_refused_naming_the_block(grad):
    chain = rt.ReversibleSequential(rt.ReversibleBlock(tanh_linear(3), tanh_linear(3), dim=-1),
                                    rt.ReversibleBlock(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 3)),
                                                       tanh_linear(3), dim=-1))
    x = torch.randn(4, 6, requires_grad=grad)
    with pytest.raises(RuntimeError, match=r"blocks\[1\]\.f \(Sequential\) modified its input in place"):
        chain(x)


class FailsWhenArmed(nn.Module):
    """``tanh(l(x))`` that raises KeyboardInterrupt in the recompute (its input then requires
    grad) while ``armed``."""

    armed = False

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 3)

    def forward(self, x):
        if self.armed and x.requires_grad:
            raise KeyboardInterrupt
        return torch.tanh(self.l(x))


def interrupted_chain():
    return rt.ReversibleSequential(rt.ReversibleBlock(FailsWhenArmed(), tanh_linear(3), dim=-1),
                                   rt.ReversibleBlock(tanh_linear(3), tanh_linear(3), dim=-1))


def test_a_backward_interrupted_in_the_recompute_says_so_when_run_again():
    chain = interrupted_chain()
    x = torch.randn(4, 6, requires_grad=True)
    loss = chain(x).sum()  # nothing else holds the output (SumBackward keeps no tensor): backward frees it
    chain[0].f.armed = True
    with pytest.raises(KeyboardInterrupt):
        loss.backward()
    chain[0].f.armed = False
    with pytest.raises(RuntimeError, match="interrupted.*run the forward again"):
        loss.backward()
    loss_of(chain(x)).backward()  # a new forward trains again
    assert x.grad is not None


def test_a_backward_interrupted_while_the_caller_holds_the_output_runs_again():
    chain = interrupted_chain()
    x = torch.randn(4, 6, requires_grad=True)
    y = chain(x)
    chain[0].f.armed = True
    with pytest.raises(KeyboardInterrupt):
        loss_of(y).backward()
    chain[0].f.armed = False
    loss_of(y).backward()
    twin = copy.deepcopy(chain)
    twin.reversible = False
    x_twin = x.detach().clone().requires_grad_()
    loss_of(twin(x_twin)).backward()
    assert rel_err(x.grad, x_twin.grad) <= 1e-10


@pytest.mark.parametrize("kind", ["forward_pre", "forward", "backward"])
def test_hooks_on_a_block_inside_a_chain_are_refused_at_the_call(kind):
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(tanh_linear(3), tanh_linear(3), dim=-1) for _ in range(2)])
    register = {"forward_pre": chain[1].register_forward_pre_hook,
                "forward": chain[1].register_forward_hook,
                "backward": chain[1].register_full_backward_hook}[kind]
    register(lambda *args: None)
    with pytest.raises(RuntimeError, match=r"blocks\[1\] .*hook"):
        chain(torch.randn(4, 6, requires_grad=True))


def test_hooks_on_a_block_called_alone_fire():
    block = rt.ReversibleBlock(tanh_linear(3), tanh_linear(3), dim=-1)
    fired = []
    block.register_forward_hook(lambda *args: fired.append(1))
    block(torch.randn(4, 6, requires_grad=True)).sum().backward()
    assert fired == [1]


def test_an_unknown_keyword_names_the_chain_by_what_its_f_and_g_take():
    class Conditioned(nn.Module):
        def forward(self, x, cond):
            return x * cond

    inner = rt.ReversibleSequential(*[rt.ReversibleBlock(Conditioned(), nn.Tanh(), dim=-1) for _ in range(5)])
    with pytest.raises(TypeError, match=r"'mask' reached no F or G of the chain.*In this chain, blocks\[0\]\.f "
                                        r"\(Conditioned\), blocks\[1\]\.f \(Conditioned\), blocks\[2\]\.f "
                                        r"\(Conditioned\) and 2 more take cond; blocks\[0\]\.g \(Tanh\), .* take "
                                        r"no keyword"):
        inner(torch.randn(2, 4), cond=torch.ones(2, 2), mask=None)


def test_a_dataclass_side_input_holding_a_tensor_that_requires_grad_is_refused_unless_registered():
    import dataclasses

    @dataclasses.dataclass
    class Context:
        memory: torch.Tensor

    class ReadsContext(nn.Module):
        def forward(self, x, ctx):
            return x * ctx.memory

    chain = rt.ReversibleSequential(rt.ReversibleBlock(ReadsContext(), nn.Tanh(), dim=-1))
    memory = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(TypeError, match=r"side input 'ctx' is a Context \(a dataclass\) whose field 'memory' .*"
                                        r"register_dataclass\(Context\)"):
        chain(torch.randn(3, 4), ctx=Context(memory))
    torch.utils._pytree.register_dataclass(Context)
    try:
        x = torch.randn(3, 4, requires_grad=True)
        chain(x, ctx=Context(memory)).sum().backward()
        twin = copy.deepcopy(chain)
        twin.reversible = False
        m2 = memory.detach().clone().requires_grad_()
        twin(x.detach(), ctx=Context(m2)).sum().backward()
        assert rel_err(memory.grad, m2.grad) <= 1e-10
    finally:
        torch.utils._pytree._deregister_pytree_node(Context)


@pytest.mark.parametrize("grad", [True, False])
def test_f_modifying_a_side_input_in_place_is_refused_naming_the_block_and_keyword(grad):
    class Increments(nn.Module):
        def forward(self, x, m):
            m.add_(1.0)
            return torch.tanh(x * m)

    chain = rt.ReversibleSequential(rt.ReversibleBlock(tanh_linear(3), Increments(), dim=-1))
    with pytest.raises(RuntimeError, match=r"blocks\[0\]\.g \(Increments\) modified its side input 'm' in place"):
        chain(torch.randn(4, 6, requires_grad=grad), m=torch.randn(3))


def test_a_chain_and_its_modules_are_freed_once_nothing_holds_them():
    """revtriton.structure's cache holds no reference to a module (it kept every F, G and block
    alive, and their parameters, for the life of the process)."""
    import gc
    import weakref

    chain = rt.ReversibleSequential(rt.ReversibleBlock(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.Tanh())),
                                    rt.AffineBlock(nn.Linear(3, 3), nn.Linear(3, 3)))
    chain(torch.randn(2, 6, requires_grad=True)).sum().backward()
    refs = [weakref.ref(m) for m in chain.modules()]
    del chain
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)

    class Model(nn.Module):  # F a method of the model, and a submodule reaching its parent again
        def __init__(self):
            super().__init__()
            self.chain = rt.ReversibleSequential(rt.ReversibleBlock(self.f, nn.Linear(3, 3)))
            self.chain[0].g.owner = [self.chain[0]]

        def f(self, x):  # parameter-free: F reads nothing of the model but its method
            return x.tanh() * 2

    model = Model()
    model.chain(torch.randn(2, 6, requires_grad=True)).sum().backward()
    refs = [weakref.ref(m) for m in model.modules()]
    del model
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)


def test_the_cached_structure_sees_parameters_and_modules_registered_after_a_first_step():
    """revtriton.structure caches each module's walk until something is registered: a parameter
    swapped in or a submodule added after a step takes part in the next one, as in eager."""
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(tanh_linear(3), tanh_linear(3), dim=-1) for _ in range(2)])
    x = torch.randn(4, 6)
    chain(x.requires_grad_()).sum().backward()
    chain[0].f[0].weight = nn.Parameter(torch.randn(3, 3))  # a new parameter object
    chain[1].g.append(nn.Linear(3, 3))  # a new submodule
    del chain[1].f[0].bias  # a slot deleted without registration
    chain[1].f[0].register_parameter("bias", None)
    chain.zero_grad(set_to_none=True)
    assert_equal_to_eager(chain, x)


def test_capture_of_a_chain_that_replays_the_cuda_rng_is_refused_saying_what_to_do(monkeypatch):
    """PyTorch forbids reading the CUDA RNG state during CUDA graph capture: the recorder says why
    and what to do before reading it (tests/test_cuda_graphs.py captures on a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot run while a CUDA graph is captured.*preserve_rng_state=False"):
        replay.Recorder(torch.device("cuda"))
    replay.Recorder(torch.device("cuda"), preserve_rng_state=False)  # reads no RNG state: nothing to refuse
    recorder = replay.Recorder(torch.device("cuda"), preserve_rng_state=False)
    state = replay.RngState(torch.get_rng_state(), None, b"")  # a call of a forward run before capture drew
    with pytest.raises(RuntimeError, match="cannot run while a CUDA graph is captured"):
        with recorder._replayed(state, []):
            pass


def test_f_returning_a_foreign_leaf_itself_is_refused_like_one_it_computes_with():
    """F = lambda x: w, with w a leaf that requires grad and no input of F: its graph is w alone
    (no grad_fn), so the read check tests the output itself (it found nothing, and w got no gradient)."""
    w = torch.randn(2, 3, requires_grad=True)
    chain = rt.ReversibleSequential(rt.ReversibleBlock(lambda x: w, nn.Linear(3, 3)))
    with pytest.raises(RuntimeError, match=r"blocks\[0\].f \(_Callable\) reads a tensor that requires grad"):
        chain(torch.randn(2, 6)).sum().backward()


def test_the_recompute_engine_call_gives_autograd_grads_result():
    """replay._grads calls torch's private _engine_run_backward for plain tensors (and the read
    check tests node types against torch._C._functions.AccumulateGrad): pinned here, so a torch
    that renames or changes them fails this test by name."""
    x, w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(4, 4, dtype=torch.float64,
                                                                                requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    grad = torch.randn(3, 4, dtype=torch.float64)
    out = (x @ w).tanh()
    expected = torch.autograd.grad(out, (x, w, unused), grad, allow_unused=True, retain_graph=True)
    got = replay._grads(out, (x, w, unused), grad)
    assert got[2] is None and all(torch.equal(a, b) for a, b in zip(got[:2], expected[:2]))
    assert type(x.view_as(x).grad_fn.next_functions[0][0]) is replay._AccumulateGrad
