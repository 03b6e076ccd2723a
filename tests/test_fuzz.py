"""Property-based differential test (issue 15): random chains, run both ways, must agree.

Hypothesis draws a configuration (a :class:`Config`): the input's shape and memory format, the
split dim, 1 to 6 blocks (additive, affine with or without ``log_det`` and ``swap``, momentum)
whose F and G come from :data:`MENU`, the side inputs, frozen parameters and a call pattern
(:data:`PATTERNS`). :func:`run_both_ways` builds the chain in float64, runs the pattern on it
and on its eager twin (``reversible=False`` on a ``copy.deepcopy``: the same modules and
parameters, from the same RNG state) and returns a report of every difference: outputs,
the gradient of the input, of each parameter and of each side tensor (log-det included), at
1e-10 relative, hook call counts, and module state after the step (buffers such as BatchNorm
running statistics, parameters, training flags). An example passes when the report is empty,
or when the reversible chain raises one of the documented :data:`REFUSALS` (any other error
fails the example, whatever the eager twin did).

CI runs the default profile: 200 examples, derandomized (the same ones every run: a failure
reproduces), about a minute on a 2-core CPU through Triton's interpreter. The long mode sets the
number of examples with ``REVTRITON_FUZZ_EXAMPLES`` and draws new ones each run (set
``REVTRITON_FUZZ_SEED=N`` as well to repeat a run)::

    REVTRITON_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz.py

A failure prints the shrunk configuration (``Config.describe()``) and what differed, then the
``Config`` itself and a ``@reproduce_failure`` line to replay it.
"""
import copy
import os
import re
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from torch import nn

import revtriton as rt
from helpers import AddendParam, AddendSide, loss_of, rel_err

# The errors a reversible chain may raise instead of computing what its eager twin computes:
# (exception type, regex searched in the message).
REFUSALS = [
    # revtriton/function.py (and the blocks' input checks it calls)
    (TypeError, r"^input is .*; expected a torch\.Tensor"),
    (TypeError, r"^input has dtype .*; expected a floating dtype"),
    (ValueError, r"is out of range for an input of shape"),
    (ValueError, r"expected an even size to split into two halves"),
    (ValueError, r"^the blocks of one chain split dims"),
    (ValueError, r"^log_det=True sums the log-determinant per sample"),
    (RuntimeError, r"^a reversible chain cannot run under torch\.func transforms"),
    # revtriton/replay.py
    (TypeError, r"returned .*; expected a tensor shaped like its input"),
    (ValueError, r"returned shape .*; expected .*, the shape of its input half"),
    (ValueError, r"returned a tensor on .*; expected .*, its input's device"),
    (ValueError, r"returned dtype .*; expected .*, its input's dtype"),
    (RuntimeError, r"reads a tensor that requires grad but is neither its input"),
    (RuntimeError, r"\) modified its input in place \(an in-place first op"),
    (RuntimeError, r"\) modified its side input .* in place"),
    (RuntimeError, r"^backward with create_graph=True .* through a reversible chain is not supported"),
    (RuntimeError, r"its buffer .*, which the forward read, was modified in place before backward"),
    (RuntimeError, r"^this reversible chain's backward was interrupted"),
    # revtriton/sequential.py
    (RuntimeError, r"^blocks\[\d+\] \(\w+\) has a (forward|backward)( pre-)? hook, which never fires"),
    # revtriton/side.py
    (TypeError, r"reached no F or G of the chain"),
    (TypeError, r"^side input .* is a .* \(a dataclass\) whose field"),
]

TOL = 1e-10  # relative, float64
# absolute: a gradient that is zero in exact arithmetic (a bias before BatchNorm, a 1x1 spectral
# norm) is fp64 round-off of O(1) terms on both sides, whose relative error is meaningless; six
# blocks deep, with momentum's 1/beta amplifying it, that round-off reached 1.8e-12 (long mode,
# seed 20261201, the same on e98f0a8). A dropped or misrouted gradient is off by O(1e-3) or more.
ATOL = 1e-10
FUZZ_EXAMPLES = int(os.environ.get("REVTRITON_FUZZ_EXAMPLES", "200"))
LONG = "REVTRITON_FUZZ_EXAMPLES" in os.environ


def refused(error):
    """Whether ``error`` is one of the documented :data:`REFUSALS`."""
    return any(isinstance(error, kind) and re.search(pattern, str(error)) for kind, pattern in REFUSALS)


# ---------------------------------------------------------------------------------------------
# The menu: F/G builders. Each takes the half's shape and returns a module or callable; ``fits``
# says for which half shapes it applies, ``side`` which side inputs its forward takes.


class EMANorm(nn.Module):
    """Subtracts a running mean that it updates first, then reads (a buffer read after update)."""

    def __init__(self, shape, momentum=0.5):
        super().__init__()
        self.m = momentum
        self.register_buffer("mean", torch.zeros(shape))

    def forward(self, x):
        if self.training:
            self.mean.mul_(self.m).add_((1 - self.m) * x.mean(0).detach())
        return x - self.mean


class TinyAttention(nn.Module):
    """Single-head self-attention over (batch, tokens, features)."""

    def __init__(self, d):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.out(att @ v)


class TupleSide(nn.Module):
    """Reads a tuple side input ``pair=(scale, shift)``."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, pair):
        scale, shift = pair
        return torch.tanh(self.lin(x) * scale + shift)


class DictSide(nn.Module):
    """Reads a dict side input ``opts={"scale": ..., "shift": ...}``."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, opts):
        return torch.tanh(self.lin(x) + opts["shift"]) * opts["scale"]


class AnyKeyword(nn.Module):
    """Takes ``**kwargs`` (so gets every side input) and reads ``cond``."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, **kwargs):
        return torch.tanh(self.lin(x)) * torch.sigmoid(kwargs["cond"])


def _linear_tanh(half):
    return nn.Sequential(nn.Linear(half[-1], half[-1]), nn.Tanh())


def _batchnorm(half):
    return (nn.BatchNorm2d if len(half) == 4 else nn.BatchNorm1d)(half[1])


class IgnoresKeywords(nn.Module):
    """``module(x)``, taking (and ignoring) any side input: a nested chain passes its F and G
    every side input of the outer chain, as its forward takes ``**kwargs``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, **kwargs):
        return self.module(x)


def _nested(half):
    """A reversible chain as F: two additive blocks splitting the half again."""
    dim = _even_dims(half)[-1]
    quarter = list(half)
    quarter[dim] //= 2
    return rt.ReversibleSequential(*[rt.ReversibleBlock(IgnoresKeywords(_linear_tanh(quarter)),
                                                        _linear_tanh(quarter), dim=dim) for _ in range(2)])


def _even_dims(shape):
    return [d for d, n in enumerate(shape) if n % 2 == 0]


@dataclass(frozen=True)
class Entry:
    build: object  # half shape -> module or callable
    fits: object = lambda half: True
    side: tuple = ()  # side inputs its forward takes


MENU = {
    "linear_tanh": Entry(_linear_tanh),
    "conv": Entry(lambda h: nn.Sequential(nn.Conv2d(h[1], h[1], 3, padding=1), nn.Tanh()), lambda h: len(h) == 4),
    "attention": Entry(lambda h: TinyAttention(h[-1]), lambda h: len(h) == 3),
    "batchnorm": Entry(_batchnorm, lambda h: len(h) in (2, 3, 4) and torch.Size(h).numel() > h[1]),
    "dropout": Entry(lambda h: nn.Sequential(nn.Linear(h[-1], h[-1]), nn.Dropout(0.3))),
    "spectral_norm": Entry(lambda h: nn.utils.parametrizations.spectral_norm(nn.Linear(h[-1], h[-1]))),
    "spectral_norm_old": Entry(lambda h: nn.utils.spectral_norm(nn.Linear(h[-1], h[-1]))),
    "ema": Entry(lambda h: nn.Sequential(EMANorm(h[1:]), nn.Tanh())),
    "addend_side": Entry(lambda h: AddendSide(h[-1]), side=("cond",)),
    "addend_param": Entry(AddendParam),
    "identity": Entry(lambda h: nn.Identity()),
    "lambda_identity": Entry(lambda h: (lambda x: x)),
    "relu_inplace": Entry(lambda h: nn.Sequential(nn.ReLU(inplace=True), nn.Linear(h[-1], h[-1]))),
    "tanh_function": Entry(lambda h: torch.tanh),  # a builtin: no signature to read keywords from
    "silu_function": Entry(lambda h: nn.functional.silu),  # a Python function (its keyword: inplace)
    "nested": Entry(_nested, lambda h: bool(_even_dims(h))),
    "tuple_side": Entry(lambda h: TupleSide(h[-1]), side=("pair",)),
    "dict_side": Entry(lambda h: DictSide(h[-1]), side=("opts",)),
    "any_keyword": Entry(lambda h: AnyKeyword(h[-1]), side=("cond",)),
    # the very module of the chain's first function (blocks[0]'s f, s or f), in another place;
    # where that is "shared" itself, the first entry that is not (see resolved)
    "shared": Entry(None),
}


def side_tensors(name, half):
    """The side input ``name`` as a pytree of fresh tensors."""
    d = half[-1]
    return {"cond": lambda: torch.randn(half),
            "pair": lambda: (torch.randn(d), torch.randn(d)),
            "opts": lambda: {"scale": torch.randn(d), "shift": torch.randn(d)}}[name]()


# ---------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class Block:
    kind: str  # "additive", "affine", "momentum"
    functions: tuple  # menu names: (f, g), (s, t) or (f,)
    swap: bool = False  # affine
    beta: float = 0.9  # momentum


@dataclass(frozen=True)
class Config:
    shape: tuple
    channels_last: bool
    dim: int
    log_det: bool
    blocks: tuple
    side_grad: tuple = ()  # (side input, requires grad of its tensors) for each side input read
    x_requires_grad: bool = True
    frozen: bool = False  # every other parameter requires_grad=False
    pattern: str = "backward"
    seed: int = 0

    @property
    def half(self):
        half = list(self.shape)
        half[self.dim] //= 2
        return tuple(half)

    def describe(self):
        lines = [f"input {self.shape} float64{' channels_last' if self.channels_last else ''}"
                 f"{'' if self.x_requires_grad else ' (no grad)'}, split dim={self.dim}, half {self.half}, "
                 f"log_det={self.log_det}, pattern={self.pattern!r}, frozen={self.frozen}, seed={self.seed}"]
        for i, b in enumerate(self.blocks):
            extra = f", swap={b.swap}" if b.kind == "affine" else f", beta={b.beta}" if b.kind == "momentum" else ""
            lines.append(f"  blocks[{i}] {b.kind}({', '.join(b.functions)}{extra})")
        if self.side_grad:
            lines.append("  side inputs: " + ", ".join(f"{k} (requires_grad={g})" for k, g in self.side_grad))
        return "\n".join(lines)


PATTERNS = [
    "backward",  # loss.backward()
    "inverse",  # loss(chain.inverse(x)) (inverse_and_log_det with log_det).backward(): training through the inverse
    "called_twice",  # one graph: loss(chain(x)) + loss(chain(x / 2))
    "accumulate",  # loss(chain(x)).backward(); loss(chain(x / 2)).backward()
    "retain_graph",  # backward(retain_graph=True), then backward again
    "param_hook",  # p.register_hook(lambda g: g * 2) on the first trainable parameter
    "autograd_grad",  # torch.autograd.grad(loss, [x, *params, *side tensors])
    "eval_before_backward",  # model.eval() between forward and backward
    "block_hook",  # a forward hook on blocks[0]
    "create_graph",  # grad(create_graph=True), then backward of the gradients' squared norm
]

SHAPES = {2: [(b, f) for b in (1, 2, 3) for f in (4, 8)],
          3: [(b, t, f) for b in (1, 2) for t in (2, 4) for f in (4, 8)],
          4: [(n, c, h, w) for n in (1, 2) for c in (2, 4) for h in (2, 4) for w in (2, 4)]}
BLOCK_ARITY = {"additive": 2, "affine": 2, "momentum": 1}


def resolved(blocks, name):
    """The menu entry that ``name`` in ``blocks`` builds: "shared" is the chain's first function
    that is not "shared" itself (or a new linear_tanh if all are)."""
    if name != "shared":
        return name
    return next((n for b in blocks for n in b.functions if n != "shared"), "linear_tanh")


@st.composite
def blocks_from(draw, names):
    kind = draw(st.sampled_from(["additive", "affine", "momentum"]))
    functions = tuple(draw(st.sampled_from(names)) for _ in range(BLOCK_ARITY[kind]))
    return Block(kind, functions, swap=draw(st.booleans()) if kind == "affine" else False,
                 beta=draw(st.sampled_from([0.9, 0.5])) if kind == "momentum" else 0.9)


@st.composite
def configs(draw):
    ndim = draw(st.sampled_from([2, 4, 3]))
    shape = draw(st.sampled_from(SHAPES[ndim]))
    log_det = draw(st.booleans())
    dims = [d for d in _even_dims(shape) if not (log_det and d == 0)]
    dim = draw(st.sampled_from(dims or _even_dims(shape)))
    log_det = log_det and dim != 0  # a chain's log-det is per sample: dim 0 indexes them
    half = list(shape)
    half[dim] //= 2
    names = [name for name, e in MENU.items() if e.fits(half)]
    blocks = draw(st.lists(blocks_from(names), min_size=1, max_size=6))
    read = sorted({s for b in blocks for n in b.functions for s in MENU[resolved(blocks, n)].side})
    return Config(shape=tuple(shape), channels_last=ndim == 4 and draw(st.booleans()), dim=dim, log_det=log_det,
                  blocks=tuple(blocks), side_grad=tuple((s, draw(st.booleans())) for s in read),
                  x_requires_grad=draw(st.integers(0, 4)) < 4, frozen=draw(st.integers(0, 4)) == 4,
                  pattern=draw(st.sampled_from(PATTERNS)), seed=draw(st.integers(0, 2 ** 16)))


# ---------------------------------------------------------------------------------------------
# Building and running


def build(config):
    """The reversible chain of ``config`` in float64, and its side inputs (leaves, no grad yet)."""
    torch.manual_seed(config.seed)
    half = config.half
    shared, built = None, []
    for b in config.blocks:
        fns = []
        for name in b.functions:
            fn = MENU[resolved(config.blocks, name)].build(half) if name != "shared" or shared is None else shared
            shared = fn if shared is None else shared
            fns.append(fn)
        built.append(fns)
    blocks = []
    for b, fns in zip(config.blocks, built):
        if b.kind == "additive":
            blocks.append(rt.ReversibleBlock(*fns, dim=config.dim))
        elif b.kind == "affine":
            blocks.append(rt.AffineBlock(*fns, dim=config.dim, swap=b.swap))
        else:
            blocks.append(rt.MomentumBlock(*fns, beta=b.beta, dim=config.dim))
    chain = rt.ReversibleSequential(*blocks, log_det=config.log_det).double()
    if config.frozen:
        for i, p in enumerate(chain.parameters()):
            p.requires_grad_(i % 2 == 1)
    side = {name: torch.utils._pytree.tree_map(lambda t: t.double(), side_tensors(name, half))
            for name, _ in config.side_grad}
    x = torch.randn(config.shape, dtype=torch.float64)
    if config.channels_last:
        x = x.to(memory_format=torch.channels_last)
    return chain, x, side


def eager_twin(chain):
    """A deep copy of ``chain`` (nested chains included) with ``reversible=False``."""
    twin = copy.deepcopy(chain)
    for m in twin.modules():
        if isinstance(m, rt.ReversibleSequential):
            m.reversible = False
    return twin


def _fresh(config, x, side):
    """Copies of the input and side inputs, each a leaf with the configured requires_grad."""
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(config.x_requires_grad)
    wants = dict(config.side_grad)
    side = {k: torch.utils._pytree.tree_map(lambda t: t.detach().clone().requires_grad_(wants[k]), v)
            for k, v in side.items()}
    return x, side


def _loss(out):
    if isinstance(out, tuple):  # (y, log_det)
        return loss_of(out[0]) + loss_of(out[1])
    return loss_of(out)


def run_pattern(model, config, x, side):
    """Run ``config.pattern`` on ``model``: ``(outputs, gradients by name, hook calls)``."""
    leaves = {"input": x, **{f"side {k}[{i}]": t for k, v in side.items()
                             for i, t in enumerate(torch.utils._pytree.tree_leaves(v))}}
    leaves.update({f"param {n}": p for n, p in model.named_parameters()})
    wanted = {k: t for k, t in leaves.items() if t.requires_grad}
    calls = {"param hook": 0, "block hook": 0}
    if config.pattern == "param_hook":
        first = next((p for p in model.parameters() if p.requires_grad), None)
        if first is not None:
            def hook(g):
                calls["param hook"] += 1
                return g * 2
            first.register_hook(hook)
    if config.pattern == "block_hook":
        def block_hook(module, args, out):
            calls["block hook"] += 1
        model[0].register_forward_hook(block_hook)

    torch.manual_seed(config.seed + 1)
    grads = None
    p = config.pattern
    if p == "called_twice":
        outs = [model(x, **side), model(x / 2, **side)]
        loss = _loss(outs[0]) + _loss(outs[1])
    elif p == "inverse":
        outs = [model.inverse_and_log_det(x, **side) if config.log_det else model.inverse(x, **side)]
        loss = _loss(outs[0])
    else:
        outs = [model(x, **side)]
        loss = _loss(outs[0])
    if not loss.requires_grad:
        return outs, {}, calls
    if p == "eval_before_backward":
        model.eval()
    if p == "accumulate":
        loss.backward()
        outs.append(model(x / 2, **side))
        _loss(outs[-1]).backward()
    elif p == "retain_graph":
        loss.backward(retain_graph=True)
        loss.backward()
    elif p == "autograd_grad":
        got = torch.autograd.grad(loss, list(wanted.values()), allow_unused=True)
        grads = dict(zip(wanted, got))
    elif p == "create_graph":
        got = torch.autograd.grad(loss, list(wanted.values()), allow_unused=True, create_graph=True)
        second = sum((g * g).sum() for g in got if g is not None and g.requires_grad)
        if isinstance(second, torch.Tensor):
            second.backward()
        grads = {f"d/d {k} of loss": g for k, g in zip(wanted, got)}
        grads.update({k: t.grad for k, t in wanted.items()})
    else:
        loss.backward()
    if grads is None:
        grads = {k: t.grad for k, t in wanted.items()}
    return outs, grads, calls


def _state(model):
    return ({f"buffer {n}": b for n, b in model.named_buffers()},
            {f"param {n}": p for n, p in model.named_parameters()},
            {f"training {n or '(chain)'}": m.training for n, m in model.named_modules()})


def _compare(what, a, b, problems):
    if a is None or b is None:
        if (a is None) != (b is None):
            problems.append(f"{what}: reversible {'None' if a is None else 'a tensor'}, "
                            f"eager {'None' if b is None else 'a tensor'}")
        return
    if a.shape != b.shape:
        problems.append(f"{what}: shape {tuple(a.shape)} vs eager {tuple(b.shape)}")
        return
    if not a.is_floating_point():
        if not torch.equal(a, b):
            problems.append(f"{what}: {a.tolist()} vs eager {b.tolist()}")
        return
    err = rel_err(a, b)
    if not err <= TOL and not (a.double() - b.double()).abs().max() <= ATOL:  # NaN fails both
        problems.append(f"{what}: relative error {err:.3g}, largest difference "
                        f"{(a.double() - b.double()).abs().max():.3g}")


def _flat(outs):
    flat = {}
    for i, out in enumerate(outs):
        for j, t in enumerate(out if isinstance(out, tuple) else (out,)):
            flat[f"output {i}" + (f"[{j}]" if isinstance(out, tuple) else "")] = t
    return flat


def run_both_ways(config):
    """Run ``config`` on the reversible chain and on its eager twin: a report of what differs
    ("" when they agree, or when the chain refused with a documented error)."""
    chain, x, side = build(config)
    twin = eager_twin(chain)
    xr, sr = _fresh(config, x, side)
    xe, se = _fresh(config, x, side)
    x_before = xr.detach().clone()
    results = {}
    for name, model, xi, si in (("reversible", chain, xr, sr), ("eager", twin, xe, se)):
        try:
            results[name] = run_pattern(model, config, xi, si)
        except Exception as error:  # noqa: BLE001 - judged below
            results[name] = error
    rev, eager = results["reversible"], results["eager"]
    if isinstance(rev, Exception):
        if refused(rev):
            return ""
        return (f"the reversible chain raised {type(rev).__name__}: {rev}\n"
                + (f"(the eager twin raised {type(eager).__name__}: {eager})" if isinstance(eager, Exception)
                   else "(the eager twin ran)"))
    if isinstance(eager, Exception):
        return f"the eager twin raised {type(eager).__name__}: {eager}\n(the reversible chain did not)"
    problems = []
    (outs_r, grads_r, calls_r), (outs_e, grads_e, calls_e) = rev, eager
    for k, t in _flat(outs_e).items():
        _compare(k, _flat(outs_r).get(k), t, problems)
    for k in sorted(set(grads_r) | set(grads_e)):
        _compare(f"gradient of {k}", grads_r.get(k), grads_e.get(k), problems)
    if calls_r != calls_e:
        problems.append(f"hook calls: reversible {calls_r}, eager {calls_e}")
    for state_r, state_e in zip(_state(chain), _state(twin)):
        for k in sorted(set(state_r) | set(state_e)):
            a, b = state_r.get(k), state_e.get(k)
            if isinstance(b, bool) or isinstance(a, bool):
                if a != b:
                    problems.append(f"{k}: reversible {a}, eager {b}")
            else:
                _compare(k, a.detach(), b.detach(), problems)
    if not torch.equal(xr.detach(), x_before):
        problems.append("the caller's input was modified")
    return "\n".join(problems)


# no explain phase: on a failure it reruns variations of every shrunk example, minutes here
_settings = dict(max_examples=FUZZ_EXAMPLES, deadline=None, print_blob=True,
                 phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                        HealthCheck.data_too_large])


def _fuzz(test):
    fixed = "REVTRITON_FUZZ_SEED" in os.environ
    test = settings(derandomize=not (LONG or fixed), database=None, **_settings)(test)
    return seed(int(os.environ["REVTRITON_FUZZ_SEED"]))(test) if fixed else test


@_fuzz
@given(configs())
def test_a_random_chain_equals_its_eager_twin(config):
    report = run_both_ways(config)
    # one assert per kind of failure: hypothesis shrinks and reports each kind on its own
    message = f"\n{config.describe()}\n{report}"
    assert not report.startswith("the reversible chain raised"), message
    assert not report.startswith("the eager twin raised"), message
    assert not report, message
