"""Training-grade behaviour of reversible chains, each against the eager twin (issue 3)."""
import copy

import pytest
import torch
from torch import nn

import revtriton as rt
from bench.drift import drift
from helpers import DEVICES, conv_chain, conv_unit, eager_twin, loss_of, mlp, randn, rel_err
from revtriton import replay


def dropout_unit(d):
    return nn.Sequential(nn.Linear(d, d), nn.Dropout(0.3), nn.Tanh())


def _grads(module, x=None):
    return ([x.grad] if x is not None else []) + [p.grad for p in module.parameters()]


def _assert_grads_close(a, b, tol=1e-5):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert (u is None) == (v is None), i
        assert u is None or rel_err(u, v) <= tol, (i, rel_err(u, v))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_masks_replay_in_the_recompute(device):
    """Every F/G call draws its mask from the input's device generator (CUDA's for CUDA tensors),
    whose state the chain records and restores for the recompute."""
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(dropout_unit(4), dropout_unit(4), dim=-1)
                                      for _ in range(4)]).to(device)
    twin, eager = eager_twin(chain)
    x = randn(3, 8, device=device, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    torch.manual_seed(7)
    y = chain(x)
    torch.manual_seed(7)
    y_twin = eager(x_twin)
    torch.testing.assert_close(y, y_twin)
    states = [state for *_, state in y.grad_fn.recorder.calls]  # (CPU state, CUDA state or None) per call
    assert len(states) == 8 and all(s is not None and (s[1] is not None) == (device == "cuda") for s in states)
    loss_of(y).backward()
    loss_of(y_twin).backward()
    _assert_grads_close(_grads(chain, x), _grads(twin, x_twin))


@pytest.mark.parametrize("device", DEVICES)
def test_without_rng_preservation_dropout_gradients_differ(device):
    """The switch really is what makes dropout exact (a test of the test above)."""
    chain = rt.ReversibleSequential(rt.ReversibleBlock(dropout_unit(4), dropout_unit(4), dim=-1),
                                    preserve_rng_state=False).to(device)
    twin, eager = eager_twin(chain)
    x = randn(16, 8, device=device, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    torch.manual_seed(7)
    loss_of(chain(x)).backward()
    torch.manual_seed(7)
    loss_of(eager(x_twin)).backward()
    assert rel_err(x.grad, x_twin.grad) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_f_and_g_record_no_rng_state(device):
    chain = conv_chain(3, device=device)
    y = chain(randn(2, 4, 5, 5, device=device, requires_grad=True))
    assert [state for *_, state in y.grad_fn.recorder.calls] == [None] * 6


@pytest.mark.parametrize("device", DEVICES)
def test_batchnorm_statistics_after_three_steps_equal_eager(device):
    chain = conv_chain(4, device=device)
    twin, eager = eager_twin(chain)
    opt, opt_twin = (torch.optim.SGD(m.parameters(), lr=0.01) for m in (chain, twin))
    for step in range(3):
        x = randn(4, 4, 5, 5, device=device)
        for run, o in ((chain, opt), (eager, opt_twin)):
            o.zero_grad()
            loss_of(run(x)).backward()
            o.step()
    for (name, b), b_twin in zip(chain.named_buffers(), twin.buffers()):
        if name.endswith("num_batches_tracked"):
            assert b.item() == b_twin.item() == 3, name
        else:
            assert rel_err(b, b_twin) <= 1e-5, name  # a second update would be off by ~1e-1
    _assert_grads_close(_grads(chain), _grads(twin))


# The largest relative error of any gradient of a bf16-autocast step (_autocast_step) against
# the eager twin's. Measured on CPU over seeds 0-19: 5e-8 to 2e-7 with the autocast replay,
# 8e-3 to 4e-2 without it (1.7e-2 at seed 0), so 1e-3 separates the two by 5000x and 8x.
AUTOCAST_TOL = 1e-3


def _autocast_step(device):
    """One step of four MLP couplings and their eager twin under bf16 autocast: the largest
    relative gradient error (input and every parameter) and the dtypes F and G returned in the
    backward recompute."""
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(mlp(8), mlp(8), dim=-1) for _ in range(4)]).to(device)
    twin, eager = eager_twin(chain)
    recomputed = []
    for fn in [m for block in chain for m in (block.f, block.g)]:  # forward runs F and G without grad
        fn.register_forward_hook(lambda m, i, out: recomputed.append(out.dtype) if torch.is_grad_enabled() else None)
    x = randn(4, 3, 16, device=device, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = chain(x)
        y_twin = eager(x_twin)
    assert y.dtype == torch.float32  # the streams keep their precision
    loss_of(y).backward()
    loss_of(y_twin).backward()
    return max(rel_err(a, b) for a, b in zip(_grads(chain, x), _grads(twin, x_twin))), recomputed


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_is_replayed_in_the_recompute(device):
    error, recomputed = _autocast_step(device)
    assert recomputed == [torch.bfloat16] * 8  # G4, F4, ..., G1, F1 in bf16, as in forward
    assert error <= AUTOCAST_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_without_autocast_replay_gradients_miss_the_tolerance(device, monkeypatch):
    """A test of the test above: with the recorder seeing autocast as off (and nothing else
    changed), the recompute runs F and G in fp32 and some gradient misses AUTOCAST_TOL."""
    init = replay.Recorder.__init__

    def init_recording_autocast_as_off(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.autocast = {device_type: (False, dtype) for device_type, (_, dtype) in self.autocast.items()}

    monkeypatch.setattr(replay.Recorder, "__init__", init_recording_autocast_as_off)
    error, recomputed = _autocast_step(device)
    assert recomputed == [torch.float32] * 8
    assert error > AUTOCAST_TOL


def test_fp32_streams_reconstruct_far_better_than_bf16_streams():
    depths = (1, 8, 32)
    fp32 = [drift(d, torch.float32) for d in depths]
    bf16 = [drift(d, torch.bfloat16) for d in depths]
    assert fp32[0] < 1e-6 and fp32[1] < 1e-6
    assert all(a < b / 10 for a, b in zip(fp32, bf16))
    assert bf16[0] < bf16[1] < bf16[2]  # bf16 streams drift with depth


def test_autograd_grad_equals_eager():
    chain = conv_chain(3)
    twin, eager = eager_twin(chain)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    grads = torch.autograd.grad(loss_of(chain(x)), [x, *chain.parameters()])
    grads_twin = torch.autograd.grad(loss_of(eager(x)), [x, *twin.parameters()])
    _assert_grads_close(list(grads), list(grads_twin))
    assert all(p.grad is None for p in chain.parameters())


def test_second_backward_without_retain_graph_raises_pytorchs_error():
    y = conv_chain(2)(torch.randn(2, 4, 5, 5, requires_grad=True))
    loss = loss_of(y)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_gradient_accumulation_over_micro_batches_equals_eager():
    chain = conv_chain(3)
    twin, eager = eager_twin(chain)
    batches = [torch.randn(2, 4, 5, 5) for _ in range(3)]
    losses = [loss_of(chain(b)) for b in batches]  # all forwards first, then all backwards
    for loss in losses:
        loss.backward()
    for b in batches:
        loss_of(eager(b)).backward()
    _assert_grads_close(_grads(chain), _grads(twin))


def test_weight_sharing_equals_eager():
    """The same chain called twice in one graph, and one block used twice in a chain."""
    block = rt.ReversibleBlock(conv_unit(2), conv_unit(2))
    chain = rt.ReversibleSequential(block, rt.ReversibleBlock(conv_unit(2), conv_unit(2)), block)
    twin, eager = eager_twin(chain)
    assert twin[0] is twin[2]
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    loss_of(chain(chain(x))).backward()
    loss_of(eager(eager(x_twin))).backward()
    _assert_grads_close(_grads(chain, x), _grads(twin, x_twin))


def test_input_without_grad_still_trains_the_parameters():
    chain = conv_chain(2)
    twin, eager = eager_twin(chain)
    x = torch.randn(2, 4, 5, 5)
    loss_of(chain(x)).backward()
    loss_of(eager(x)).backward()
    _assert_grads_close(_grads(chain), _grads(twin))


def test_frozen_parameters_get_no_gradient():
    chain = conv_chain(2)
    for p in chain[0].f.parameters():
        p.requires_grad_(False)
    twin, eager = eager_twin(chain)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    y = chain(x)
    assert len(y.grad_fn.next_functions) == 1 + sum(p.requires_grad for p in chain.parameters())
    loss_of(y).backward()
    loss_of(eager(x.detach().requires_grad_())).backward()
    assert all(p.grad is None for p in chain[0].f.parameters())
    _assert_grads_close(_grads(chain), _grads(twin))


def test_inference_in_eval_mode_equals_eager_and_keeps_nothing():
    chain = conv_chain(3)
    for m in chain.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    chain.eval()
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with torch.no_grad():
        y, saved = rt.saved_activation_bytes(chain, x)
        expected = eager_twin(chain)[1](x)
    assert saved == 0 and y.grad_fn is None
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("make_input,error,match", [
    (lambda: torch.randn(2, 5, 4, 4), ValueError, r"size along dim=1 is 5; expected an even size"),
    (lambda: torch.ones(2, 4, 4, 4, dtype=torch.long), TypeError, r"dtype torch.int64; expected a floating"),
    (lambda: torch.ones(2, 4, 4, 4, dtype=torch.bool), TypeError, r"dtype torch.bool; expected a floating"),
    (lambda: torch.randn(4), ValueError, r"dim=1 is out of range for an input of shape \(4,\)"),
    (lambda: [1.0, 2.0], TypeError, r"input is list; expected a torch.Tensor"),
])
def test_bad_input_is_refused_before_any_state_changes(make_input, error, match):
    chain = conv_chain(2)
    state = copy.deepcopy(chain.state_dict())
    with pytest.raises(error, match=match):
        chain(make_input())
    assert all(torch.equal(v, state[k]) for k, v in chain.state_dict().items())


@pytest.mark.parametrize("f,match", [
    (nn.Linear(2, 3), r"f returned shape \(3, 3\); expected \(3, 2\)"),
    (lambda x: x.double(), r"f returned dtype torch.float64; expected torch.float32"),
    (lambda x: x.to("meta"), r"f returned a tensor on meta; expected cpu"),
    (lambda x: (x, x), r"f returned tuple; expected a tensor"),
])
def test_f_changing_shape_dtype_or_device_is_a_clear_error(f, match):
    block = rt.ReversibleBlock(f, nn.Identity(), dim=-1)
    with pytest.raises((ValueError, TypeError), match=match):
        block(torch.randn(3, 4, requires_grad=True))


def test_f_and_g_must_be_modules_or_callables():
    with pytest.raises(TypeError, match="g is int; expected an nn.Module or a callable"):
        rt.ReversibleBlock(nn.Identity(), 3)
    with pytest.raises(TypeError, match=r"dim is 1.0; expected an int"):
        rt.ReversibleBlock(nn.Identity(), nn.Identity(), dim=1.0)
    with pytest.raises(TypeError, match=r"blocks\[1\] is Linear; expected a reversible block"):
        rt.ReversibleSequential(rt.ReversibleBlock(nn.Identity(), nn.Identity()), nn.Linear(2, 2))


def test_nan_and_inf_propagate_and_empty_batches_work():
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(mlp(2), mlp(2), dim=-1) for _ in range(2)])
    x = torch.randn(3, 4)
    x[0, 0], x[1, 3] = float("nan"), float("inf")
    y = chain(x.requires_grad_())
    assert y[0].isnan().any() and not y[2].isnan().any() and y[2].isfinite().all()
    empty = torch.randn(0, 4, requires_grad=True)
    y = chain(empty)
    y.sum().backward()
    assert y.shape == (0, 4) and empty.grad.shape == (0, 4)


def test_modifying_the_output_in_place_before_backward_raises():
    y = conv_chain(2)(torch.randn(2, 4, 5, 5, requires_grad=True))
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_debug_switch_keeps_every_activation_and_computes_the_same():
    chain = conv_chain(4)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    y, saved = rt.saved_activation_bytes(chain, x)
    chain.reversible = False
    y_eager, saved_eager = rt.saved_activation_bytes(chain, x)
    torch.testing.assert_close(y, y_eager)
    assert saved_eager > 4 * saved


def test_forward_hooks_fire_in_forward_and_again_in_the_recompute():
    block = rt.ReversibleBlock(conv_unit(2), conv_unit(2))
    calls = []
    block.f.register_forward_hook(lambda m, i, o: calls.append(("f", torch.is_grad_enabled())))
    block.g.register_forward_hook(lambda m, i, o: calls.append(("g", torch.is_grad_enabled())))
    y = block(torch.randn(2, 4, 5, 5, requires_grad=True))
    assert calls == [("f", False), ("g", False)]
    y.sum().backward()
    assert calls[2:] == [("g", True), ("f", True)]
