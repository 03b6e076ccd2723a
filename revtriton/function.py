"""One autograd node for a whole chain of reversible blocks.

Forward copies the input once into a stream buffer and runs every block in place on it,
without autograd; only that buffer (the chain's output) is saved. Backward walks the blocks
in reverse, rebuilding each block's input in place in a copy of the output and its input
gradient in a gradient buffer of the chain's own (Algorithm 1 in DESIGN.md): F and G run
twice per step, activation memory does not grow with depth.
"""
import torch
from torch.autograd.function import once_differentiable

from .replay import Recorder, run_checked, run_side_effect_free


def check_chain_input(blocks, x):
    """Raise a clear error, before any state changes, unless every block accepts ``x``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input is {type(x).__name__}; expected a torch.Tensor")
    if not x.is_floating_point():
        raise TypeError(f"input has dtype {x.dtype}; expected a floating dtype (float32, float16, "
                        f"bfloat16 or float64)")
    for block in blocks:
        block.check_input(x)


def trainable_parameters(blocks):
    """The distinct parameters of ``blocks`` that require grad, in order."""
    seen = {}
    for block in blocks:
        for p in block.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


class ReversibleChainFunction(torch.autograd.Function):
    """``y = blocks[-1](...blocks[0](x))``, saving only ``y``.

    Backward rebuilds the inputs in a copy of ``y`` (one activation-sized buffer, whatever
    the depth), so the output stays valid after backward and a retained graph can run again.
    """

    @staticmethod
    def forward(ctx, x, blocks, preserve_rng_state, *params):
        recorder = Recorder(x.device, preserve_rng_state)
        y = x.detach().clone(memory_format=torch.contiguous_format)
        for block in blocks:
            block.forward_inplace(y, recorder.forward)
        ctx.blocks, ctx.recorder = blocks, recorder
        ctx.param_index = {id(p): i for i, p in enumerate(params)}
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x = ctx.saved_tensors[0].clone()  # becomes each block's input in turn, ending as x
        grad = grad_y.clone(memory_format=torch.contiguous_format)
        param_grads = [None] * len(ctx.param_index)
        vjp = ctx.recorder.replay_reversed()
        for block in reversed(ctx.blocks):
            for p, g in block.backward_inplace(x, grad, vjp):
                i = ctx.param_index.get(id(p))
                if g is not None and i is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
        return (grad if ctx.needs_input_grad[0] else None, None, None, *param_grads)


@torch.compiler.disable
def reversible_chain(blocks, x, preserve_rng_state=True):
    """Run ``blocks`` on ``x`` reversibly. Without grad, no recompute state is kept.

    torch.compile does not trace into the chain (a graph break): F and G run eagerly, and
    the coupling ops they feed are the ones a compiled F or G can use.
    """
    check_chain_input(blocks, x)
    params = trainable_parameters(blocks)
    if torch.is_grad_enabled() and (x.requires_grad or params):
        return ReversibleChainFunction.apply(x, tuple(blocks), preserve_rng_state, *params)
    y = x.detach().clone(memory_format=torch.contiguous_format)
    with torch.no_grad():
        for block in blocks:
            block.forward_inplace(y, run_checked)
    return y


@torch.no_grad()
def invert_chain(blocks, y):
    """Rebuild a chain's input from its output ``y`` (``y`` itself is not modified).

    Buffers such as BatchNorm running statistics are left untouched. F and G are called
    as they are: use eval mode if they draw random numbers (dropout), or the rebuilt input
    will differ.
    """
    check_chain_input(blocks, y)
    x = y.detach().clone(memory_format=torch.contiguous_format)
    for block in reversed(blocks):
        block.inverse_inplace(x, run_side_effect_free)
    return x
