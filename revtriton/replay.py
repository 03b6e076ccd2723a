"""Run F and G so that the backward recompute sees exactly what the forward saw.

A chain runs F1, G1, F2, G2, ... in forward and recomputes them in the reverse order in
backward (Algorithm 1 in DESIGN.md), so the forward pushes one entry per call onto a stack
and the backward pops them. An entry holds what the call saw: its parameters, its buffers as
it read them (a copy only of those it modified in place: BatchNorm statistics, a spectral
norm's power iteration, an EMA), its modules' training flags, and the RNG state it started
from, kept only when the call drew random numbers (dropout): deterministic F and G without
buffers cost nothing. The recompute also replays the forward's autocast state and leaves the
module as the forward left it, so BatchNorm running statistics are updated once, as in eager.
What cannot be replayed is an error: a buffer the forward read, modified in place since.
"""
import contextlib
import ctypes
import types
from typing import NamedTuple

import torch
from torch.autograd.graph import _engine_run_backward
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import structure


def check_output(name, out, x):
    """Raise a ValueError unless ``out = name(x)`` has x's shape, device and dtype.

    Under autocast, any floating dtype is accepted: F and G may compute in low precision
    while the two streams keep theirs.
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} returned {type(out).__name__}; expected a tensor shaped like its input")
    if out.shape != x.shape:
        raise ValueError(f"{name} returned shape {tuple(out.shape)}; expected {tuple(x.shape)}, the shape "
                         f"of its input half (a coupling function must preserve shape)")
    if out.device != x.device:
        raise ValueError(f"{name} returned a tensor on {out.device}; expected {x.device}, its input's device")
    # autocast knows no meta device (and torch.compile of torch 2.11 cannot trace is_autocast_available)
    if out.dtype != x.dtype and not (x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
                                     and out.is_floating_point()):
        raise ValueError(f"{name} returned dtype {out.dtype}; expected {x.dtype}, its input's dtype "
                         f"(cast inside F/G, or use torch.autocast to compute in lower precision)")


@contextlib.contextmanager
def buffers_kept(module):
    """Run a block of code, then put ``module``'s buffers back as they were (BatchNorm stats)."""
    buffers = list(module.buffers())
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def _version(t):
    """``t``'s version counter, or None where there is none to read (inference tensors, and
    tensors that torch.compile traces)."""
    return None if torch.compiler.is_compiling() or t.is_inference() else t._version


def run_checked(name, module, x, kwargs):
    """``module(x, **kwargs)`` with its output checked: the forward of a chain that keeps no
    state, and of its eager twin. A RuntimeError, naming the call, if the module modified its
    input in place (the input is what a reversible block's inverse rebuilds) or a side input
    (the recompute would read, and modify, another value than the forward did)."""
    side = [(k, t) for k, v in kwargs.items() for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]
    version, side_versions = _version(x), [_version(t) for _, t in side]
    out = module(x, **kwargs)
    if _version(x) != version:
        raise RuntimeError(
            f"{name} ({type(module).__name__}) modified its input in place (an in-place first op such as "
            f"nn.ReLU(inplace=True)?): a reversible block rebuilds F's and G's inputs from its output, so F and "
            f"G must leave their input as it is. Use the op's out-of-place form (inplace=False)")
    for (key, t), version in zip(side, side_versions):
        if _version(t) != version:
            raise RuntimeError(
                f"{name} ({type(module).__name__}) modified its side input {key!r} in place: the backward "
                f"recompute would read (and modify again) another value than the forward read. Compute on a "
                f"copy inside {name} (e.g. m = m + 1 instead of m.add_(1))")
    check_output(name, out, x)
    return out


def run_side_effect_free(name, module, x, kwargs):
    """``module(x, **kwargs)`` leaving its buffers untouched: the explicit ``inverse`` of a chain."""
    with buffers_kept(module):
        return run_checked(name, module, x, kwargs)


_AccumulateGrad = torch._C._functions.AccumulateGrad  # the graph node of a leaf that requires grad


def check_reads(out, inputs, name, module):
    """Raise a RuntimeError if ``out``'s graph reaches a tensor that requires grad other than
    through ``inputs`` (the recompute's input, parameters and side inputs): a tensor F or G
    read from an attribute, a closure or a module that is not theirs, whose gradient the
    recompute would silently drop. Walks the graph back to its leaves, stopping at ``inputs``."""
    allowed = {id(t) for t in inputs}
    if out.grad_fn is None:
        if id(out) not in allowed:  # F returned a leaf that requires grad itself
            _refuse_read(out, name, module)
        return
    seen, stack = {out.grad_fn}, [out.grad_fn]
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node) is not _AccumulateGrad:
                stack.append(node)
            elif id(node.variable) not in allowed:  # a leaf that requires grad
                _refuse_read(node.variable, name, module)


def _refuse_read(leaf, name, module):
    """The read check's RuntimeError: ``name`` (``module``) reached ``leaf``."""
    what = "a parameter" if isinstance(leaf, torch.nn.Parameter) else "a leaf tensor"
    raise RuntimeError(
        f"{name} ({type(module).__name__}) reads a tensor that requires grad but is neither its input, one "
        f"of its parameters nor a side input (its graph reaches {what} of shape {tuple(leaf.shape)} that "
        f"is none of these): the backward recompute would drop its gradient. Pass the tensor to the chain "
        f"as a keyword argument (chain(x, name=tensor)) and take it as a keyword argument of {name}'s "
        f"forward; a tensor inside an object that torch.utils._pytree does not flatten (a class of "
        f"your own) is passed as it is: register the class with torch.utils._pytree, or pass the tensor "
        f"itself")


def _unaliased(g, stream, span):
    """``g``, or a copy of it if it shares storage with ``stream``, the chain's gradient stream,
    whose storage spans the addresses ``span`` (``(first byte, end)``): the gradient of an addend
    is the incoming gradient itself, a view of the stream, which later blocks overwrite."""
    if g is None:
        return g
    if type(g) is torch.Tensor:
        return g.clone() if span[0] <= g.data_ptr() < span[1] else g
    return g.clone() if _shares_storage(g, stream) else g


def _shares_storage(t, plain):
    """Whether ``t`` or, for a tensor subclass wrapping others (a DTensor's local shard, which has
    no storage of its own), any tensor inside it shares storage with the plain tensor ``plain``."""
    if is_traceable_wrapper_subclass(t):
        inner = (getattr(t, name) for name in t.__tensor_flatten__()[0])
        return any(_shares_storage(u, plain) for u in inner if isinstance(u, torch.Tensor))
    return t.untyped_storage().data_ptr() == plain.untyped_storage().data_ptr()


class Call(NamedTuple):
    """What one F/G call of a chain's forward saw, for its recompute: every parameter and buffer
    of its modules as ``(owner module, "_parameters" or "_buffers", key, tensor)`` slots
    (references), the buffers' versions, copies of the buffers it modified in place (their
    values before the call, by slot index), its modules and their ``training`` flags, and the
    RNG state it started from (None unless it drew random numbers)."""
    name: str
    slots: list
    versions: dict
    before: dict
    modules: list
    training: tuple
    rng_state: "RngState"


class RngState(NamedTuple):
    """The CPU RNG state, the CUDA device's (or None) and their bytes (to compare)."""
    cpu: torch.Tensor
    cuda: object
    key: bytes


def _bytes(t):
    """The bytes of the contiguous CPU tensor ``t``."""
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def _record(name, module, x, kwargs):
    """``(module(x, **kwargs) checked by run_checked, its Call)`` (RNG state None)."""
    modules, slots = structure.slots(module)
    training = tuple([m.training for m in modules])
    buffers = [i for i, slot in enumerate(slots) if slot[1] == "_buffers"]
    if not buffers:
        return run_checked(name, module, x, kwargs), Call(name, slots, _NONE, _NONE, modules, training, None)
    versions = {i: slots[i][3]._version for i in buffers}
    copies = {i: slots[i][3].clone() for i in buffers}
    out = run_checked(name, module, x, kwargs)
    before = {i: copies[i] for i in buffers if slots[i][3]._version != versions[i]}
    return out, Call(name, slots, versions, before, modules, training, None)


_NONE = types.MappingProxyType({})  # a call's buffer versions and copies when it has no buffer


def _replacements(call, module):
    """``(tensor per slot, [(parameter, alias), ...])`` that replay ``call`` of ``module``: a
    detached alias for each parameter that requires grad (so that its hooks fire once, when the
    chain hands out its gradient), and a copy of each buffer as the call read it (so that the
    recompute never writes the module's own: BatchNorm updates its running statistics without a
    version bump, and a second backward replays the same values). A RuntimeError if a buffer
    was modified in place since by anything but the call itself."""
    tensors, aliases = [], {}
    for i, (owner, kind, key, t) in enumerate(call.slots):
        if kind == "_parameters":
            tensors.append(aliases.setdefault(t, t.detach().requires_grad_()) if t.requires_grad else t)
            continue
        if i not in call.before and t._version != call.versions[i]:
            name = next(f"{path}.{key}".lstrip(".") for path, m in module.named_modules() if m is owner)
            raise RuntimeError(
                f"{call.name} ({type(module).__name__}): its buffer {name!r}, which the forward read, was modified "
                f"in place before backward: the recompute cannot see the value the forward read. Modify it "
                f"after backward (or call the chain again)")
        tensors.append(call.before.get(i, t).clone())
    return tensors, list(aliases.items())


def _as_recorded(call):
    """The distinct parameters of ``call`` that require grad, when the recompute can run the
    module as it is now (no swap, no alias): it holds no buffer, every slot still holds the
    tensor the forward used, its training flags are the forward's, and no such parameter has a
    tensor hook (``register_hook``: the engine would run it on the recompute's gradient too,
    which an alias avoids). Otherwise None."""
    if call.versions:
        return None
    params = {}
    for owner, kind, key, t in call.slots:
        if getattr(owner, kind).get(key) is not t:
            return None
        if t.requires_grad:
            if t._backward_hooks:
                return None
            params[t] = t
    if any(m.training is not flag for m, flag in zip(call.modules, call.training)):
        return None
    return list(params.items())


def _swap(call, tensors, training):
    """Put ``tensors`` in ``call``'s slots and the ``training`` flags on its modules; return
    ``(tensors, training)`` as they were, which put back what was there (a flag is set only where
    it differs: setting one costs an ``nn.Module.__setattr__``)."""
    was = [getattr(owner, kind)[key] for owner, kind, key, _ in call.slots]
    for (owner, kind, key, _), t in zip(call.slots, tensors):
        getattr(owner, kind)[key] = t
    flags = tuple(m.training for m in call.modules)
    if flags != training:
        for m, flag in zip(call.modules, training):
            m.training = flag
    return was, flags


def _grads(out, inputs, grad):
    """``torch.autograd.grad(out, inputs, grad, allow_unused=True)``. For a plain tensor, the
    engine is called directly: autograd.grad's Python checks cost more than a small F's backward.
    Of them, the engine repeats the dtype cast but not the exact shape check (it sums a gradient
    that broadcasts to ``out``): ``grad`` is shaped like F's input half, and check_output has
    checked that ``out`` is too."""
    if type(out) is not torch.Tensor:  # a subclass may override autograd.grad (__torch_function__)
        return torch.autograd.grad(out, inputs, grad, allow_unused=True)
    return _engine_run_backward((out,), (grad,), False, False, inputs, True, False)


def _refuse_capture(device):
    """A RuntimeError, saying what to do, if a CUDA graph is being captured on ``device``'s
    stream: reading or setting the CUDA RNG state, as the RNG replay does, is forbidden then."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "a reversible chain with preserve_rng_state=True (the default) cannot run while a CUDA graph is "
            "captured: it reads the CUDA RNG state to replay dropout in its recompute, which PyTorch forbids "
            "during capture. Build the chain with preserve_rng_state=False if F and G draw no random numbers "
            "(no dropout in training mode); otherwise the recompute would draw other numbers than the forward")


class Recorder:
    """Runs a chain's F/G calls in forward and replays them, reversed, in backward.

    Each forward call records a :class:`Call`: the parameters and buffers it used
    (references; a copy of a buffer only where the call modified it in place), its modules'
    training flags and, when it drew random numbers, the RNG state it started from. The
    recompute calls the module with detached aliases of those parameters in their places (so
    that a hook on a parameter fires once, when the chain hands out its gradient, as in eager)
    and the buffers as the call read them, in the training mode it ran in; then puts the
    module back as the forward left it. A module that needs none of this (no buffer, no
    parameter hook, its slots and flags as the forward left them: :func:`_as_recorded`) is
    recomputed as it is, its parameters the engine's inputs.
    """

    def __init__(self, device, preserve_rng_state=True):
        if preserve_rng_state:
            _refuse_capture(device)
        self.device = device
        self.preserve_rng_state = preserve_rng_state
        device_types = {t for t in ("cpu", device.type) if torch.amp.is_autocast_available(t)}
        self.autocast = {t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in device_types}
        self.autocast_cache = torch.is_autocast_cache_enabled()
        self.calls = []  # a Call per forward call
        self.rng_state = RngState(*self._rng_state()) if preserve_rng_state else None  # where the next call starts

    def _rng_state(self):
        """``(cpu, cuda, key)``: the RNG states a call may draw from (CPU, and the chain's CUDA
        device, or None) and their bytes, which compare faster than the tensors (``torch.equal``
        costs more than the read)."""
        cpu = torch.default_generator.get_state()
        if self.device.type != "cuda":
            return cpu, None, _bytes(cpu)
        cuda = torch.cuda.get_rng_state(self.device)
        return cpu, cuda, _bytes(cpu) + _bytes(cuda)

    def forward(self, name, module, x, kwargs):
        """``module(x, **kwargs)`` in the chain's forward, recorded for its recompute.

        The RNG state is read once per call: the state a call ends with is the next call's
        start, and it is kept only for a call that changed it (drew random numbers)."""
        out, call = _record(name, module, x, kwargs)
        if self.preserve_rng_state:
            after = self._rng_state()
            if after[2] != self.rng_state.key:
                call, self.rng_state = call._replace(rng_state=self.rng_state), RngState(*after)
        self.calls.append(call)
        return out

    def _autocasts(self):
        """The autocast contexts (as ``(device type, dtype, enabled)``) that put a recompute in
        the forward's autocast state: none where autocast is off now and was off then."""
        return [(device_type, dtype, enabled) for device_type, (enabled, dtype) in self.autocast.items()
                if enabled or torch.is_autocast_enabled(device_type)]

    def _replayed(self, rng_state, autocasts):
        """A context that restores ``rng_state`` (or None) and enters ``autocasts``; a no-op when
        there is neither (deterministic F and G, autocast off throughout)."""
        if rng_state is None and not autocasts:
            return contextlib.nullcontext()
        return self._replaying(rng_state, autocasts)

    @contextlib.contextmanager
    def _replaying(self, rng_state, autocasts):
        with contextlib.ExitStack() as stack:
            if rng_state is not None:
                _refuse_capture(self.device)  # a backward captured after a forward that was not
                cuda = [self.device] if rng_state.cuda is not None else []
                stack.enter_context(torch.random.fork_rng(devices=cuda, device_type="cuda"))
                torch.set_rng_state(rng_state.cpu)
                if cuda:
                    torch.cuda.set_rng_state(rng_state.cuda, self.device)
            for device_type, dtype, enabled in autocasts:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                                   cache_enabled=self.autocast_cache))
            yield

    def replay_reversed(self, side, grad_stream):
        """``(vjp, side_grads)`` for one backward: ``vjp(module, x, grad, negate=False)`` replays the forward's
        calls from the last to the first (a retained graph replays them again on its next
        backward) with the side inputs ``side``, whose tensors that require grad are this
        backward's leaves; ``side_grads`` sums their gradients over the calls, one entry per
        tensor of ``side`` (None where none flowed). No gradient it hands out aliases
        ``grad_stream``, the chain's gradient stream."""
        calls = reversed(self.calls)
        side_grads = [None] * len(side.tensors)
        wanted = [i for i, t in enumerate(side.tensors) if t.requires_grad]
        side_leaves = [side.tensors[i] for i in wanted]
        autocasts = self._autocasts()
        storage = grad_stream.untyped_storage()
        stream = grad_stream, (storage.data_ptr(), storage.data_ptr() + storage.nbytes())

        def vjp(module, x, grad, negate=False):
            call = next(calls)
            out, grads, params = self._vjp(module, x, grad, side, side_leaves, call, autocasts, negate, stream)
            for i, g in zip(wanted, grads[1:]):
                if g is not None:
                    side_grads[i] = g if side_grads[i] is None else side_grads[i] + g
            return out, grads[0] if grads else None, params

        return vjp, side_grads

    def _vjp(self, module, x, grad, side, side_leaves, call, autocasts, negate, stream):
        """Recompute ``out = module(x, **side inputs)`` (``-module(...)`` with ``negate``: the
        backward of an inverse, which subtracts F) as ``call`` ran it in forward and pull
        ``grad`` back through it.

        Returns ``(out, [dL/dx, *dL/dside_leaves], [(param, dL/dparam), ...])`` (the list empty
        where ``out`` depends on nothing that requires grad) with ``out`` detached; a gradient is
        None where ``out`` does not depend on that input, and never aliases ``stream`` (the gradient
        stream and its storage's span, of which ``grad`` is a view: :func:`_unaliased`). ``grad`` may
        be a function of the detached ``out`` that returns the gradient (an affine coupling's
        scale needs ``out``). Raises a RuntimeError if ``out`` depends on a tensor that requires
        grad and is none of these inputs (:func:`check_reads`).
        """
        leaf = x.detach().requires_grad_()
        kwargs = side.for_module(module)
        trainable, saw = _as_recorded(call), None
        if trainable is None:  # aliases and the forward's buffers and flags swapped in
            tensors, trainable = _replacements(call, module)
            saw = _swap(call, tensors, call.training)  # what was there: _swap(call, *saw) puts it back
        try:
            with torch.enable_grad(), self._replayed(call.rng_state, autocasts):
                out = module(leaf, **kwargs)
                check_output(call.name, out, leaf)  # the blocks' ops take it unchecked (ops.ChainOp)
                out = -out if negate else out
        finally:
            if saw is not None:
                _swap(call, *saw)
        if callable(grad):
            grad = grad(out.detach())
        if not out.requires_grad:
            return out.detach(), [], []
        inputs = (leaf, *(alias for _, alias in trainable), *side_leaves)
        check_reads(out, inputs, call.name, module)
        grads = _grads(out, inputs, grad if grad.dtype == out.dtype else grad.to(out.dtype))
        n = len(trainable)
        param_grads = [(p, _unaliased(g, *stream)) for (p, _), g in zip(trainable, grads[1:1 + n])]
        return out.detach(), [grads[0], *(_unaliased(g, *stream) for g in grads[1 + n:])], param_grads
