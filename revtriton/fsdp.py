"""FSDP2 units inside a reversible chain: the chain drives their gathers and reduce-scatters.

FSDP2 (``fully_shard``) gathers a unit's parameters in a forward pre-hook of the unit's module
and reduce-scatters its gradients from autograd hooks. A chain never calls its blocks, calls F
and G itself without grad, and recomputes them in backward (one autograd node for the whole
chain), so none of those hooks can do their work. The chain does it instead, in the order it
runs (DESIGN.md, "Large models"):

- forward, per block: gather the units the block's F/G calls use (a unit on the block
  itself, on F or G, or on modules inside them), run, reshard (unless the unit was built
  with ``reshard_after_forward=False``);
- backward, per block in reverse: gather, recompute G then F while the units say
  "pre-backward" (FSDP's own module hooks then only cast dtypes, as under activation
  checkpointing), put each unit's parameter gradients on its unsharded parameters and run
  FSDP's post-backward (reduce-scatter into the sharded gradient, then reshard) as soon as
  that unit's recompute is done. Those gradients never leave through the chain's autograd
  node (FSDP would receive them twice).

A unit used by one F or G is gathered around that call alone; a unit used by several calls
of a block (a unit on the block) around the block. A unit used in several blocks (a module
that is F in one block and G in another) is gathered around each use, and its gradients are
reduce-scattered after each recompute (FSDP adds them into the sharded gradient).

Every private FSDP2 name the package uses is read here, in :func:`internals`, and each has a
test (tests/test_fsdp_internals.py) that fails loudly when a torch release moves it.
"""
import contextlib
import functools
import types

import torch


def _units_possible():
    """Whether an FSDP2 unit can exist in this process: a process group is up and ``fully_shard``
    has made some module a unit (it turns the module's class into a subclass of ``FSDPModule``).
    Under DDP alone (a process group, no unit) a chain then walks none of its modules."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return bool(FSDPModule.__subclasses__())


def is_unit(module):
    """Whether ``module`` is an FSDP2 unit (``fully_shard`` was applied to it)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@functools.cache
def internals():
    """The private FSDP2 names this module uses, as one namespace (torch >= 2.6)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_common, _fsdp_state

    def groups(state):
        # torch 2.12+: a list of groups; torch <= 2.11: one group or None
        many = getattr(state, "_fsdp_param_groups", None)
        if isinstance(many, (list, tuple)):
            return list(many)
        one = state._fsdp_param_group
        return [] if one is None else [one]

    return types.SimpleNamespace(
        get_state=_fsdp_state._get_module_fsdp_state,  # module -> FSDPState or None
        TrainingState=_fsdp_common.TrainingState,  # FORWARD, PRE_BACKWARD, POST_BACKWARD, IDLE
        groups=groups,  # FSDPState -> [FSDPParamGroup]
    )


class Unit:
    """One FSDP param group the chain drives: its state, where it is used, its slots."""

    def __init__(self, state, group, name):
        self.state, self.group, self.name = state, group, name

    def unsharded(self):
        """The ids of this group's unsharded parameters (created by its first gather)."""
        return {id(fp.unsharded_param): fp for fp in self.group.fsdp_params if hasattr(fp, "_unsharded_param")}


def _slots(group):
    """``(id(module), name)`` of each parameter slot ``group`` manages (shared slots included)."""
    for fp in group.fsdp_params:
        info = fp._module_info
        yield id(info.module), info.param_name
        for module, name in zip(info.shared_modules, info.shared_param_names):
            yield id(module), name


def _call_slots(module):
    return [(id(m), k) for m in module.modules() for k, p in m._parameters.items() if p is not None]


class ChainUnits:
    """The FSDP2 units inside a chain's blocks, and when each block's calls use them.

    ``calls[(i, id(fn))]``: the units the call of ``fn`` (an F or G of ``blocks[i]``) uses,
    gathered around that call alone; ``per_block[i]``: the units several calls of block ``i``
    use, gathered around the block. ``states[(i, id(fn))]``: the FSDP states whose module hooks
    can fire in that call, or that own its units (their training state says pre-backward while
    it runs); ``dtype[(i, id(fn))]``: the dtype a unit's mixed-precision policy computes that
    call in (or None).
    """

    def __init__(self, blocks, found):
        fsdp = internals()
        self.units = []
        by_slot = {}
        for state, where in found:
            for group in fsdp.groups(state):
                unit = Unit(state, group, where)
                self.units.append(unit)
                for slot in _slots(group):
                    by_slot[slot] = unit
        self.calls, self.per_block, self.states, self.dtype, self.of_block = {}, {}, {}, {}, {}
        for i, block in enumerate(blocks):
            counts, order = {}, []
            block_state = fsdp.get_state(block)
            for name in block.FUNCTIONS:
                fn = getattr(block, name)
                key = (i, id(fn))
                units = list(dict.fromkeys(by_slot[s] for s in _call_slots(fn) if s in by_slot))
                states = [s for s in (fsdp.get_state(m) for m in fn.modules()) if s is not None]
                states += [u.state for u in units] + ([block_state] if block_state is not None else [])
                self.states[key] = list(dict.fromkeys(states))
                self.calls[key] = units
                self.dtype[key] = _compute_dtype(fsdp.get_state(fn) or block_state)
                for u in units:
                    counts[u] = counts.get(u, 0) + 1
                    order.append(u)
            shared = [u for u in dict.fromkeys(order) if counts[u] > 1]
            self.per_block[i] = shared
            self.of_block[i] = list(dict.fromkeys(order))
            for name in block.FUNCTIONS:
                key = (i, id(getattr(block, name)))
                self.calls[key] = [u for u in self.calls[key] if u not in shared]


def _compute_dtype(state):
    """The dtype ``state``'s mixed-precision policy casts its module's inputs to, or None."""
    if state is None:
        return None
    policy = getattr(state, "_mp_policy", None)
    if policy is None or not policy.cast_forward_inputs:
        return None
    return policy.param_dtype


def _unit_name(block_index, path):
    return f"blocks[{block_index}]" + (f".{path}" if path else "")


def chain_units(blocks):
    """The :class:`ChainUnits` of ``blocks``, or None when no FSDP2 unit lies inside them (the
    common case: without a process group or any unit in the process, no walk at all). Refuses,
    before anything runs, what the chain cannot drive: a unit inside with no enclosing unit that
    ran forward first (the root FSDP2 needs), and a unit that also manages modules outside the
    chain's blocks."""
    if not _units_possible():
        return None
    fsdp = internals()
    found, inside = {}, set()
    for i, block in enumerate(blocks):
        for path, module in block.named_modules():
            inside.add(id(module))
            state = fsdp.get_state(module)
            # a block called on its own (a chain of one) whose own hooks gathered it: FSDP drives it
            if state is not None and state._training_state == fsdp.TrainingState.FORWARD:
                continue
            if state is not None and state not in found:
                found[state] = _unit_name(i, path)
    if not found:
        return None
    for state, where in found.items():
        if state._is_root is not False:
            raise RuntimeError(
                f"{where} is an FSDP2 unit (fully_shard) inside a reversible chain, but no enclosing FSDP2 unit "
                f"has run forward around it: FSDP2 needs a root unit, and the chain gathers and reduce-scatters "
                f"its units inside the root's step. Also apply fully_shard to the model holding the chain (or to "
                f"the ReversibleSequential), after its blocks, and call that module")
        outside = [m for m in getattr(state, "_modules", ()) if id(m) not in inside]
        if outside:
            raise RuntimeError(
                f"{where} is an FSDP2 unit that also holds {type(outside[0]).__name__}, a module outside the "
                f"reversible chain: the chain drives the gathers and reduce-scatters of the units inside it in "
                f"the order it runs them, which it cannot order with a module it does not run. Apply "
                f"fully_shard to the chain's modules and to the others separately")
    return ChainUnits(blocks, list(found.items()))


@contextlib.contextmanager
def _training_state(states, value):
    """Set the FSDP states' training state to ``value`` for the block of code, then back."""
    before = [s._training_state for s in states]
    for s in states:
        s._training_state = value
    try:
        yield
    finally:
        for s, b in zip(states, before):
            s._training_state = b


@contextlib.contextmanager
def _pre_backward(group):
    """``group`` pre-backward for the block of code: an all-gather then frees its buffer at once
    (not deferred to the next forward)."""
    before = group._training_state
    group._training_state = internals().TrainingState.PRE_BACKWARD
    try:
        yield
    finally:
        group._training_state = before


def _gather(units):
    """All-gather ``units`` (the ones not gathered or prefetched yet) and wait for them."""
    for u in units:
        with _pre_backward(u.group):
            u.group.unshard()
            u.group.wait_for_unshard()


def _prefetch(units, i):
    """Start the all-gathers of block ``i``'s units (none if ``i`` is None) without waiting: the
    next block's parameters arrive while this block computes, as FSDP2 prefetches for ordinary
    models; :func:`_gather` waits for them when block ``i`` runs."""
    for u in [] if i is None else units.of_block[i]:
        with _pre_backward(u.group):
            u.group.unshard(async_op=True)


def _reshard_after_forward(units):
    """Reshard ``units`` after their forward use, unless built with reshard_after_forward=False."""
    ts = internals().TrainingState
    for u in units:
        g = u.group
        before = g._training_state
        g._training_state = ts.FORWARD
        try:
            g.reshard()
        finally:
            g._training_state = before


def _cast_run(run, dtype):
    if dtype is None:
        return run

    def cast(name, module, x, kwargs):
        return run(name, module, x.to(dtype) if x.is_floating_point() else x, kwargs)
    return cast


def forward_block(units, i, run, following=None):
    """A context giving the ``run(name, module, x, kwargs)`` that block ``i`` of a chain runs its
    F/G calls with, forward or inverse: each call's units gathered around it, the block's shared
    units around the block, and the units of the block that runs next (``following``, or None)
    prefetched. ``run`` itself when the chain holds no unit (a plain nullcontext, which
    torch.compile traces)."""
    return contextlib.nullcontext(run) if units is None else _forward_block(units, i, run, following)


@contextlib.contextmanager
def _forward_block(units, i, run, following):
    pre_backward = internals().TrainingState.PRE_BACKWARD
    shared = units.per_block[i]
    _gather(shared)
    _prefetch(units, following)

    def block_run(name, module, x, kwargs):
        key = (i, id(module))
        own = units.calls.get(key, [])
        _gather(own)
        try:
            with _training_state(units.states.get(key, []), pre_backward):
                return _cast_run(run, units.dtype.get(key))(name, module, x, kwargs)
        finally:
            _reshard_after_forward(own)

    try:
        yield block_run
    finally:
        _reshard_after_forward(shared)


def _hand_to_fsdp(p, g):
    """Put ``g``, the gradient of a unit's unsharded parameter ``p``, where FSDP's post-backward
    reads it, as autograd would: added to one already there (accumulation without sync)."""
    if g is None:
        return
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


def _post_backward(units):
    """Reduce-scatter ``units``' gradients into their sharded gradients and reshard them."""
    for u in units:
        u.group.post_backward()


def backward_block(units, i, vjp, following=None):
    """A context giving the ``vjp(module, x, grad, negate)`` that block ``i`` recomputes its F/G calls
    with in the chain's backward: each call's units gathered around it, their gradients handed
    to FSDP (reduce-scattered) as soon as the call's backward is done, and left out of the
    ``[(param, grad)]`` it returns; the block's shared units the same around the whole block;
    the units of the block recomputed next (``following``, or None) prefetched. ``vjp`` itself
    when the chain holds no unit."""
    return contextlib.nullcontext(vjp) if units is None else _backward_block(units, i, vjp, following)


@contextlib.contextmanager
def _backward_block(units, i, vjp, following):
    pre_backward = internals().TrainingState.PRE_BACKWARD
    shared = units.per_block[i]
    _gather(shared)
    _prefetch(units, following)
    shared_ids = {k: u for u in shared for k in u.unsharded()}

    def block_vjp(module, x, grad, negate=False):
        key = (i, id(module))
        own = units.calls.get(key, [])
        _gather(own)
        dtype = units.dtype.get(key)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        with _training_state(units.states.get(key, []), pre_backward):
            out, grad_x, params = vjp(module, x, grad, negate)
        mine = dict(shared_ids)
        for u in own:
            for k in u.unsharded():
                mine[k] = u
        kept = []
        for p, g in params:
            if id(p) in mine:
                _hand_to_fsdp(p, g)
            else:
                kept.append((p, g))
        _post_backward(own)
        return out, grad_x, kept

    yield block_vjp
    _post_backward(shared)


def _held_bytes(groups):
    """Bytes of unsharded parameters and unsharded gradients ``groups`` hold now."""
    total = 0
    for g in groups:
        for fp in g.fsdp_params:
            if hasattr(fp, "_unsharded_param"):
                p = fp._unsharded_param
                total += p.untyped_storage().nbytes()
                if p.grad is not None:
                    total += p.grad.untyped_storage().nbytes()
            acc = getattr(fp, "unsharded_accumulated_grad", None)
            if acc is not None:
                total += acc.untyped_storage().nbytes()
    return total


@contextlib.contextmanager
def track_unsharded(model):
    """Within the block, ``peak[0]`` is the most bytes of unsharded parameters and gradients that
    the FSDP2 units of ``model`` held at once, counted from FSDP's own storage after every gather
    and as every reduce-scatter begins (measurement: ``python -m bench fsdp``)."""
    fsdp = internals()
    groups = [g for m in model.modules() if (s := fsdp.get_state(m)) is not None for g in fsdp.groups(s)]
    groups = list(dict.fromkeys(groups))
    cls = type(groups[0]) if groups else None
    peak = [0]
    if cls is None:
        yield peak
        return
    wait, post = cls.wait_for_unshard, cls.post_backward

    def sample():
        peak[0] = max(peak[0], _held_bytes(groups))

    def wait_for_unshard(self, *args, **kwargs):
        out = wait(self, *args, **kwargs)
        sample()
        return out

    def post_backward(self, *args, **kwargs):
        sample()
        return post(self, *args, **kwargs)

    cls.wait_for_unshard, cls.post_backward = wait_for_unshard, post_backward
    try:
        yield peak
    finally:
        cls.wait_for_unshard, cls.post_backward = wait, post
