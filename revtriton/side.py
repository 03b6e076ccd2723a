"""Side inputs: the keyword arguments of a chain's call, passed on to F and G.

``chain(x, key_padding_mask=m, rotary=(cos, sin), causal=True)`` calls each F and G with the
keyword arguments its ``forward`` names after its input (all of them if it takes
``**kwargs``). A value may be a tensor, a tuple or list of tensors (any nesting that
``torch.utils._pytree`` flattens), or anything else, passed as it is. The tensors are inputs
of the chain's single autograd node, saved once by reference: each that requires grad gets
the sum of its gradients from every F and G call that read it, and the backward's recompute
reads exactly the tensors the forward read.
"""
import copy
import dataclasses
import functools
import inspect

import torch
from torch.utils import _pytree as pytree


@functools.cache
def _keywords(fn, skip):
    """The keyword names ``fn`` takes after its first ``skip`` parameters, or None for ``**kwargs``.
    A builtin without a signature (``torch.tanh``) takes none."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except ValueError:
        return frozenset()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params[skip:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def keywords_of(module):
    """The keyword arguments ``module`` (F or G) takes besides its input: a frozenset of names,
    or None when its forward takes ``**kwargs``. Looks through ``torch.compile``."""
    forward = getattr(module, "_orig_mod", module).forward
    if inspect.ismethod(forward):  # cached by function, not by module
        return _keywords(forward.__func__, 2)  # self, the input half
    return _keywords(forward, 1)


class SideInputs:
    """The keyword arguments of one chain call: ``tensors`` (inputs of the chain's autograd node,
    in a fixed order) and everything else, kept as the call gave them."""

    def __init__(self, kwargs, functions=None):
        """``functions``: the F and G modules of the chain, by name (``{"blocks[0].f": f, ...}``).
        Raises TypeError, naming them and the keywords each takes, for keywords that none of
        them takes, and for a tensor that requires grad inside an object that
        ``torch.utils._pytree`` does not flatten (it would get no gradient)."""
        accepted = {name: keywords_of(m) for name, m in (functions or {}).items()}
        unknown = [] if None in accepted.values() else sorted(set(kwargs).difference(*accepted.values()))
        if unknown:
            groups = {}
            for name, names in accepted.items():
                groups.setdefault(names, []).append(f"{name} ({type(functions[name]).__name__})")
            takes = "; ".join(f"{', '.join(where[:3])}{f' and {len(where) - 3} more' * (len(where) > 3)} "
                              f"take{'s' * (len(where) == 1)} {', '.join(sorted(names)) or 'no keyword'}"
                              for names, where in groups.items())
            raise TypeError(f"keyword argument{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} "
                            f"reached no F or G of the chain: each gets the keyword arguments its forward "
                            f"names after its input (all of them if it takes **kwargs). In this chain, {takes}")
        self.kwargs = kwargs
        leaves, self._spec = pytree.tree_flatten(kwargs)
        _refuse_opaque_tensors(kwargs)
        self._tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self._leaves = leaves
        self.tensors = [leaves[i] for i in self._tensor_at]

    def replaced(self, tensors):
        """The same keyword arguments with ``tensors`` in place of :attr:`tensors`."""
        new = copy.copy(self)
        new._leaves = list(self._leaves)
        for i, t in zip(self._tensor_at, tensors):
            new._leaves[i] = t
        new.tensors = list(tensors)
        new.kwargs = pytree.tree_unflatten(new._leaves, self._spec)
        return new

    def without_tensors(self):
        """A copy that holds no tensor (None in their place): what a chain's graph keeps."""
        return self.replaced([None] * len(self.tensors))

    def for_module(self, module):
        """The keyword arguments ``module`` takes."""
        if not self.kwargs:
            return self.kwargs
        names = keywords_of(module)
        return self.kwargs if names is None else {k: v for k, v in self.kwargs.items() if k in names}


def _refuse_opaque_tensors(kwargs):
    """A TypeError for a dataclass side input that holds a tensor requiring grad but is not
    registered with ``torch.utils._pytree``: passed as it is, its tensors would get no gradient."""
    for key, value in kwargs.items():
        for leaf in pytree.tree_leaves(value):
            if not dataclasses.is_dataclass(leaf) or isinstance(leaf, type):
                continue
            for field in dataclasses.fields(leaf):
                t = getattr(leaf, field.name, None)
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    cls = type(leaf).__name__
                    raise TypeError(
                        f"side input {key!r} is a {cls} (a dataclass) whose field {field.name!r} is a tensor "
                        f"that requires grad, inside an object the chain cannot see into: it would get no "
                        f"gradient. Register the class, torch.utils._pytree.register_dataclass({cls}), so that "
                        f"its tensors become inputs of the chain, or pass the tensor as a keyword argument")


NO_SIDE_INPUTS = SideInputs({})
