"""ReversibleSequential: a chain of reversible blocks run as one autograd node."""
from torch import nn

from .function import invert_chain, new_log_det, reversible_chain


class ReversibleSequential(nn.Sequential):
    """A chain of reversible blocks whose activation memory is O(1) in depth.

    Forward keeps only the chain's output; backward rebuilds each block's input from its
    output and runs F and G once more each (never twice more). Composes with ordinary
    layers, e.g. ``nn.Sequential(stem, ReversibleSequential(...), downsample, head)``.

    Args:
        *blocks: reversible blocks (:class:`~revtriton.ReversibleBlock`, ...).
        preserve_rng_state: replay the RNG state of F and G in the recompute so that
            dropout masks match the forward (free when F and G draw no random numbers).
        reversible: ``False`` runs the same blocks with plain autograd, keeping every
            activation: a debugging switch to compare against the reversible path.
        log_det: ``True`` makes forward return ``(y, log_det)``, the log|det dy/dx| of each
            sample (dim 0 indexes samples) with its gradient, for normalizing flows: 0 for
            additive blocks. Float32 for float16/bfloat16 inputs.

    Neither the caller's input nor the chain's output is modified: backward rebuilds the
    inputs in a copy of the output (one activation-sized buffer, whatever the depth), so
    ``inverse(y)`` still works after ``backward()``; the output's own storage is freed once
    copied if nothing else can read it. torch.compile graph-breaks around the
    chain (F and G run eagerly inside).
    """

    def __init__(self, *blocks, preserve_rng_state=True, reversible=True, log_det=False):
        for i, block in enumerate(blocks):
            if not callable(getattr(block, "backward_inplace", None)):
                raise TypeError(f"blocks[{i}] is {type(block).__name__}; expected a reversible block "
                                f"such as revtriton.ReversibleBlock")
        super().__init__(*blocks)
        self.preserve_rng_state = preserve_rng_state
        self.reversible = reversible
        self.log_det = log_det

    def forward(self, x):
        if not self.reversible:
            log_det = new_log_det(tuple(self), x) if self.log_det else None
            for block in self:
                x = block.eager_forward(x, log_det)
            return (x, log_det) if self.log_det else x
        return reversible_chain(tuple(self), x, self.preserve_rng_state, self.log_det)

    def inverse(self, y):
        """Rebuild the chain's input from its output ``y`` (no gradient; ``y`` is kept)."""
        return invert_chain(tuple(self), y)
