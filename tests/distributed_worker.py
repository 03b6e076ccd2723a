"""The process side of tests/test_distributed.py: one training step of a small model holding a
reversible chain, wrapped in DDP or FSDP2, on a gloo process group over loopback.

Every rank builds the same model from the same seed and takes its slice of the same batch, so
the averaged gradients must equal those of one process on the whole batch (:func:`reference`).
Each scenario's gradients, or the error it raised, are saved per rank for the test to compare.
"""
import datetime
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn

import revtriton as rt
from revtriton import fsdp as revtriton_fsdp
from revtriton.models import EncoderDecoder

BATCH, FEATURES, CLASSES, TOKENS = 4, 8, 3, 5


def unit(d):
    return nn.Sequential(nn.Linear(d, d), nn.Tanh())


class Model(nn.Module):
    """Linear stem, three reversible blocks, linear head. With ``shared``, block 0's F is also
    block 2's G: parameters shared between two blocks. No BatchNorm: its per-process batch
    statistics would differ from whole-batch ones (SyncBatchNorm would be needed)."""

    def __init__(self, unused=False, shared=True, one_chain=True):
        super().__init__()
        torch.manual_seed(0)
        half = FEATURES // 2
        units = [unit(half) for _ in range(6)]
        if shared:
            units[5] = units[0]
        self.stem = nn.Linear(6, FEATURES)
        blocks = [rt.ReversibleBlock(units[i], units[i + 1], dim=-1) for i in range(0, 6, 2)]
        # one_chain=False calls the blocks one by one: each is a chain of its own
        self.chain = rt.ReversibleSequential(*blocks) if one_chain else nn.Sequential(*blocks)
        self.head = nn.Linear(FEATURES, CLASSES)
        self.unused = nn.Linear(2, 2) if unused else None

    input_shape = (6,)

    def forward(self, x):
        return self.head(self.chain(self.stem(x)))


class Seq2Seq(nn.Module):
    """A reversible encoder-decoder on (batch, tokens, 6): the decoder reads the encoder's output as
    a side input, so the encoder's gradients come through the decoder chain's backward. Tokens
    whose first feature exceeds 1 are padding (never the first or the last)."""

    input_shape = (TOKENS, 6)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.src, self.tgt = nn.Linear(6, FEATURES), nn.Linear(6, FEATURES)
        self.model = EncoderDecoder(FEATURES, 2, 2)
        self.head = nn.Linear(FEATURES, CLASSES)

    def forward(self, x):
        pad = x[..., 0] > 1
        pad[:, 0] = pad[:, -1] = False
        return self.head(self.model(self.src(x), self.tgt(x.flip(1)), pad, pad.flip(1)).mean(1))


def make_model(seq2seq=False, **kwargs):
    return Seq2Seq() if seq2seq else Model(**kwargs)


def batch(model):
    return torch.randn(BATCH, *model.input_shape, generator=torch.Generator().manual_seed(1))


def loss_fn(y):
    """A mean over samples, so that the average over ranks of their slice's loss gradient equals
    the whole batch's; per-class weights keep the gradient different per element."""
    w = torch.linspace(-1, 1, y.shape[-1])
    return (y * w).sum(-1).mean() + y.square().mean()


def reference(**model_kwargs):
    """Parameter gradients of one process on the whole batch, by name."""
    model = make_model(**model_kwargs)
    loss_fn(model(batch(model))).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _full(t):
    if t is None:
        return None
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _step(model, x, params):
    """Zero the gradients, run forward and backward, return the gradients and how many times
    each parameter's post-accumulate-grad hooks ran: under DDP, how many times autograd
    accumulated into it, DDP's signal that it is ready (FSDP2 runs these hooks itself)."""
    counts = {name: 0 for name, _ in params}

    def counter(name):
        def hook(_):
            counts[name] += 1
        return hook

    handles = [p.register_post_accumulate_grad_hook(counter(name)) for name, p in params]
    for _, p in params:
        p.grad = None
    loss_fn(model(x)).backward()
    for h in handles:
        h.remove()
    return {name: _full(p.grad) for name, p in params}, counts


def _ddp(**kwargs):
    def wrap(model):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, **kwargs), model
    return wrap


def _fsdp(units, root=True, **kwargs):
    """fully_shard on each module of ``units(model)`` (a list: one unit of several modules), then
    on the model (the root) unless ``root=False``; ``kwargs`` (e.g. reshard_after_forward) go to
    the inner units, and ``mp_policy`` to every unit."""
    def wrap(model):
        from torch.distributed.fsdp import fully_shard

        for module in units(model):
            fully_shard(module, **kwargs)
        if root:
            fully_shard(model, **{k: v for k, v in kwargs.items() if k == "mp_policy"})
        return model, model
    return wrap


def _mixed_precision(units, root_policy=True):
    """_fsdp with bf16 parameters and fp32 gradient reduction (the root's too if ``root_policy``)."""
    def wrap(model):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for module in units(model):
            fully_shard(module, mp_policy=policy)
        fully_shard(model, **({"mp_policy": policy} if root_policy else {}))
        return model, model
    return wrap


def blocks(model):
    """The reversible blocks of a Model or a Seq2Seq (encoder and decoder)."""
    chains = [model.chain] if isinstance(model, Model) else [model.model.encoder, model.model.decoder]
    return [b for chain in chains for b in chain]


def fs_and_gs(model):
    """Each distinct F and G module (a module used twice is listed once)."""
    return list(dict.fromkeys(m for b in blocks(model) for m in (b.f, b.g)))


SCENARIOS = {  # name: (wrapper, Model's keyword arguments)
    "ddp": (_ddp(), {}),
    "ddp_find_unused": (_ddp(find_unused_parameters=True), {"unused": True}),
    "ddp_encoder_decoder": (_ddp(), {"seq2seq": True}),
    "fsdp2_root": (_fsdp(lambda m: []), {}),
    "fsdp2_chain": (_fsdp(lambda m: [m.chain]), {}),
    "fsdp2_per_block": (_fsdp(lambda m: list(m.chain)), {"shared": False}),
    "fsdp2_per_block_called_alone": (_fsdp(lambda m: list(m.chain)), {"shared": False, "one_chain": False}),
    "fsdp2_per_f_and_g": (_fsdp(fs_and_gs), {"shared": False}),
    # the units below lie inside the chain: the chain drives their gathers and reduce-scatters
    "fsdp2_per_f_and_g_shared": (_fsdp(fs_and_gs), {}),  # blocks[0].f is blocks[2].g
    "fsdp2_nested": (_fsdp(lambda m: [b.f[0] for b in m.chain] + [m.chain[1].g]), {}),
    "fsdp2_per_block_and_chain": (_fsdp(lambda m: list(m.chain) + [m.chain]), {"shared": False}),
    "fsdp2_per_block_no_reshard": (_fsdp(blocks, reshard_after_forward=False), {"shared": False}),
    "fsdp2_per_block_side_inputs": (_fsdp(blocks), {"seq2seq": True}),
    "fsdp2_per_f_and_g_side_inputs": (_fsdp(fs_and_gs), {"seq2seq": True}),
    "fsdp2_per_block_accumulate": (_fsdp(blocks), {"shared": False}),
    "fsdp2_per_f_and_g_accumulate": (_fsdp(fs_and_gs), {}),
    "fsdp2_root_mixed_precision": (_mixed_precision(lambda m: []), {}),
    "fsdp2_per_block_mixed_precision": (_mixed_precision(blocks), {"shared": False}),
    "fsdp2_per_f_and_g_mixed_precision": (_mixed_precision(fs_and_gs), {}),
    "fsdp2_per_block_mixed_precision_fp32_root": (_mixed_precision(blocks, root_policy=False), {"shared": False}),
    "fsdp2_per_block_inverse": (_fsdp(blocks), {"shared": False}),
    "fsdp2_per_block_prefetch": (_fsdp(lambda m: list(m.chain)), {"shared": False}),
    # refused before anything runs
    "fsdp2_per_block_no_root": (_fsdp(blocks, root=False), {"shared": False}),
    "fsdp2_unit_with_a_module_outside": (_fsdp(lambda m: [[m.chain[0].f, m.head]]), {"shared": False}),
}


def _accumulate(name, wrapped, model, x, params):
    """Two backwards without zeroing, the first without gradient sync: twice one step's gradients."""
    for p in model.parameters():
        p.grad = None
    for sync in (False, True):
        model.set_requires_gradient_sync(sync)
        loss_fn(wrapped(x)).backward()
    return {"grads": {name: _full(p.grad) for name, p in params}}


def _inverse(name, wrapped, model, x, params):
    """A training step, then the chain's forward without grad and its inverse on the stem's
    output, next to an unwrapped copy's forward (``expected``)."""
    _step(wrapped, x, params)
    twin = make_model(**SCENARIOS[name][1])
    with torch.no_grad():
        h = twin.stem(x)
        expected = twin.chain(h)
        y = model.chain(h)
        return {"input": h, "output": y, "expected": expected, "inverse": model.chain.inverse(y)}


def _prefetches(name, wrapped, model, x, params):
    """One step, recording each asynchronous all-gather a unit starts (the chain's prefetch of
    the next block's units) by unit, in order."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    units = {id(g): i for i, b in enumerate(model.chain) for g in revtriton_fsdp.internals().groups(
        revtriton_fsdp.internals().get_state(b))}
    started, unshard = [], FSDPParamGroup.unshard

    def recorded(group, async_op=False):
        if async_op:
            started.append(units.get(id(group)))
        return unshard(group, async_op)

    FSDPParamGroup.unshard = recorded
    try:
        grads, _ = _step(wrapped, x, params)
    finally:
        FSDPParamGroup.unshard = unshard
    return {"grads": grads, "prefetched": started}


RUNNERS = {name: _accumulate for name in SCENARIOS if name.endswith("_accumulate")}
RUNNERS["fsdp2_per_block_prefetch"] = _prefetches
RUNNERS.update({name: _inverse for name in SCENARIOS if name.endswith("_inverse")})


def run_scenario(name, rank, world):
    if name in STANDALONE:
        return STANDALONE[name](rank, world)
    wrap, model_kwargs = SCENARIOS[name]
    wrapped, model = wrap(make_model(**model_kwargs))
    x = batch(model).chunk(world)[rank]
    params = list(model.named_parameters())
    if name in RUNNERS:
        return RUNNERS[name](name, wrapped, model, x, params)
    # a second step fails under DDP if its reduction after the first did not finish
    steps = [_step(wrapped, x, params) for _ in range(2)]
    return {"grads": steps[-1][0], "counts": [s[1] for s in steps]}


def worker(rank, world, port, out_dir, scenarios):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {"env": {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}}
    try:
        for name in scenarios:
            try:
                results[name] = run_scenario(name, rank, world)
            except Exception as e:  # noqa: BLE001  (reported to the test, which decides)
                results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.destroy_process_group()


# Tensor and sequence parallelism inside F and G (issue 16): the stream between blocks stays a
# plain local tensor; F and G take and return plain tensors, their parameters DTensors.

def mlp(d):
    return nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


def mlp_chain():
    """Two reversible blocks whose F and G are MLPs (Linear-GELU-Linear), on the last dim."""
    torch.manual_seed(0)
    half = FEATURES // 2
    return rt.ReversibleSequential(*[rt.ReversibleBlock(mlp(half), mlp(half), dim=-1) for _ in range(2)])


def mlp_input():
    return torch.randn(BATCH, TOKENS + 1, FEATURES, generator=torch.Generator().manual_seed(2))


def token_loss(y, tokens):
    """A sum over tokens (the whole sequence's ``tokens``): the ranks' losses on their token
    slices add up to the whole sequence's; the weights make each element's gradient differ."""
    w = torch.linspace(-1, 1, y.shape[-1])
    return ((y * w).sum() + y.square().sum()) / tokens


def tp_reference():
    """Parameter and input gradients of one process on the whole input."""
    chain, x = mlp_chain(), mlp_input().requires_grad_()
    token_loss(chain(x), x.shape[1]).backward()
    return {name: p.grad for name, p in chain.named_parameters()}, x.grad


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _parallelize(chain, world, sequence=False):
    """ColwiseParallel on each MLP's first Linear, RowwiseParallel on its second; with
    ``sequence``, Megatron's sequence parallelism: F takes and returns its rank's token slice
    (dim 1), gathered before the first Linear and reduce-scattered after the second."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = _mesh(world)
    styles = ({"0": ColwiseParallel(input_layouts=Shard(1)), "2": RowwiseParallel(output_layouts=Shard(1))}
              if sequence else {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for block in chain:
        for m in (block.f, block.g):
            parallelize_module(m, mesh, styles)
    return chain


def _tp_step(chain, x, tokens):
    x = x.detach().requires_grad_()
    y = chain(x)
    token_loss(y, tokens).backward()
    return {"grads": {name: _full(p.grad) for name, p in chain.named_parameters()}, "input_grad": x.grad,
            "stream_types": [type(y).__name__]}


def tp_colwise_rowwise(rank, world):
    """Each rank the whole input; F's and G's Linears split over the ranks."""
    x = mlp_input()
    return _tp_step(_parallelize(mlp_chain(), world), x, x.shape[1])


def tp_sequence_parallel_stream(rank, world):
    """Each rank its slice of the tokens as a plain tensor; F and G token-wise with replicated
    parameters; parameter gradients summed over the ranks (the input's stay per slice)."""
    x = mlp_input()
    res = _tp_step(mlp_chain(), x.chunk(world, dim=1)[rank], x.shape[1])
    for g in res["grads"].values():
        dist.all_reduce(g)
    return res


def tp_megatron_sequence_parallel(rank, world):
    """Each rank its slice of the tokens as a plain tensor; F and G Colwise/Rowwise, gathering the
    tokens before their first Linear and reduce-scattering them after their second."""
    x = mlp_input()
    return _tp_step(_parallelize(mlp_chain(), world, sequence=True), x.chunk(world, dim=1)[rank], x.shape[1])


def tp_dtensor_stream_refused(rank, world):
    """A DTensor given as the stream: refused before anything runs (the chain's own ops have no
    sharding rules; naive ones gave wrong gradients silently)."""
    from torch.distributed.tensor import DTensor, Replicate

    chain = _parallelize(mlp_chain(), world)
    chain(DTensor.from_local(mlp_input(), _mesh(world), [Replicate()]).requires_grad_())
    return {}


STANDALONE = {f.__name__: f for f in (tp_colwise_rowwise, tp_sequence_parallel_stream,
                                      tp_megatron_sequence_parallel, tp_dtensor_stream_refused)}
