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

The affine and momentum couplings' ops (``affine_*``, ``momentum_*``, at the bottom) launch
the kernels of the same names in :mod:`revtriton.kernels.affine` and
:mod:`revtriton.kernels.momentum`, whose docstrings give their math.

Under torch.compile, do not snapshot a compiled function's *input* between two ops that
mutate it (``op(x1, ..); y = x.clone(); op(x2, ..); return y``; from torch 2.14 ``x * 1`` too):
inductor's reinplace pass writes the ops into the input's buffer and its copy-back of the
input then overwrites the snapshot, so ``y`` comes back with the final value. This is torch's
bug (torch.library.custom_op ops fail the same way, 2.11 to 2.14), not the schema's;
tests/test_compile.py pins it with a strict xfail. A chain is not affected: it runs the ops on
a stream it copied (stream.to_stream), and ops on a buffer made inside the compiled function
are correct.
"""
import math
import os
import types

import torch
from torch.utils._device import DeviceContext


def interpreting():
    """True when CPU tensors go through Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(op, names, args, per_sample=()):
    """Same shape and device and a floating dtype for every operand, or a clear error.

    The ``per_sample`` operands following the ``names`` ones in ``args`` hold one value per
    index of dim 0 of the first operand, or are None.
    """
    first = args[0]
    operands = [(name, t, first.shape) for name, t in zip(names, args)]
    operands += [(name, t, first.shape[:1]) for name, t in zip(per_sample, args[len(names):]) if t is not None]
    for name, t, shape in operands:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"revtriton::{op}: {name} is {got}; expected a floating-point tensor")
        if t.shape != shape:
            meaning = f"the shape of {names[0]}" if name in names else f"one value per index of dim 0 of {names[0]}"
            raise ValueError(f"revtriton::{op}: {name} has shape {tuple(t.shape)}; expected "
                             f"{tuple(shape)}, {meaning}")
        if t.device != first.device:
            raise ValueError(f"revtriton::{op}: {name} is on {t.device}; expected {first.device}, "
                             f"the device of {names[0]}")


def _valid(args, n_names, n_tensors):
    """What :func:`_check` checks, quickly, for arguments that pass it (it says what is wrong
    with the others): ``args[:n_names]`` are floating-point tensors of one shape on one device,
    ``args[n_names:n_tensors]`` None or floating-point tensors of one value per index of dim 0."""
    first = args[0]
    if not isinstance(first, torch.Tensor):
        return False
    shape, device = first.shape, first.get_device()
    for t in args[:n_names]:
        if not (isinstance(t, torch.Tensor) and t.shape == shape and t.get_device() == device
                and t.is_floating_point()):
            return False
    for t in args[n_names:n_tensors]:
        if t is not None and not (isinstance(t, torch.Tensor) and t.shape == shape[:1]
                                  and t.get_device() == device and t.is_floating_point()):
            return False
    return True


# PyTorch's own errors for in-place ops on overlapping memory (ATen's MemoryOverlap.cpp)
INTERNAL_OVERLAP = ("unsupported operation: more than one element of the written-to tensor refers to a single "
                    "memory location. Please clone() the tensor before performing the operation.")
PARTIAL_OVERLAP = ("unsupported operation: some elements of the input tensor and the written-to tensor refer to "
                   "a single memory location. Please clone() the tensor before performing the operation.")


def _dense(t):
    """ATen's ``is_non_overlapping_and_dense``: sorted by stride, each dim's stride is the
    product of the sizes below it (dims of size 1 aside)."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _overlap(a, b):
    """ATen's ``get_overlap_status`` of two tensors in one storage: "full" (the same elements:
    same start, end and strides), "partial" (dense, and their byte ranges intersect otherwise)
    or None (disjoint, or too hard to decide: not both dense, which PyTorch allows)."""
    if a is b:
        return "full"
    start_a, start_b = a.data_ptr(), b.data_ptr()
    end_a, end_b = start_a + a.numel() * a.element_size(), start_b + b.numel() * b.element_size()
    if not (a.numel() and b.numel() and start_a < end_b and start_b < end_a and _dense(a) and _dense(b)):
        return None
    return "full" if (start_a, end_a, a.stride()) == (start_b, end_b, b.stride()) else "partial"


def _refuse_overlap(op, names, args, written):
    """PyTorch's RuntimeError for what its own in-place ops refuse: a written tensor with
    elements at one memory location (a dim of size > 1 and stride 0), or a written tensor that
    partially overlaps another operand. Two written operands also may not fully overlap (each
    store would undo the other). Only operands in one storage are compared."""
    tensors = args[:len(names)]
    storages = [None if t is None else t.untyped_storage().data_ptr() for t in tensors]
    for i in written:
        a = tensors[i]
        if a is None:
            continue
        if not a.is_contiguous() and torch._debug_has_internal_overlap(a) == 1:
            raise RuntimeError(f"revtriton::{op}: {names[i]}: {INTERNAL_OVERLAP}")
        if storages.count(storages[i]) == 1:
            continue
        for j, b in enumerate(tensors):
            if j != i and storages[j] == storages[i]:
                status = _overlap(a, b)
                if status == "partial" or (status == "full" and j in written):
                    raise RuntimeError(f"revtriton::{op}: {names[i]} and {names[j]}: {PARTIAL_OVERLAP}")


_lib = torch.library.Library("revtriton", "DEF")
on_stream = types.SimpleNamespace()  # the ops as the blocks call them: a ChainOp each (define)


def _refuse_autograd(op, names, args):
    """The ops have no derivative: refuse, rather than silently drop, a gradient through one."""
    if torch.is_grad_enabled():
        for name, t in zip(names, args):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(f"revtriton::{op}: {name} requires grad, but the coupling ops have no "
                                   f"derivative (a reversible chain computes its own backward); call them "
                                   f"under torch.no_grad() or on detached tensors")


def define(name, names, mutated, kernel, reference, per_sample=(), scalars=()):
    """Register ``revtriton::name`` over the launcher ``revtriton.kernels.<kernel>``.

    ``names`` are the tensor arguments in order, ``mutated`` the ones written in place and
    ``reference`` the PyTorch computation used on CPU outside the interpreter. Optional
    ``per_sample`` tensors (one value per index of dim 0 of the first tensor, or None) and
    ``float`` arguments named in ``scalars`` follow the tensors, in that order.

    The op is defined with ``torch.library.Library`` (CPU and CUDA kernels, a fake kernel
    for torch.compile): a call costs 6-10 µs of host time with its checks and launch (``python
    -m bench host``) where ``torch.library.custom_op``'s Python wrapper alone took 17 µs. Each
    kernel bumps the version counters of what it writes, and refuses tensors that require grad
    while grad is enabled (the ops have no derivative), and overlapping operands as PyTorch's
    in-place ops do (:func:`_refuse_overlap`). Returns the op; ``on_stream.<name>`` is the
    :class:`ChainOp` the blocks call.
    """
    args = [f"Tensor({n}!) {n}" if n in mutated else f"Tensor {n}" for n in names]
    args += [f"Tensor({n}!)? {n}" if n in mutated else f"Tensor? {n}" for n in per_sample]
    _lib.define(name + "(" + ", ".join(args + [f"float {n}" for n in scalars]) + ") -> ()")
    tensor_names = names + per_sample
    written = [i for i, n in enumerate(tensor_names) if n in mutated]

    launcher = []  # revtriton.kernels.<kernel>, imported on the first call (kernels import triton)

    def launch(*args):
        if not launcher:
            from revtriton import kernels

            launcher.append(getattr(kernels, kernel))
        launcher[0](*args)

    n_names, n_tensors = len(names), len(tensor_names)

    def run_cpu(*args):
        (launch if interpreting() else reference)(*args)

    def kernel_for(run):
        def checked_kernel(*args):
            if torch.is_grad_enabled():
                _refuse_autograd(name, tensor_names, args)
            if not _valid(args, n_names, n_tensors):
                _check(name, names, args, per_sample)  # raises the error that says what is wrong
            _refuse_overlap(name, tensor_names, args, written)
            _bump_versions(args, written)
            run(*args)
        return checked_kernel

    _lib.impl(name, kernel_for(run_cpu), "CPU")
    _lib.impl(name, kernel_for(launch), "CUDA")
    torch.library.register_fake(f"revtriton::{name}", lambda *args: None, lib=_lib)
    op = getattr(torch.ops.revtriton, name).default
    setattr(on_stream, name, ChainOp(op, run_cpu, launch, written, n_tensors))
    return op


def _bump_versions(args, written):
    """Bump the version counters of the tensors at the indices ``written`` of ``args`` (None
    skipped), as PyTorch's in-place ops do, so that autograd sees them changed."""
    torch._C._increment_version([args[i] for i in written if args[i] is not None])  # increment_version's core


def _watched():
    """Whether anything besides the dispatcher's routing could act on an op call now: grad
    enabled (the op refuses a gradient it would drop), torch.compile recording it, a torch
    function mode other than ``torch.set_default_device``'s (which acts on factory functions
    only), a dispatch mode (fake tensors, FlopCounterMode, ...), a functorch transform (vmap's
    tensors are plain ``torch.Tensor``s) or the profiler, which records ops by name."""
    return (torch.is_grad_enabled() or torch.compiler.is_compiling()
            or (torch._C._is_torch_function_mode_enabled() and not _default_device_only())
            or torch._C._len_torch_dispatch_stack() > 0 or torch._C._are_functorch_transforms_active()
            or torch.autograd.profiler._is_profiler_enabled)


def _default_device_only():
    """Whether the torch function modes active are ``torch.set_default_device``'s alone."""
    return all(isinstance(m, DeviceContext) for m in torch.overrides._get_current_function_mode_stack())


class ChainOp:
    """An op as the blocks call it (``on_stream.<name>``) on a chain's own operands: halves of
    the chain's streams and the outputs of F and G, which the chain has checked (shape, device,
    floating dtype; see :func:`revtriton.replay.check_output`) and which cannot partially
    overlap a half they are written into. In plain eager code (nothing :func:`_watched`, every
    operand a ``torch.Tensor`` itself on CPU or CUDA) the call runs the kernel the dispatcher
    would pick without the op's argument checks, bumping the versions of what it writes: the
    dispatcher and the checks cost more host time than the launch itself (``python -m bench
    host``), and a chain makes four calls per block and step. Otherwise (torch.compile, fake or
    meta tensors, a tensor subclass such as the AsyncCollectiveTensor a tensor-parallel F
    returns, the profiler) it calls the op. The op itself (``revtriton.ops.<name>``,
    ``torch.ops.revtriton.<name>``) checks every call: use it anywhere else.
    """

    def __init__(self, op, cpu, cuda, written, n_tensors):
        self.op, self.cpu, self.cuda, self.written, self.n_tensors = op, cpu, cuda, written, n_tensors

    def __call__(self, *args):
        first = args[0]
        if _watched() or not (first.is_cpu or first.is_cuda) or not _PLAIN.issuperset(map(type, args[:self.n_tensors])):
            return self.op(*args)  # e.g. F's output an AsyncCollectiveTensor (tensor parallelism)
        _bump_versions(args, self.written)
        (self.cuda if first.is_cuda else self.cpu)(*args)


_PLAIN = frozenset((torch.Tensor, type(None)))  # the operand types ChainOp runs its kernel on itself


def _sub_add(a, b, c, d):
    a.sub_(b)
    c.add_(d)


coupling_forward = define("coupling_forward", ("a", "b"), ("a",), "add_", torch.Tensor.add_)
coupling_inverse = define("coupling_inverse", ("a", "b"), ("a",), "sub_", torch.Tensor.sub_)
coupling_backward = define("coupling_backward", ("a", "b", "c", "d"), ("a", "c"), "sub_add_", _sub_add)


def soft_clamp(s, clamp):
    """``clamp * tanh(s / clamp)``: the affine coupling's log-scale, ~s for |s| << clamp and
    always inside (-clamp, clamp), so that ``exp`` of it never overflows."""
    return clamp * torch.tanh(s / clamp)


def _acc(*tensors):
    """``tensors`` in the kernels' arithmetic dtype: fp64 if any is fp64, fp32 otherwise."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return [t.to(dtype) for t in tensors]


def per_sample_sum(t):
    """The sum of ``t`` over every dimension but the first (one value per sample)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).sum(1)


def _affine_forward(x, s, t, ld, clamp):
    x_, s_, t_ = _acc(x, s, t)
    s_ = soft_clamp(s_, clamp)
    x.copy_(x_ * s_.exp() + t_)
    if ld is not None:
        ld += per_sample_sum(s_)


def _affine_inverse(y, s, t, clamp):
    y_, s_, t_ = _acc(y, s, t)
    y.copy_((y_ - t_) / soft_clamp(s_, clamp).exp())


def _affine_backward(y, dy, s, t, ds, ld_grad, clamp):
    y_, dy_, s_, t_ = _acc(y, dy, s, t)
    th = torch.tanh(s_ / clamp)
    scale, shifted = (clamp * th).exp(), y_ - t_
    grad = dy_ * shifted
    if ld_grad is not None:
        grad += ld_grad.to(grad.dtype).view(-1, *[1] * (y.ndim - 1))
    y.copy_(shifted / scale)
    dy.copy_(dy_ * scale)
    ds.copy_(grad * (1 - th * th))


def _affine_inverse_backward(x, dx, s, ds, ld_grad, clamp):
    x_, dx_, s_ = _acc(x, dx, s)
    th = torch.tanh(s_ / clamp)
    scale = (clamp * th).exp()
    grad = dx_ * x_
    if ld_grad is not None:
        grad += ld_grad.to(grad.dtype).view(-1, *[1] * (x.ndim - 1))
    x.copy_(x_ * scale)
    dx.copy_(dx_ * (-clamp * th).exp())
    ds.copy_(-grad * (1 - th * th))


def _momentum_forward(x, v, f, beta):
    x_, v_, f_ = _acc(x, v, f)
    v_ = beta * v_ + (1 - beta) * f_
    v.copy_(v_)
    x.copy_(x_ + v_)


def _momentum_inverse(v, f, beta):
    v_, f_ = _acc(v, f)
    v.copy_((v_ - (1 - beta) * f_) / beta)


def _momentum_backward_x(x, v, dx, dv, beta):
    x_, v_, dx_, dv_ = _acc(x, v, dx, dv)
    x.copy_(x_ - v_)
    dv.copy_((1 - beta) * (dx_ + dv_))


def _momentum_backward_v(v, f, dx, fx, dv, beta):
    _momentum_inverse(v, f, beta)
    dx_, fx_, dv_ = _acc(dx, fx, dv)
    dx.copy_(dx_ + fx_)
    dv.copy_(dv_ * (beta / (1 - beta)))


def _momentum_inverse_backward(dx, fx, dv, beta):
    dx_, fx_, dv_ = _acc(dx, fx, dv)
    dx_ = dx_ + fx_
    dx.copy_(dx_)
    dv.copy_(-dv_ / (1 - beta) - dx_)


affine_forward = define("affine_forward", ("x", "s", "t"), ("x", "ld"), "affine_forward_", _affine_forward,
                        per_sample=("ld",), scalars=("clamp",))
affine_inverse = define("affine_inverse", ("y", "s", "t"), ("y",), "affine_inverse_", _affine_inverse,
                        scalars=("clamp",))
affine_backward = define("affine_backward", ("y", "dy", "s", "t", "ds"), ("y", "dy", "ds"), "affine_backward_",
                         _affine_backward, per_sample=("ld_grad",), scalars=("clamp",))
momentum_forward = define("momentum_forward", ("x", "v", "f"), ("x", "v"), "momentum_forward_", _momentum_forward,
                          scalars=("beta",))
momentum_inverse = define("momentum_inverse", ("v", "f"), ("v",), "momentum_inverse_", _momentum_inverse,
                          scalars=("beta",))
momentum_backward_x = define("momentum_backward_x", ("x", "v", "dx", "dv"), ("x", "dv"), "momentum_backward_x_",
                             _momentum_backward_x, scalars=("beta",))
momentum_backward_v = define("momentum_backward_v", ("v", "f", "dx", "fx", "dv"), ("v", "dx", "dv"),
                             "momentum_backward_v_", _momentum_backward_v, scalars=("beta",))
affine_inverse_backward = define("affine_inverse_backward", ("x", "dx", "s", "ds"), ("x", "dx", "ds"),
                                 "affine_inverse_backward_", _affine_inverse_backward, per_sample=("ld_grad",),
                                 scalars=("clamp",))
momentum_inverse_backward = define("momentum_inverse_backward", ("dx", "fx", "dv"), ("dx", "dv"),
                                   "momentum_inverse_backward_", _momentum_inverse_backward, scalars=("beta",))
