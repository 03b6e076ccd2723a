"""Deployment (issue 11): torch.export, TorchScript tracing, inference compile, the meta device,
ReversibleSequential as a container, and torch.func."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import revtriton as rt
from helpers import conv_unit, loss_of, rel_err
from revtriton import models
from test_compile import Net


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _flow():
    return rt.ReversibleSequential(*[rt.AffineBlock(conv_unit(2), conv_unit(2), swap=i % 2 == 1) for i in range(3)],
                                   log_det=True)


def _eval(model):
    """``model`` in eval mode with BatchNorm statistics that are not the identity."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


# (model, args, kwargs): a RevNet-like stage, a masked causal transformer (side inputs), a flow
CASES = {
    "net": lambda: (Net(), (torch.randn(2, 3, 5, 5),), {}),
    "transformer": lambda: (models.reversible_transformer(16, 2, 2), (torch.randn(3, 6, 16),),
                            {"key_padding_mask": torch.arange(6)[None] >= torch.tensor([[6], [4], [2]]), "causal": True}),
    "flow": lambda: (_flow(), (torch.randn(2, 4, 5, 5),), {}),
}


def _same(got, expected, tol=1e-5):
    got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
    assert len(got) == len(expected) and all(rel_err(g.detach(), e) <= tol for g, e in zip(got, expected))


@pytest.mark.parametrize("case", CASES)
def test_exported_module_equals_the_model_with_grad_enabled_or_not(case):
    model, args, kwargs = CASES[case]()
    model = _eval(model)
    with torch.no_grad():
        expected = model(*args, **kwargs)
    exported = torch.export.export(model, args, kwargs).module()
    for grad_enabled in (True, False):
        with torch.set_grad_enabled(grad_enabled):
            _same(exported(*args, **kwargs), expected)


@pytest.mark.parametrize("strict", [False, True])
def test_the_exported_graph_is_ordinary_ops(strict):
    model, args, _ = CASES["net"]()
    graph = torch.export.export(_eval(model), args, strict=strict).graph
    assert not [n for n in graph.nodes if "revtriton" in str(n.target)]


def test_torchscript_trace_records_the_chain_as_ordinary_ops():
    model, args, _ = CASES["net"]()
    model = _eval(model)
    traced = torch.jit.trace(model, args)
    with torch.no_grad():
        _same(traced(*args), model(*args))
    y = traced(*args)
    loss_of(y).backward()  # an ordinary graph: it differentiates
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("case", CASES)
def test_inference_compile_traces_the_chain_whole_with_the_coupling_ops(case, mode):
    model, args, kwargs = CASES[case]()
    model = _eval(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with mode():
        expected = model(*args, **kwargs)
        got = torch.compile(model, fullgraph=True, backend=backend)(*args, **kwargs)
    _same(got, expected)
    assert len(graphs) == 1
    ops = {str(node.target) for node in graphs[0].graph.nodes}
    expected_op = "revtriton.affine_forward" if case == "flow" else "revtriton.coupling_forward"
    assert any(expected_op in op for op in ops), ops


def test_inference_compile_with_inductor_equals_eager():
    model, args, kwargs = CASES["transformer"]()
    model = _eval(model)
    with torch.no_grad():
        _same(torch.compile(model, fullgraph=True, backend="inductor")(*args, **kwargs), model(*args, **kwargs))


META = {
    "chain": (lambda: rt.ReversibleSequential(*[rt.ReversibleBlock(conv_unit(2), conv_unit(2)) for _ in range(2)]),
              (2, 4, 5, 5), (2, 4, 5, 5)),
    "additive block": (lambda: rt.ReversibleBlock(conv_unit(2), conv_unit(2)), (2, 4, 5, 5), (2, 4, 5, 5)),
    "affine block": (lambda: rt.AffineBlock(conv_unit(2), conv_unit(2)), (2, 4, 5, 5), (2, 4, 5, 5)),
    "momentum block": (lambda: rt.MomentumBlock(conv_unit(2)), (2, 4, 5, 5), (2, 4, 5, 5)),
    **{name: (getattr(models, name), (2, 3, 32, 32), (2, 10))
       for name in ("revnet38", "revnet110", "revnet164", "resnet32", "resnet110", "resnet164")},
    "transformer": (lambda: models.reversible_transformer(32, 2, 2), (2, 7, 32), (2, 7, 32)),
}


@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("name", [*META, "encoder-decoder"])
def test_a_forward_on_the_meta_device_gives_meta_tensors_of_the_right_shape(name, grad_enabled):
    with torch.device("meta"), torch.set_grad_enabled(grad_enabled):
        if name == "encoder-decoder":
            model, src, tgt = models.EncoderDecoder(16, 2, 2), torch.randn(2, 5, 16), torch.randn(2, 3, 16)
            y, expected = model(src, tgt, src_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), (2, 3, 16)
        else:
            make, shape, expected = META[name]
            y = make()(torch.randn(shape))
    assert y.device.type == "meta" and tuple(y.shape) == expected


def _block():
    return rt.ReversibleBlock(nn.Linear(2, 2), nn.Tanh(), dim=-1)


def test_slicing_gives_a_chain_of_those_blocks_with_the_same_settings():
    chain = rt.ReversibleSequential(*[_block() for _ in range(4)], preserve_rng_state=False, reversible=False)
    part = chain[1:3]
    assert isinstance(part, rt.ReversibleSequential) and list(part) == list(chain)[1:3]
    assert list(part.state_dict()) == [k for k in chain.state_dict() if k[0] in "12"]  # names kept
    assert (part.preserve_rng_state, part.reversible, part.log_det) == (False, False, False)
    assert chain[-1] is list(chain)[-1]


@pytest.mark.parametrize("add, position", [
    (lambda c: c.append(nn.Linear(4, 4)), 3),
    (lambda c: c.insert(1, nn.Linear(4, 4)), 1),
    (lambda c: c.extend([_block(), nn.ReLU()]), 4),
    (lambda c: c.__setitem__(0, nn.ReLU()), 0),
    (lambda c: c.__iadd__(nn.Sequential(nn.ReLU())), 3),
])
def test_adding_a_module_that_is_no_reversible_block_is_a_type_error_naming_its_position(add, position):
    chain = rt.ReversibleSequential(*[_block() for _ in range(3)])
    before = list(chain)
    with pytest.raises(TypeError, match=rf"blocks\[{position}\] is \w+; expected a reversible block"):
        add(chain)
    assert list(chain) == before  # nothing added


def test_plus_and_times_give_chains_and_del_removes_a_block():
    a, b = rt.ReversibleSequential(_block(), _block()), rt.ReversibleSequential(_block())
    assert isinstance(a + b, rt.ReversibleSequential) and list(a + b) == list(a) + list(b)
    assert isinstance(a * 2, rt.ReversibleSequential) and list(2 * a) == list(a) * 2  # shared blocks
    with pytest.raises(ValueError, match="settings differ"):
        a + rt.ReversibleSequential(_block(), log_det=True)
    with pytest.raises(TypeError, match="adds another ReversibleSequential; got Sequential"):
        a + nn.Sequential(_block())
    first = a[1]
    del a[0]
    assert list(a) == [first] and list(a._modules) == ["0"]
    x = torch.randn(3, 4, requires_grad=True)
    twin = copy.deepcopy(a)
    twin.reversible = False
    _same(a(x), twin(x))


def test_an_empty_chain_is_the_identity():
    x = torch.randn(3, 4, requires_grad=True)
    empty = rt.ReversibleSequential()
    assert empty(x) is x and empty.inverse(x) is x
    y, log_det = rt.ReversibleSequential(log_det=True)(x)
    assert y is x and torch.equal(log_det, torch.zeros(3))
    assert rt.ReversibleSequential(*[_block() for _ in range(3)])[3:](x) is x


def test_functional_call_of_a_model_holding_chains_equals_eager():
    model = nn.Sequential(nn.Linear(6, 4), rt.ReversibleSequential(_block(), _block()), nn.Linear(4, 2))
    twin = copy.deepcopy(model)
    twin[1].reversible = False
    params = {k: (v * 1.5).detach().requires_grad_() for k, v in model.named_parameters()}  # not the module's own
    params_twin = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    x = torch.randn(4, 6)
    y, y_twin = functional_call(model, params, (x,)), functional_call(twin, params_twin, (x,))
    _same(y, y_twin)
    loss_of(y).backward()
    loss_of(y_twin).backward()
    assert all(rel_err(params[k].grad, params_twin[k].grad) <= 1e-5 for k in params)
    assert all(p.grad is None for p in model.parameters())


def test_per_sample_gradients_under_vmap_are_refused_with_the_way_out():
    model = nn.Sequential(nn.Linear(6, 4), rt.ReversibleSequential(_block(), _block()))
    params = dict(model.named_parameters())

    def loss(p, xi):
        return functional_call(model, p, (xi[None],)).square().sum()

    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"cannot run under torch\.func transforms.*reversible=False"):
        vmap(grad(loss), in_dims=(None, 0))(params, x)
    model[1].reversible = False  # the way out: the eager twin
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    expected = grad(loss)(params, x[1])
    assert all(rel_err(per_sample[k][1], expected[k]) <= 1e-5 for k in params)


@pytest.mark.parametrize("grad_enabled", [False, True])
def test_forward_mode_ad_is_refused_with_the_way_out(grad_enabled):
    """Within forward_ad.dual_level the chain's in-place kernels carry no tangent: without grad
    its output silently had none (found by review). The eager twin carries it."""
    import torch.autograd.forward_ad as fwAD

    chain = rt.ReversibleSequential(_block(), _block()).double()
    x, tangent = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with torch.set_grad_enabled(grad_enabled), fwAD.dual_level():
        with pytest.raises(RuntimeError, match=r"within forward-mode AD.*reversible=False"):
            chain(fwAD.make_dual(x, tangent))
        with pytest.raises(RuntimeError, match=r"within forward-mode AD"):
            chain.inverse(fwAD.make_dual(x, tangent))
        chain.reversible = False  # the way out: the eager twin
        y = chain(fwAD.make_dual(x, tangent))
        assert fwAD.unpack_dual(y).tangent is not None
