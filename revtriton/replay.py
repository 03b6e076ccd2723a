"""Run F and G so that the backward recompute sees exactly what the forward saw.

A chain runs F1, G1, F2, G2, ... in forward and recomputes them in the reverse order in
backward (Algorithm 1 in DESIGN.md), so the forward pushes one entry per call onto a stack
and the backward pops them. An entry is the RNG state the call started from, kept only when
the call drew random numbers (dropout): deterministic F and G cost nothing.
The recompute also replays the forward's autocast state and leaves the module's buffers
as the forward left them, so BatchNorm running statistics are updated once, as in eager.
"""
import contextlib

import torch


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
    autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type) and out.is_floating_point()
    if out.dtype != x.dtype and not autocast:
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


def run_checked(name, module, x, kwargs):
    """``module(x, **kwargs)`` with its output checked: the forward of a chain that keeps no
    state, and of its eager twin."""
    out = module(x, **kwargs)
    check_output(name, out, x)
    return out


def run_side_effect_free(name, module, x, kwargs):
    """``module(x, **kwargs)`` leaving its buffers untouched: the explicit ``inverse`` of a chain."""
    with buffers_kept(module):
        return run_checked(name, module, x, kwargs)


def _call_with(module, params, x, kwargs):
    """``module(x, **kwargs)`` with the parameters ``params`` (by name): a plain call when they
    are the module's own, as they almost always are, else ``torch.func.functional_call``."""
    own = dict(module.named_parameters())
    if own.keys() == params.keys() and all(own[k] is p for k, p in params.items()):
        return module(x, **kwargs)
    return torch.func.functional_call(module, params, (x,), kwargs, strict=False)


def check_reads(out, inputs, name, module):
    """Raise a RuntimeError if ``out``'s graph reaches a tensor that requires grad other than
    through ``inputs`` (the recompute's input, parameters and side inputs): a tensor F or G
    read from an attribute, a closure or a module that is not theirs, whose gradient the
    recompute would silently drop. Walks the graph back to its leaves, stopping at ``inputs``."""
    allowed = {id(t) for t in inputs}
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # AccumulateGrad: a leaf that requires grad
        if leaf is None:
            stack.extend(next_node for next_node, _ in node.next_functions)
        elif id(leaf) not in allowed:
            what = "a parameter" if isinstance(leaf, torch.nn.Parameter) else "a leaf tensor"
            raise RuntimeError(
                f"{name} ({type(module).__name__}) reads a tensor that requires grad but is neither its input, one "
                f"of its parameters nor a side input (its graph reaches {what} of shape {tuple(leaf.shape)} that "
                f"is none of these): the backward recompute would drop its gradient. Pass the tensor to the chain "
                f"as a keyword argument (chain(x, name=tensor)) and take it as a keyword argument of {name}'s forward")


class Recorder:
    """Runs a chain's F/G calls in forward and replays them, reversed, in backward.

    Each forward call records the parameters it used (references, not copies) and, when it
    drew random numbers, the RNG state it started from. The recompute calls the module with
    exactly those parameters (a plain call when they are still the module's own, else
    ``torch.func.functional_call``), so gradients reach the tensors the forward used even if
    the module's parameters were swapped since (torch.func, FSDP).
    """

    def __init__(self, device, preserve_rng_state=True):
        self.device = device
        self.preserve_rng_state = preserve_rng_state
        device_types = {t for t in ("cpu", device.type) if torch.amp.is_autocast_available(t)}
        self.autocast = {t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in device_types}
        self.autocast_cache = torch.is_autocast_cache_enabled()
        self.calls = []  # (name, parameters by name, RNG state or None) per forward call
        self.rng_state = self._rng_state() if preserve_rng_state else None  # where the next call starts

    def _rng_state(self):
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def forward(self, name, module, x, kwargs):
        """``module(x, **kwargs)`` in the chain's forward, recorded for its recompute.

        The RNG state is read once per call: the state a call ends with is the next call's
        start, and it is kept only for a call that changed it (drew random numbers)."""
        out = run_checked(name, module, x, kwargs)
        start = None
        if self.preserve_rng_state:
            after = self._rng_state()
            if not all(a is None or torch.equal(a, b) for a, b in zip(after, self.rng_state)):
                start, self.rng_state = self.rng_state, after
        self.calls.append((name, dict(module.named_parameters()), start))
        return out

    def _replayed(self, rng_state):
        """A context that restores ``rng_state`` (or None) and the forward's autocast state;
        a no-op when there is neither (deterministic F and G, autocast off throughout)."""
        autocasts = [torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=self.autocast_cache)
                     for device_type, (enabled, dtype) in self.autocast.items()
                     if enabled or torch.is_autocast_enabled(device_type)]
        if rng_state is None and not autocasts:
            return contextlib.nullcontext()
        return self._replaying(rng_state, autocasts)

    @contextlib.contextmanager
    def _replaying(self, rng_state, autocasts):
        with contextlib.ExitStack() as stack:
            if rng_state is not None:
                cuda = [self.device] if rng_state[1] is not None else []
                stack.enter_context(torch.random.fork_rng(devices=cuda, device_type="cuda"))
                torch.set_rng_state(rng_state[0])
                if cuda:
                    torch.cuda.set_rng_state(rng_state[1], self.device)
            for autocast in autocasts:
                stack.enter_context(autocast)
            yield

    def replay_reversed(self, side):
        """``(vjp, side_grads)`` for one backward: ``vjp(module, x, grad)`` replays the forward's
        calls from the last to the first (a retained graph replays them again on its next
        backward) with the side inputs ``side``, whose tensors that require grad are this
        backward's leaves; ``side_grads`` sums their gradients over the calls, one entry per
        tensor of ``side`` (None where none flowed)."""
        calls = reversed(self.calls)
        side_grads = [None] * len(side.tensors)

        def vjp(module, x, grad):
            return self._vjp(module, x, grad, side, side_grads, *next(calls))

        return vjp, side_grads

    def _vjp(self, module, x, grad, side, side_grads, name, params, rng_state):
        """Recompute ``out = module(x, **side inputs)`` as in forward and pull ``grad`` back through it.

        Returns ``(out, dL/dx, [(param, dL/dparam), ...])`` with ``out`` detached, and adds the
        side inputs' gradients to ``side_grads``; a gradient is None where ``out`` does not depend
        on that input. ``grad`` may be a function of the detached ``out`` that returns the
        gradient (an affine coupling's scale needs ``out``). Raises a RuntimeError if ``out``
        depends on a tensor that requires grad and is none of these inputs (:func:`check_reads`).
        """
        leaf = x.detach().requires_grad_()
        trainable = [p for p in params.values() if p.requires_grad]
        wanted = [i for i, t in enumerate(side.tensors) if t.requires_grad]
        inputs = [leaf, *trainable, *(side.tensors[i] for i in wanted)]
        with buffers_kept(module):  # restored after the vjp: BatchNorm saves them for backward
            with torch.enable_grad(), self._replayed(rng_state):
                out = _call_with(module, params, leaf, side.for_module(module))
            if callable(grad):
                grad = grad(out.detach())
            if not out.requires_grad:
                return out.detach(), None, []
            check_reads(out, inputs, name, module)
            grads = torch.autograd.grad(out, inputs, grad.to(out.dtype), allow_unused=True)
        for i, g in zip(wanted, grads[1 + len(trainable):]):
            if g is not None:
                side_grads[i] = g if side_grads[i] is None else side_grads[i] + g
        return out.detach(), grads[0], list(zip(trainable, grads[1:1 + len(trainable)]))
