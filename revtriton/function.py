"""One autograd node for a whole chain of reversible blocks.

Forward copies the input once into a stream: its two halves along ``dim``, stacked as one
``(2, ...)`` buffer, so that each half is contiguous for F, G and the kernels. Every block
runs in place on the stream, without autograd; the output is the stream joined back, and
only the output (and the side inputs, by reference) is saved. Backward walks the blocks in
reverse, rebuilding each block's input in place in a stream copied from the output (whose
storage it then frees if nothing else can read it) and its input gradient in a gradient
stream of the chain's own (Algorithm 1 in DESIGN.md): F and G run twice per step,
activation memory does not grow with depth.

Blocks call F and G through ``run(name, module, half)`` (see :mod:`revtriton.blocks`); the
chain's ``run`` names the call ``blocks[i].name`` and passes the module its side inputs.
"""
import functools
import sys
import weakref
from typing import Callable, NamedTuple

import torch
from torch.autograd import forward_ad

from . import fsdp, structure
from .replay import Recorder, run_checked, run_side_effect_free
from .side import NO_SIDE_INPUTS, SideInputs
from .stream import from_stream, to_stream


class Direction(NamedTuple):
    """Which way a chain runs: the block methods for its in-place steps, their backward and
    the eager twin's, whether blocks run last to first, and how F and G are called when
    nothing is kept for a recompute."""
    step: str
    back: str
    eager: str
    reversed: bool
    run_without_grad: Callable


FORWARD = Direction("forward_inplace", "backward_inplace", "eager_forward", False, run_checked)
# without grad, an inverse leaves buffers such as BatchNorm statistics untouched
INVERSE = Direction("inverse_inplace", "inverse_backward_inplace", "eager_inverse", True, run_side_effect_free)


def in_order(blocks, direction):
    """``(index, block)`` pairs in the order ``direction`` runs them."""
    pairs = list(enumerate(blocks))
    return pairs[::-1] if direction.reversed else pairs


def following(order, k):
    """The index of the block that runs after the ``k``-th of ``order`` (pairs), or None."""
    return order[k + 1][0] if k + 1 < len(order) else None


def side_inputs(blocks, kwargs):
    """``kwargs`` as the side inputs of a call of ``blocks``: a TypeError, before any state
    changes, for a keyword that none of their F and G modules takes."""
    if not kwargs:
        return NO_SIDE_INPUTS
    return SideInputs(kwargs, {f"blocks[{i}].{name}": getattr(block, name)
                               for i, block in enumerate(blocks) for name in block.FUNCTIONS})


@functools.cache
def call_name(index, name):
    """``"blocks[index].name"``: how errors and the recompute name an F/G call of a chain."""
    return f"blocks[{index}].{name}"


def runner(run, side, index):
    """The ``run(name, module, half)`` that ``blocks[index]`` calls F and G with: ``run(
    "blocks[index].name", module, half, its side inputs)``."""
    return lambda name, module, x: run(call_name(index, name), module, x, side.for_module(module))


def check_chain_input(blocks, x):
    """Raise a clear error, before any state changes, unless every block accepts ``x``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input is {type(x).__name__}; expected a torch.Tensor")
    if isinstance(x, getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", ())):
        raise TypeError(f"input is a {type(x).__name__} ({x.placements} on {x.device_mesh}); expected a plain "
                        f"torch.Tensor: the chain's in-place ops have no sharding rules. Pass x.to_local() (a "
                        f"rank's shard, e.g. its tokens) and keep the stream between blocks a plain tensor; "
                        f"parallelize inside F and G (parallelize_module on their submodules)")
    if not x.is_floating_point():
        raise TypeError(f"input has dtype {x.dtype}; expected a floating dtype (float32, float16, "
                        f"bfloat16 or float64)")
    for block in blocks:
        block.check_input(x)
    dims = sorted({block.dim % x.ndim for block in blocks})
    if len(dims) > 1:
        raise ValueError(f"the blocks of one chain split dims {dims} of the input; expected one dim for all "
                         f"(a chain keeps its two halves as one stream)")


def new_log_det(blocks, x):
    """A zero log-determinant per sample of ``x`` (index of dim 0) for ``blocks`` to add to, in
    fp32 (fp64 for fp64 inputs). Raises a ValueError if a block splits dim 0."""
    for block in blocks:
        if x.ndim < 2 or block.dim % x.ndim == 0:
            raise ValueError(f"log_det=True sums the log-determinant per sample (per index of dim 0); got a "
                             f"block splitting dim={block.dim} of an input of shape {tuple(x.shape)}: expected "
                             f"dim 0 to index samples and every block to split another dimension")
    return torch.zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def trainable_parameters(blocks):
    """The distinct parameters of ``blocks`` that require grad, in order."""
    seen = {}
    for block in blocks:
        for _, kind, _, p in structure.slots(block)[1]:
            if kind == "_parameters" and p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def _storage_refs(t):
    """How many tensors (and storage objects, this call's included) share ``t``'s storage."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _Probe(torch.autograd.Function):
    """Measures :func:`_storage_refs` of a saved output that nothing else holds."""

    @staticmethod
    def forward(ctx, x):
        y = x * 2
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        ctx.refs = _storage_refs(ctx.saved_tensors[0])
        return grad * 2


@functools.cache
def _unshared_refs():
    """The storage references of a saved output in backward when only autograd holds it."""
    x = torch.zeros(1, requires_grad=True)
    with torch.enable_grad():
        y = _Probe.apply(x)
        node, loss = y.grad_fn, (y * 1).sum()
    del y
    torch.autograd.grad(loss, x)
    return node.refs


def release_if_unshared(saved, output):
    """Free the storage of the saved output ``saved`` once backward has copied it, if nothing
    else can read it: the graph is not retained, the output tensor ``output`` (a weak
    reference) is gone, and no other tensor (a view, a ``detach()``) shares the storage.
    Returns whether it was freed. This is what keeps the chain's backward as lean as the
    in-place rebuild of DESIGN.md without destroying an output the caller still holds."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)()
    if keep_graph or output() is not None or _storage_refs(saved) > _unshared_refs():
        return False
    saved.untyped_storage().resize_(0)
    return True


class ReversibleChainFunction(torch.autograd.Function):
    """``y = blocks[-1](...blocks[0](x))`` (or, in the ``INVERSE`` direction, the chain's
    inverse ``blocks[0]^-1(...blocks[-1]^-1(x))``), saving only ``y``; with ``log_det``, also
    the per-sample log|det dy/dx|, whose gradient flows into the blocks' backward steps.

    Backward rebuilds the inputs in a stream copied from ``y`` (one activation-sized buffer,
    whatever the depth), so the output stays valid after backward and a retained graph can
    run again; when nothing else can read ``y`` any more, its storage is freed as soon as it
    is copied (:func:`release_if_unshared`). An inverse's backward is the mirror: it rebuilds
    by running the blocks forward, first to last.
    """

    @staticmethod
    def forward(ctx, x, blocks, direction, preserve_rng_state, log_det, side, n_params, *tensors):
        params, side_tensors = tensors[:n_params], tensors[n_params:]
        units = fsdp.chain_units(blocks)  # FSDP2 units inside the blocks, which the chain drives
        recorder = Recorder(x.device, preserve_rng_state)
        y, ld = run_chain(blocks, x, recorder.forward, log_det, side, direction, units)
        ctx.blocks, ctx.direction, ctx.recorder, ctx.side = blocks, direction, recorder, side.without_tensors()
        ctx.units = units
        ctx.param_index = {id(p): i for i, p in enumerate(params)}
        # version-checked: modifying a side input or a parameter in place before backward raises
        ctx.save_for_backward(y, *side_tensors, *params)
        ctx.output = weakref.ref(y)
        return (y, ld) if log_det else y

    @staticmethod
    def backward(ctx, grad_y, grad_log_det=None):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "backward with create_graph=True (double backward: a gradient penalty such as WGAN-GP or R1) "
                "through a reversible chain is not supported: its backward rebuilds activations in place "
                "without a graph. Run the eager twin for such a step: set reversible=False on the chain "
                "(the same modules and parameters)")
        with torch.no_grad():
            return ReversibleChainFunction._backward(ctx, grad_y, grad_log_det)

    @staticmethod
    def _backward(ctx, grad_y, grad_log_det):
        if getattr(ctx, "freed_in_backward", False):
            raise RuntimeError(
                "this reversible chain's backward was interrupted (an exception or KeyboardInterrupt in F or G "
                "during the recompute) after it had freed its saved output, so it cannot run again: run the "
                "forward again. (Holding the output, e.g. y = chain(x), keeps it and allows a rerun)")
        dim = ctx.blocks[0].dim
        y, *saved = ctx.saved_tensors
        side_tensors = saved[:len(saved) - len(ctx.param_index)]
        stream = to_stream(y, dim)  # becomes each block's input in turn
        ctx.freed_in_backward = release_if_unshared(y, ctx.output)  # until this backward ends
        del y
        grad = to_stream(grad_y, dim, like=stream)
        param_grads = [None] * len(ctx.param_index)
        wants_grad = ctx.needs_input_grad[7 + len(param_grads):]
        side = ctx.side.replaced([t.detach().requires_grad_(w) for t, w in zip(side_tensors, wants_grad)])
        vjp, side_grads = ctx.recorder.replay_reversed(side, grad)
        order = in_order(ctx.blocks, ctx.direction)[::-1]
        back, units, param_index = ctx.direction.back, ctx.units, ctx.param_index
        pair, grad_pair = tuple(stream.unbind(0)), tuple(grad.unbind(0))  # the blocks' halves, views
        for k, (b, block) in enumerate(order):
            with fsdp.backward_block(units, b, vjp, following(order, k)) as block_vjp:
                for p, g in getattr(block, back)(pair, grad_pair, block_vjp, grad_log_det):
                    i = param_index.get(id(p))
                    if g is not None and i is not None:
                        param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
        del stream, pair, grad_pair
        dx = from_stream(grad, dim) if ctx.needs_input_grad[0] else None
        ctx.freed_in_backward = False  # ended: autograd's own error guards a second backward
        return (dx, None, None, None, None, None, None, *param_grads, *side_grads)


def run_chain(blocks, x, run, log_det, side, direction=FORWARD, units=None):
    """``(y, log_det or None)``: the blocks run in place on a stream of ``x``, in ``direction``
    (each gathering its FSDP2 ``units``, :func:`revtriton.fsdp.chain_units`)."""
    dim = blocks[0].dim
    stream = to_stream(x, dim)
    ld = new_log_det(blocks, x) if log_det else None
    order = in_order(blocks, direction)
    pair = tuple(stream.unbind(0))  # the blocks' halves, views of the stream
    for k, (i, block) in enumerate(order):
        with fsdp.forward_block(units, i, run, following(order, k)) as block_run:
            getattr(block, direction.step)(pair, runner(block_run, side, i), ld)
    return from_stream(stream, dim), ld


def reversible_chain(blocks, x, preserve_rng_state=True, log_det=False, kwargs=None):
    """Run ``blocks`` on ``x`` reversibly, passing F and G the side inputs ``kwargs``
    (:mod:`revtriton.side`). With ``log_det``, return ``(y, log|det dy/dx| per sample)``.

    With grad, one autograd node keeps only the output (:class:`ReversibleChainFunction`);
    torch.compile does not trace into it (one graph break): F and G run eagerly, and the
    coupling ops they feed are the ones a compiled F or G can use. Without grad, nothing is
    kept for a recompute and torch.compile traces through the chain, the coupling ops included.
    While ``torch.export`` or ``torch.jit.trace`` records it, the chain runs as ordinary
    autograd ops (:func:`eager_chain`), which their graphs can hold. An empty chain is the
    identity.
    """
    if not blocks or torch.jit.is_tracing() or is_exporting():
        return eager_chain(blocks, x, log_det, kwargs)
    if torch.is_grad_enabled():
        return _reversible_with_grad(blocks, x, preserve_rng_state, log_det, kwargs, FORWARD)
    return _without_grad(blocks, x, log_det, kwargs, FORWARD)


def inverse_chain(blocks, y, preserve_rng_state=True, log_det=False, kwargs=None):
    """Rebuild a chain's input from its output ``y`` (``y`` itself is not modified), passing F
    and G the side inputs ``kwargs`` of the forward call. With ``log_det``, return ``(x,
    log|det dx/dy| per sample)``, the negative of the forward's log-determinant at ``x``.

    With grad, it trains like the forward: one autograd node keeps only ``x`` and its backward
    runs the blocks forward again (F and G twice per step, memory flat in depth), replaying
    RNG, autocast, buffers and training flags; F and G are called as in a forward (BatchNorm
    updates its statistics). Without grad (and under export or tracing) nothing is kept and
    buffers are left untouched: use eval mode if F or G draw random numbers (dropout), or the
    rebuilt input will differ.
    """
    if blocks and torch.is_grad_enabled() and not (torch.jit.is_tracing() or is_exporting()):
        return _reversible_with_grad(blocks, y, preserve_rng_state, log_det, kwargs, INVERSE)
    return _without_grad(blocks, y, log_det, kwargs, INVERSE)


def _checked_side_inputs(blocks, x, kwargs):
    """The checks of a chain's call, before any state changes; returns its side inputs."""
    refuse_function_transforms()
    check_chain_input(blocks, x)
    return side_inputs(blocks, kwargs)


@torch.compiler.disable
def _reversible_with_grad(blocks, x, preserve_rng_state, log_det, kwargs, direction):
    """The chain as one autograd node, or without grad if nothing in it requires grad."""
    side = _checked_side_inputs(blocks, x, kwargs)
    params = trainable_parameters(blocks)
    if x.requires_grad or params or any(t.requires_grad for t in side.tensors):
        return ReversibleChainFunction.apply(x, tuple(blocks), direction, preserve_rng_state, log_det, side,
                                             len(params), *params, *side.tensors)
    # grad enabled: F and G are called as in training (an inverse updates BatchNorm statistics too)
    return _without_grad(blocks, x, log_det, kwargs, direction, side, run_checked)


@torch.no_grad()
def _without_grad(blocks, x, log_det, kwargs, direction, side=None, run=None):
    """The chain with nothing kept for a recompute (torch.compile traces through it), calling F
    and G with ``run`` (by default as ``direction`` does without grad)."""
    side = _checked_side_inputs(blocks, x, kwargs) if side is None else side
    if not blocks:
        return (x, new_log_det(blocks, x)) if log_det else x
    run = direction.run_without_grad if run is None else run
    y, ld = run_chain(blocks, x, run, log_det, side, direction, fsdp.chain_units(blocks))
    return (y, ld) if log_det else y


def is_exporting():
    """Whether ``torch.export`` is recording the code that runs, strict or not.

    Reads the flag that ``torch.compiler.is_exporting()`` returns: torch 2.11's dynamo folds
    that call to True under torch.compile too, which would send compiled chains down the
    export path; a read of the flag itself is traced as its value.
    """
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return getattr(torch.compiler, "is_exporting", lambda: False)() if flag is None else flag


def refuse_function_transforms():
    """Raise a clear error under torch.func transforms (vmap, grad, jacrev, ...) and within
    forward-mode AD (``torch.autograd.forward_ad.dual_level``), where the chain's in-place
    kernels would carry no tangent and its output would silently have none."""
    if forward_ad._current_level >= 0:
        raise RuntimeError(
            "a reversible chain cannot run within forward-mode AD (torch.autograd.forward_ad.dual_level): its "
            "in-place kernels carry no tangent, so its output would silently have none. Run the eager twin: set "
            "reversible=False on the chain (the same modules and parameters)")
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "a reversible chain cannot run under torch.func transforms (vmap, grad, jacrev, ...): its one "
            "autograd node computes its own backward, which they cannot transform. For per-sample gradients, "
            "run the eager twin: set reversible=False on the chain (the same modules and parameters).")


def eager_chain(blocks, x, log_det, kwargs=None, direction=FORWARD):
    """The same function as :func:`reversible_chain` (or :func:`inverse_chain`) with plain
    autograd, keeping every activation (the debugging switch ``reversible=False``)."""
    check_chain_input(blocks, x)
    side = side_inputs(blocks, kwargs)
    ld = new_log_det(blocks, x) if log_det else None
    for i, block in in_order(blocks, direction):
        x = getattr(block, direction.eager)(x, ld, runner(run_checked, side, i))
    return (x, ld) if log_det else x
