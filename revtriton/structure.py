"""A module's structure (its submodules and the names of its parameters and buffers), walked
once and cached until any module, parameter or buffer is registered anywhere.

A chain reads the structure of every F and G on every call (to record what the recompute must
replay) and of every block (to collect the parameters its autograd node takes). Walking
``named_modules`` each time was a large part of a host-bound step (DESIGN.md, "The host path").
The structure changes only through registration (``module.sub = ...``, ``module.weight =
nn.Parameter(...)``, ``register_buffer``, parametrizations, pruning), which PyTorch's global
registration hooks report: each bumps a generation that invalidates every cached walk. Values
are never cached: a slot's tensor is read at each call, so swaps that keep the names (FSDP2's
sharded and unsharded parameters, ``module.to``) are always seen.
"""
import weakref

from torch.nn.modules import module as _module

_generation = 0
# id(module) -> (weak reference to the module, generation, weak references to its submodules, slot
# names with owners as indices into [module, *submodules]). An entry holds no strong reference: one
# would keep the module alive forever (and its parameters with it) wherever a submodule can reach the
# module again (an F that is a bound method of the model). It is dropped when the module dies.
_walks = {}

SLOT_KINDS = ("_parameters", "_buffers")


def _registered(*args):
    """A global registration hook: the structure of some module changed."""
    global _generation
    _generation += 1


for _register in (_module.register_module_module_registration_hook,
                  _module.register_module_parameter_registration_hook,
                  _module.register_module_buffer_registration_hook):
    _register(_registered)


def _walk(module):
    modules = list(module.modules())
    index = {id(m): i for i, m in enumerate(modules)}
    names = [(index[id(m)], kind, key) for m in modules for kind in SLOT_KINDS
             for key, t in getattr(m, kind).items() if t is not None]
    key = id(module)
    dropped = lambda _, key=key, walks=_walks: walks.pop(key, None)  # noqa: E731  (bound: safe at exit)
    _walks[key] = (weakref.ref(module, dropped), _generation, [weakref.ref(m) for m in modules[1:]], names)
    return modules, names


def structure(module):
    """``(modules, names)``: ``module.modules()`` as a list, and ``(index into modules, "_parameters"
    or "_buffers", key)`` for each parameter and buffer slot that holds a tensor."""
    hit = _walks.get(id(module))
    if hit is not None and hit[1] == _generation and hit[0]() is module:
        modules = [module, *(ref() for ref in hit[2])]
        if None not in modules:  # a submodule dropped without registration (del module.sub): walk again
            return modules, hit[3]
    return _walk(module)


def slots(module):
    """``(modules, [(owner, kind, key, tensor), ...])``: :func:`structure` with each slot's owner
    module and its tensor as it is now. A slot deleted without registration (``del
    module.weight``) makes it walk again."""
    modules, names = structure(module)
    try:
        return modules, _filled(modules, names)
    except KeyError:
        modules, names = _walk(module)
        return modules, _filled(modules, names)


def _filled(modules, names):
    filled = [(modules[i], kind, key, getattr(modules[i], kind)[key]) for i, kind, key in names]
    return [slot for slot in filled if slot[3] is not None]
