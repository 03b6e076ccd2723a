"""ReversibleSequential: a chain of reversible blocks run as one autograd node."""
from collections import OrderedDict

from torch import nn

import torch

from .fsdp import is_unit
from .function import INVERSE, eager_chain, inverse_chain, reversible_chain


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

    Side inputs: ``chain(x, **kwargs)`` passes each F and G the keyword arguments its forward
    names after its input (all of them if it takes ``**kwargs``); a keyword that none takes is
    a TypeError. Values may be tensors, tuples or lists of tensors, or anything else (passed as
    it is). Every tensor that requires grad gets its gradient, summed over the F and G calls
    that read it, through the chain's one autograd node, which keeps them once, by reference;
    modifying one in place before backward raises autograd's error. F and G must read every
    other tensor that requires grad as their input or a parameter of theirs: backward raises a
    RuntimeError naming the block and module that read one any other way (an attribute, a
    closure, another module's parameter), whose gradient would be lost. ``inverse(y, **kwargs)``
    takes the side inputs of the forward call.

    Neither the caller's input nor the chain's output is modified: backward rebuilds the
    inputs in a copy of the output (one activation-sized buffer, whatever the depth), so
    ``inverse(y)`` still works after ``backward()``; the output's own storage is freed once
    copied if nothing else can read it. torch.compile graph-breaks around the
    chain (F and G run eagerly inside).
    """

    def __init__(self, *blocks, preserve_rng_state=True, reversible=True, log_det=False):
        self.preserve_rng_state = preserve_rng_state
        self.reversible = reversible
        self.log_det = log_det
        super().__init__(*blocks)  # through add_module, which checks each block

    def _settings(self):
        return dict(preserve_rng_state=self.preserve_rng_state, reversible=self.reversible, log_det=self.log_det)

    def add_module(self, name, module):
        """Register ``module`` as the block ``name``: a TypeError unless it is a reversible block
        (the constructor, ``append``, ``+=`` and ``*=`` come here)."""
        _check_block(name, module)
        super().add_module(name, module)

    def extend(self, blocks):
        blocks = list(blocks)
        for i, block in enumerate(blocks):  # all of them before any is added
            _check_block(len(self) + i, block)
        return super().extend(blocks)

    def insert(self, index, module):
        _check_block(index, module)
        return super().insert(index, module)

    def __setitem__(self, idx, module):
        _check_block(idx, module)
        super().__setitem__(idx, module)

    def __getitem__(self, idx):
        """A block, or for a slice a chain of those blocks (their names and this chain's settings)."""
        if isinstance(idx, slice):
            return ReversibleSequential(OrderedDict(list(self._modules.items())[idx]), **self._settings())
        return super().__getitem__(idx)

    def __add__(self, other):
        """The blocks of this chain, then those of ``other``: a chain with the settings both share."""
        if not isinstance(other, ReversibleSequential):
            raise TypeError(f"a ReversibleSequential adds another ReversibleSequential; got {type(other).__name__}")
        if other._settings() != self._settings():
            raise ValueError(f"the chains' settings differ ({self._settings()} and {other._settings()}); "
                             f"expected equal settings")
        return ReversibleSequential(*self, *other, **self._settings())

    def __mul__(self, times):
        """The blocks repeated ``times`` times (the same modules: shared weights), as a chain."""
        return ReversibleSequential(*super().__mul__(times), **self._settings())

    __rmul__ = __mul__

    def forward(self, x, **kwargs):
        """``y`` (and the log-determinant with ``log_det=True``) of the blocks applied in turn to
        ``x``, passing F and G the side inputs ``kwargs``; an empty chain is the identity."""
        _check_no_block_hooks(self)
        if not self.reversible:
            return eager_chain(tuple(self), x, self.log_det, kwargs)
        return reversible_chain(tuple(self), x, self.preserve_rng_state, self.log_det, kwargs)

    def inverse(self, y, **kwargs):
        """Rebuild the chain's input from its output ``y`` (``y`` is not modified), given the side
        inputs of the forward call. With grad enabled it is differentiable with respect to
        ``y``, the parameters and the side inputs, at the forward's cost (one autograd node
        keeping only the result; backward runs the blocks forward again); without grad it
        keeps nothing and leaves buffers untouched."""
        return self._inverse(y, False, kwargs)

    def inverse_and_log_det(self, y, **kwargs):
        """``(x, log|det dx/dy|)`` per sample (dim 0 indexes samples): the inverse and the
        negative of the forward's log-determinant at ``x``, both differentiable with grad
        enabled (0 for additive blocks), as normalizing-flow libraries name it."""
        return self._inverse(y, True, kwargs)

    def _inverse(self, y, log_det, kwargs):
        _check_no_block_hooks(self)
        if not self.reversible and torch.is_grad_enabled():
            return eager_chain(tuple(self), y, log_det, kwargs, INVERSE)
        return inverse_chain(tuple(self), y, self.preserve_rng_state, log_det, kwargs)


_HOOKS = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
          "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook"}


def _check_no_block_hooks(chain):
    """Refuse module hooks on a block inside ``chain``: the chain runs each block's F and G
    itself and never calls the block, so such a hook would silently never fire."""
    for i, block in enumerate(chain):
        kinds = [kind for attr, kind in _HOOKS.items() if getattr(block, attr, None)]
        if kinds and not is_unit(block):  # FSDP2's hooks: the chain drives the unit itself
            raise RuntimeError(
                f"blocks[{i}] ({type(block).__name__}) has a {kinds[0]}, which never fires inside a "
                f"ReversibleSequential: the chain runs the block's F and G itself, without calling the block. "
                f"Register it on the block's F or G (called in forward and again in the backward recompute), "
                f"or on the chain")


def _check_block(where, module):
    if not callable(getattr(module, "backward_inplace", None)):
        raise TypeError(f"blocks[{where}] is {type(module).__name__}; expected a reversible block such as "
                        f"revtriton.ReversibleBlock")
