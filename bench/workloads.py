"""What the suite measures: a model, an input and a loss per (workload, method).

Methods: ``eager`` (the eager twin, plain autograd), ``checkpoint`` (the eager twin with
``torch.utils.checkpoint`` per reversible block), ``revtriton`` (the reversible model), and
the peers ``memcnn``, ``revlib`` and ``revtorch`` (the same F and G in their reversible
wrappers; additive chains only). The ``overhead`` workload is a deep chain of tiny F and G
(``Linear + Tanh``), where a step costs host time (Python, dispatch, autograd, launches) and
not arithmetic: the regime of RevNets on small maps and of any model on a fast GPU. The
affine sweep is a flow trained on its negative log-likelihood (output and log-determinant),
against its eager twin. The transformer runs causal with a
padding mask (side inputs); the encoder-decoder's decoder attends to the encoder's output (a
side input) with padding masks on both sides. Every method of a workload starts from the same
parameters (seed 0).
"""
import functools
import importlib.util

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import revtriton as rt
from revtriton import models
from revtriton.function import eager_chain

METHODS = ("eager", "checkpoint", "revtriton")
PEERS = ("memcnn", "revlib", "revtorch")
ADDITIVE_CHAINS = ("chain", "overhead")  # the workloads the peers can run


def conv_unit(c):
    """F and G of the depth sweep: BatchNorm-ReLU-Conv3x3 on ``c`` channels."""
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False))


def linear_unit(width):
    """F and G of the overhead workload: Linear-Tanh on ``width`` features."""
    return nn.Sequential(nn.Linear(width, width), nn.Tanh())


def chains(model):
    return [m for m in model.modules() if isinstance(m, rt.ReversibleSequential)]


def _checkpointed(blocks, x, **kwargs):
    for block in blocks:
        x = checkpoint(eager_chain, (block,), x, False, kwargs, use_reentrant=False)
    return x


def as_method(model, method):
    """``model`` run by ``method``: its chains reversible, eager, or eager with checkpoints,
    whichever of these it was set to before (so one model can be switched between them)."""
    for chain in chains(model):
        chain.reversible = method == "revtriton"
        if method == "checkpoint":
            chain.forward = functools.partial(_checkpointed, list(chain))
        else:
            vars(chain).pop("forward", None)  # the class's forward again
    return model


def padding_mask(batch, tokens):
    """(batch, tokens), True at padding: sample i keeps ``tokens * (1 - i / (2 * batch))`` tokens."""
    lengths = [tokens - i * tokens // (2 * batch) for i in range(batch)]
    return torch.arange(tokens)[None, :] >= torch.tensor(lengths)[:, None]


class MaskedTransformer(nn.Module):
    """``model(x, key_padding_mask, causal=True)`` as a module of ``x`` alone (the mask a buffer)."""

    def __init__(self, model, mask):
        super().__init__()
        self.model = model
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.model(x, key_padding_mask=self.mask, causal=True)


class Seq2Seq(nn.Module):
    """An encoder-decoder as a module of the target alone: the source and the masks are buffers."""

    def __init__(self, model, src, src_mask, tgt_mask):
        super().__init__()
        self.model = model
        for name, t in (("src", src), ("src_mask", src_mask), ("tgt_mask", tgt_mask)):
            self.register_buffer(name, t)

    def forward(self, tgt):
        return self.model(self.src, tgt, self.src_mask, self.tgt_mask)


class _Copy(nn.Module):
    def forward(self, x):
        return x.clone()


def peer_chain(peer, blocks):
    """The blocks' F and G in a peer library's reversible wrappers."""
    if peer == "memcnn":
        import memcnn

        # memcnn frees its input's storage (keep_input=False) and also writes the input gradient
        # into a leaf input's .grad itself, doubling it: it gets a copy of the input, as it would
        # inside a model
        return nn.Sequential(_Copy(), *[memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(b.f, b.g),
                                                                       keep_input=False, keep_input_inverse=False)
                                        for b in blocks])
    if peer == "revtorch":
        import revtorch

        return revtorch.ReversibleSequence(nn.ModuleList([revtorch.ReversibleBlock(b.f, b.g, split_along_dim=1)
                                                          for b in blocks]))
    import revlib

    return revlib.ReversibleSequential(*[m for b in blocks for m in (b.f, b.g)], split_dim=1)


def peer_missing(method):
    """Why ``method`` cannot run here, or None."""
    if method in PEERS and importlib.util.find_spec(method) is None:
        return f"{method} is not installed (pip install {method})"
    return None


def build(workload, method):
    """``(model, input, loss_fn, autocast_dtype)`` for one row of the suite."""
    model, x, loss_fn, autocast = build_reversible(workload)
    return by_method(workload, model, method), x, loss_fn, autocast


def build_reversible(workload):
    """``(model, input, loss_fn, autocast_dtype)`` of ``workload``, its chains reversible
    (seed 0, so that every method starts from the same parameters and input)."""
    torch.manual_seed(0)
    kind = workload["kind"]
    loss_fn = _loss
    if kind == "chain":
        c, depth = workload["channels"], workload["depth"]
        model = rt.ReversibleSequential(*[rt.ReversibleBlock(conv_unit(c // 2), conv_unit(c // 2))
                                          for _ in range(depth)])
        shape = (workload["batch"], c, workload["size"], workload["size"])
    elif kind == "overhead":
        w, depth = workload["width"], workload["depth"]
        model = rt.ReversibleSequential(*[rt.ReversibleBlock(linear_unit(w), linear_unit(w), dim=1)
                                          for _ in range(depth)])
        shape = (workload["batch"], 2 * w)
    elif kind == "affine":  # a flow: s, t = BatchNorm-ReLU-Conv3x3, alternating halves
        c, depth = workload["channels"], workload["depth"]
        model = rt.ReversibleSequential(*[rt.AffineBlock(conv_unit(c // 2), conv_unit(c // 2), swap=i % 2 == 1)
                                          for i in range(depth)], log_det=True)
        shape = (workload["batch"], c, workload["size"], workload["size"])
        loss_fn = _flow_loss
    elif kind == "cifar":
        model = getattr(models, workload["model"])()
        shape = (workload["batch"], 3, workload["size"], workload["size"])
    elif kind == "transformer":
        model = MaskedTransformer(models.reversible_transformer(workload["width"], workload["depth"], workload["heads"]),
                                  padding_mask(workload["batch"], workload["tokens"]))
        shape = (workload["batch"], workload["tokens"], workload["width"])
    elif kind == "encdec":
        batch, tokens, width = workload["batch"], workload["tokens"], workload["width"]
        mask = padding_mask(batch, tokens)
        model = Seq2Seq(models.EncoderDecoder(width, workload["depth"], workload["heads"]),
                        torch.randn(batch, tokens, width), mask, mask)
        shape = (batch, tokens, width)
    else:
        raise ValueError(f"workload kind={kind!r}; expected 'chain', 'overhead', 'affine', 'cifar', 'transformer' "
                         f"or 'encdec'")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(workload.get("autocast"))
    return model, torch.randn(shape), loss_fn, dtype


def by_method(workload, model, method):
    """``model`` (from :func:`build_reversible`) run by ``method``: a peer's wrapper of its
    blocks (chain workloads only), or the model itself set by :func:`as_method`."""
    if method not in METHODS + PEERS:
        raise ValueError(f"method={method!r}; expected one of {', '.join(METHODS + PEERS)}")
    if method not in PEERS:
        return as_method(model, method)
    if workload["kind"] not in ADDITIVE_CHAINS:
        raise ValueError(f"method={method!r} for a workload of kind {workload['kind']!r}; expected kind "
                         f"{' or '.join(map(repr, ADDITIVE_CHAINS))} (the peers wrap additive blocks only)")
    return peer_chain(method, list(model))


def _loss(y):
    return y.float().square().mean()


def _flow_loss(out):
    """A flow's negative log-likelihood under a standard normal, up to a constant."""
    z, log_det = out
    return 0.5 * z.float().square().flatten(1).sum(1).mean() - log_det.mean()


def suite(preset):
    """The workloads of a preset: ``cpu`` (default, a few minutes on 2 cores), ``gpu`` (the
    H200 check) or ``tiny`` (the end-to-end test)."""
    # host-bound, the same on every preset: its steps are short, so it times more of them
    overhead = dict(kind="overhead", width=8, depth=64, batch=4, rounds=20)
    if preset == "tiny":
        sweep = [dict(kind=k, depth=d, batch=4, channels=16, size=32) for k in ("chain", "affine") for d in (2, 4)]
        return sweep, [overhead] + [dict(kind=k, width=32, depth=2, heads=2, tokens=128, batch=4)
                                    for k in ("transformer", "encdec")]
    if preset == "cpu":
        sweep = [dict(kind=k, depth=d, batch=32, channels=32, size=32) for k in ("chain", "affine") for d in (4, 16, 64)]
        refs = [overhead] + [dict(kind="cifar", model=m, batch=8, size=32)
                             for m in ("revnet38", "resnet32", "revnet110")]
        refs += [dict(kind="transformer", width=256, depth=8, heads=4, tokens=128, batch=4),
                 dict(kind="encdec", width=256, depth=4, heads=4, tokens=128, batch=4)]
        return sweep, refs
    if preset == "gpu":
        sweep = [dict(kind=k, depth=d, batch=64, channels=64, size=32) for k in ("chain", "affine") for d in (4, 16, 64)]
        refs = [overhead] + [dict(kind="cifar", model=m, batch=128, size=32)
                             for m in ("revnet38", "resnet32", "revnet110", "resnet110", "revnet164", "resnet164")]
        refs += [dict(kind="transformer", width=1024, depth=24, heads=16, tokens=1024, batch=8, autocast="bf16"),
                 dict(kind="encdec", width=1024, depth=12, heads=16, tokens=1024, batch=8, autocast="bf16")]
        return sweep, refs
    raise ValueError(f"preset={preset!r}; expected 'cpu', 'gpu' or 'tiny'")


def label(workload):
    """A short readable name for a workload."""
    kind = workload["kind"]
    if kind in ("chain", "affine"):
        return f"{kind} depth {workload['depth']}"
    if kind == "overhead":
        return f"overhead depth {workload['depth']}"
    if kind == "cifar":
        return workload["model"]
    name = "encoder-decoder" if kind == "encdec" else "transformer"
    return f"{name} {workload['depth']}x{workload['width']}"


def methods_for(workload, peers):
    """The methods a workload is measured with: ResNets have no reversible twin."""
    if workload["kind"] == "cifar" and workload["model"].startswith("resnet"):
        return ("eager",)
    if workload["kind"] == "affine":  # checkpointing per block would drop the log-determinant
        return ("eager", "revtriton")
    extra = PEERS if peers and workload["kind"] in ADDITIVE_CHAINS else ()
    return METHODS + extra
