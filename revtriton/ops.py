"""The coupling arithmetic as ``torch.ops.revtriton.*`` operators.

Each op writes into its mutated arguments in place and returns nothing. The CUDA
implementation launches the Triton kernel from :mod:`revtriton.kernels`; the CPU one runs
the same kernel through Triton's interpreter when ``TRITON_INTERPRET=1`` and a plain
PyTorch reference otherwise. A fake implementation makes each op traceable by
``torch.compile``.

=====================================  ====================================  ==========
op                                     computes                              kernel
=====================================  ====================================  ==========
``coupling_forward(a!, b)``            ``a += b``      (y1 = x1 + F(x2))      ``add_``
``coupling_inverse(a!, b)``            ``a -= b``      (x1 = y1 - F(x2))      ``sub_``
``coupling_backward(a!, b, c!, d)``    ``a -= b; c += d`` in one pass         ``sub_add_``
=====================================  ====================================  ==========
"""
import os

import torch


def interpreting():
    """True when CPU tensors go through Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(op, names, tensors):
    """Same shape and device and a floating dtype for every operand, or a clear error."""
    first = tensors[0]
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"revtriton::{op}: {name} is {got}; expected a floating-point tensor")
        if t.shape != first.shape:
            raise ValueError(f"revtriton::{op}: {name} has shape {tuple(t.shape)}; expected "
                             f"{tuple(first.shape)}, the shape of {names[0]}")
        if t.device != first.device:
            raise ValueError(f"revtriton::{op}: {name} is on {t.device}; expected {first.device}, "
                             f"the device of {names[0]}")


def define(name, names, mutated, kernel, reference):
    """Register ``revtriton::name`` over the launcher ``revtriton.kernels.<kernel>``.

    ``names`` are the tensor arguments in order, ``mutated`` the ones written in place and
    ``reference`` the PyTorch computation used on CPU outside the interpreter.
    """
    schema = "(" + ", ".join(
        f"Tensor({n}!) {n}" if n in mutated else f"Tensor {n}" for n in names) + ") -> ()"

    def launch(*tensors):
        from revtriton import kernels

        getattr(kernels, kernel)(*tensors)

    def cpu(*tensors):
        _check(name, names, tensors)
        (launch if interpreting() else reference)(*tensors)

    def cuda(*tensors):
        _check(name, names, tensors)
        launch(*tensors)

    op = torch.library.custom_op(f"revtriton::{name}", cpu, mutates_args=mutated,
                                 device_types="cpu", schema=schema)
    op.register_kernel("cuda")(cuda)
    op.register_fake(lambda *tensors: None)
    return op


def _sub_add(a, b, c, d):
    a.sub_(b)
    c.add_(d)


coupling_forward = define("coupling_forward", ("a", "b"), ("a",), "add_", torch.Tensor.add_)
coupling_inverse = define("coupling_inverse", ("a", "b"), ("a",), "sub_", torch.Tensor.sub_)
coupling_backward = define("coupling_backward", ("a", "b", "c", "d"), ("a", "c"), "sub_add_", _sub_add)
