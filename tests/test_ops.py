"""The torch.library ops: opcheck, the CPU reference path, compile, bad input."""
import re

import pytest
import torch
from torch.library import opcheck

import revtriton  # noqa: F401  (registers torch.ops.revtriton.*)

def _args(n, shape=(3, 5)):
    return [torch.randn(shape) for _ in range(n)]


@pytest.mark.parametrize("name", ["coupling_forward", "coupling_inverse", "coupling_backward"])
def test_opcheck(name):
    op = getattr(torch.ops.revtriton, name)
    n = 4 if name == "coupling_backward" else 2
    opcheck(op, tuple(_args(n)))
    opcheck(op, tuple(_args(n, shape=(2, 6, 3))[:n]))


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["triton-interpreter", "torch-reference"])
def test_both_cpu_paths_compute_the_coupling(interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    a, b, c, d = _args(4)
    expected = a + b, a + b - d, c + b
    torch.ops.revtriton.coupling_forward(a, b)
    torch.testing.assert_close(a, expected[0])
    torch.ops.revtriton.coupling_backward(a, d, c, b)
    torch.testing.assert_close(a, expected[1])
    torch.testing.assert_close(c, expected[2])
    torch.ops.revtriton.coupling_inverse(c, b)
    torch.testing.assert_close(c, expected[2] - b)


def test_ops_compile_fullgraph():
    def step(y, g, dy, gy):
        torch.ops.revtriton.coupling_backward(y, g, dy, gy)
        torch.ops.revtriton.coupling_forward(y, g)
        return y * 2, dy

    args = _args(4)
    expected = step(*[t.clone() for t in args])
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*[t.clone() for t in args])
    torch.testing.assert_close(got, expected)


def test_bad_operands_are_refused_with_clear_errors():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"b has shape \(3, 5\); expected \(3, 4\)"):
        torch.ops.revtriton.coupling_forward(a, torch.randn(3, 5))
    with pytest.raises(TypeError, match="b is torch.int64; expected a floating-point tensor"):
        torch.ops.revtriton.coupling_forward(a, torch.ones(3, 4, dtype=torch.long))


def test_ops_bump_the_version_of_what_they_write_so_autograd_sees_the_change():
    a, b, c, d = _args(4)
    before = a._version, b._version, c._version, d._version
    torch.ops.revtriton.coupling_backward(a, b, c, d)
    assert (a._version > before[0], b._version, c._version > before[2], d._version) == (True, before[1], True, before[3])
    x = torch.randn(3, 5, requires_grad=True)
    y = x.exp()  # exp saves its output for backward
    with torch.no_grad():
        torch.ops.revtriton.coupling_forward(y, b)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_ops_refuse_a_gradient_they_would_silently_drop():
    a, b = _args(2)
    b.requires_grad_()
    with pytest.raises(RuntimeError, match="revtriton::coupling_forward: b requires grad"):
        torch.ops.revtriton.coupling_forward(a, b)
    with torch.no_grad():
        torch.ops.revtriton.coupling_forward(a, b)  # nothing to differentiate: fine


def _torch_error(inplace_op):
    """The RuntimeError PyTorch's own in-place op raises (its message, for ``match``)."""
    with pytest.raises(RuntimeError) as error:
        inplace_op()
    return re.escape(str(error.value))


def test_a_written_tensor_with_elements_at_one_location_is_refused_as_by_pytorch():
    a, b = torch.randn(1, 5).expand(3, 5), torch.randn(3, 5)
    message = _torch_error(lambda: a.add_(b))
    with pytest.raises(RuntimeError, match=r"revtriton::coupling_forward: a: " + message):
        torch.ops.revtriton.coupling_forward(a, b)
    x, s = torch.randn(3, 4), torch.randn(3, 4)
    ld = torch.zeros(1).expand(3)  # every sample's log|det| in one location
    with pytest.raises(RuntimeError, match=r"revtriton::affine_forward: ld: " + message):
        torch.ops.revtriton.affine_forward(x, s, s, ld, 2.0)
    expected = b + a
    torch.ops.revtriton.coupling_forward(b, a)  # read through an expanded tensor: fine
    torch.testing.assert_close(b, expected)


def test_a_written_tensor_partially_overlapping_another_operand_is_refused_as_by_pytorch():
    y = torch.randn(5)
    before = y.clone()
    message = _torch_error(lambda: y[1:].add_(y[:-1]))
    with pytest.raises(RuntimeError, match=r"revtriton::coupling_forward: a and b: " + message):
        torch.ops.revtriton.coupling_forward(y[1:], y[:-1])
    s = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"revtriton::momentum_forward: v and f: " + message):
        torch.ops.revtriton.momentum_forward(s[0], s[1], s.view(-1)[6:10], 0.9)
    with pytest.raises(RuntimeError, match=r"revtriton::coupling_backward: a and c: " + message):
        a, b = torch.randn(2, 3, 4)  # a written twice: each store would undo the other
        torch.ops.revtriton.coupling_backward(a, b, a.view(3, 4), b)
    assert torch.equal(y, before)  # refused before anything is written


def test_operands_pytorch_accepts_are_accepted_and_computed():
    a = torch.randn(3, 5)
    expected = a * 2
    torch.ops.revtriton.coupling_forward(a, a)  # full overlap: a written tensor also read
    torch.testing.assert_close(a, expected)
    torch.ops.revtriton.coupling_inverse(a, a.detach().view(3, 5))  # the same elements, another tensor
    assert a.eq(0).all()
    y = torch.randn(6, 2)  # too hard for PyTorch to decide (neither column is dense): allowed
    expected = y[:, 0] + y[:, 1]
    z = y.clone()
    z[:, 0].add_(z[:, 1])  # PyTorch's own op accepts it
    torch.ops.revtriton.coupling_forward(y[:, 0], y[:, 1])
    torch.testing.assert_close(y[:, 0], expected)
    s, f = torch.randn(2, 4, 3), torch.randn(4, 3)  # disjoint halves of one storage
    expected = s[0] + 0.9 * s[1] + 0.1 * f, 0.9 * s[1] + 0.1 * f
    torch.ops.revtriton.momentum_forward(s[0], s[1], f, 0.9)
    torch.testing.assert_close((s[0], s[1]), expected)


def test_the_blocks_calls_run_the_ops_kernel_in_eager_and_the_op_where_something_watches(monkeypatch):
    """ops.on_stream (what the blocks call): in plain eager, the kernel without the dispatcher, the
    same result and version bump, also under torch.set_default_device; under a dispatch mode, the
    profiler or with grad enabled, the op itself. revtriton.ops.<name> is the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from revtriton import ops
    from revtriton.ops import on_stream

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    assert ops.coupling_forward is torch.ops.revtriton.coupling_forward.default
    calls = []
    for name in ("coupling_forward", "coupling_inverse", "coupling_backward"):
        chain_op = getattr(on_stream, name)
        monkeypatch.setattr(chain_op, "op", lambda *args, op=chain_op.op: calls.append(op) or op(*args))
    a, b, c, d = _args(4)
    expected = a - b, c + d
    before = a._version, c._version
    with torch.no_grad():
        on_stream.coupling_backward(a, b, c, d)
        torch.testing.assert_close((a, c), expected)
        assert a._version > before[0] and c._version > before[1]
        with torch.device("cpu"):  # torch.set_default_device's function mode
            on_stream.coupling_forward(a, b)
            on_stream.coupling_inverse(a, b)
        assert calls == []
        with Seen() as seen:
            on_stream.coupling_forward(a, b)
        assert seen.ops == ["revtriton.coupling_forward.default"]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            on_stream.coupling_inverse(a, b)
        assert "revtriton::coupling_inverse" in {e.name for e in prof.events()}
        torch.testing.assert_close((a, c), expected)
        meta = torch.empty(3, 5, device="meta")
        on_stream.coupling_forward(meta, meta)  # the op's fake kernel: nothing to compute
    assert len(calls) == 3
    with pytest.raises(RuntimeError, match="b requires grad"):  # grad enabled: the op, which refuses
        on_stream.coupling_forward(a, b.requires_grad_())


def test_the_blocks_calls_take_the_op_for_a_tensor_subclass_in_any_operand(monkeypatch):
    """A tensor-parallel F returns an AsyncCollectiveTensor, whose data the kernel cannot read
    until the dispatcher has waited for it: any operand of a subclass goes through the op."""
    from revtriton.ops import on_stream

    class Sub(torch.Tensor):
        pass

    calls = []
    op = on_stream.coupling_forward.op
    monkeypatch.setattr(on_stream.coupling_forward, "op", lambda *args: calls.append(args) or op(*args))
    a, b = _args(2)
    expected = a + b
    with torch.no_grad():
        on_stream.coupling_forward(a, b.as_subclass(Sub))
        assert len(calls) == 1
        torch.testing.assert_close(a, expected)
        on_stream.coupling_forward(a, b)
    assert len(calls) == 1


def test_a_recompute_whose_output_changed_shape_is_refused_naming_the_call():
    """The blocks' ops take F's and G's outputs unchecked: the recompute checks them itself."""
    import revtriton as rt

    class Shrinks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls = torch.nn.Linear(3, 3), 0

        def forward(self, x):
            self.calls += 1
            return self.lin(x) if self.calls == 1 else self.lin(x)[:-1]

    chain = rt.ReversibleSequential(rt.ReversibleBlock(Shrinks(), torch.nn.Linear(3, 3)))
    y = chain(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"blocks\[0\].f returned shape \(3, 3\); expected \(4, 3\)"):
        y.sum().backward()
