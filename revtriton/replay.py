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
    autocast = torch.is_autocast_enabled(x.device.type) and out.is_floating_point()
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


def run_checked(name, module, x):
    """``module(x)`` with its output checked: the forward of a chain that keeps no state."""
    out = module(x)
    check_output(name, out, x)
    return out


def run_side_effect_free(name, module, x):
    """``module(x)`` leaving its buffers untouched: the explicit ``inverse`` of a chain."""
    with buffers_kept(module):
        return run_checked(name, module, x)


def _call_with(module, params, x):
    """``module(x)`` with the parameters ``params`` (by name): a plain call when they are the
    module's own, as they almost always are, else ``torch.func.functional_call``."""
    own = dict(module.named_parameters())
    if own.keys() == params.keys() and all(own[k] is p for k, p in params.items()):
        return module(x)
    return torch.func.functional_call(module, params, (x,), strict=False)


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
        device_types = {"cpu", device.type}
        self.autocast = {t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in device_types}
        self.autocast_cache = torch.is_autocast_cache_enabled()
        self.calls = []  # (parameters by name, RNG state or None) per forward call
        self.rng_state = self._rng_state() if preserve_rng_state else None  # where the next call starts

    def _rng_state(self):
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def forward(self, name, module, x):
        """``module(x)`` in the chain's forward, recorded for its recompute.

        The RNG state is read once per call: the state a call ends with is the next call's
        start, and it is kept only for a call that changed it (drew random numbers)."""
        out = run_checked(name, module, x)
        start = None
        if self.preserve_rng_state:
            after = self._rng_state()
            if not all(a is None or torch.equal(a, b) for a, b in zip(after, self.rng_state)):
                start, self.rng_state = self.rng_state, after
        self.calls.append((dict(module.named_parameters()), start))
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

    def replay_reversed(self):
        """A ``vjp(module, x, grad)`` for one backward: it replays the forward's calls from
        the last to the first (a retained graph replays them again on its next backward)."""
        calls = reversed(self.calls)

        def vjp(module, x, grad):
            return self._vjp(module, x, grad, *next(calls))

        return vjp

    def _vjp(self, module, x, grad, params, rng_state):
        """Recompute ``out = module(x)`` as in forward and pull ``grad`` back through it.

        Returns ``(out, dL/dx, [(param, dL/dparam), ...])`` with ``out`` detached; a gradient
        is None where ``out`` does not depend on that input. ``grad`` may be a function of the
        detached ``out`` that returns the gradient (an affine coupling's scale needs ``out``).
        """
        leaf = x.detach().requires_grad_()
        trainable = [p for p in params.values() if p.requires_grad]
        with buffers_kept(module):  # restored after the vjp: BatchNorm saves them for backward
            with torch.enable_grad(), self._replayed(rng_state):
                out = _call_with(module, params, leaf)
            if callable(grad):
                grad = grad(out.detach())
            if not out.requires_grad:
                return out.detach(), None, []
            grads = torch.autograd.grad(out, [leaf, *trainable], grad.to(out.dtype), allow_unused=True)
        return out.detach(), grads[0], list(zip(trainable, grads[1:]))
