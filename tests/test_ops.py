"""The torch.library ops: opcheck, the CPU reference path, compile, bad input."""
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
