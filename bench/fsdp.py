"""``python -m bench fsdp``: FSDP2 around and inside a reversible chain, on 2 CPU ranks (gloo).

One model (a linear stem, a chain of ``DEPTH`` additive blocks whose F and G are two-layer
MLPs on ``WIDTH / 2`` features, a linear head) wrapped four ways, each with a root unit on the
model: at the root only, around the chain, on each block, on each F and G. Per rank: the most
bytes of unsharded parameters and gradients FSDP held at once during a step, counted from
FSDP's own storage after every gather and as every reduce-scatter begins
(:func:`revtriton.fsdp.track_unsharded`; activations, the sharded state and communication
buffers are not counted), the sharded parameters a rank keeps, and the step time: the median
over interleaved rounds of :func:`bench.measure.interleaved_seconds`.
"""
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import revtriton as rt

from .measure import describe, interleaved_seconds
from .report import markdown_table, meta, text_table, write

WORLD, DEPTH, WIDTH, BATCH = 2, 8, 128, 32
WRAPPINGS = {
    "root only": lambda m: [],
    "around the chain": lambda m: [m.chain],
    "per block": lambda m: list(m.chain),
    "per F/G": lambda m: [u for b in m.chain for u in (b.f, b.g)],
}
COLUMNS = ("wrapping", "units", "peak unsharded params+grads B", "x root only", "sharded params B", "step ms")


def mlp(d):
    return nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        half = WIDTH // 2
        self.stem = nn.Linear(WIDTH, WIDTH)
        self.chain = rt.ReversibleSequential(*[rt.ReversibleBlock(mlp(half), mlp(half), dim=-1)
                                               for _ in range(DEPTH)])
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x):
        return self.head(self.chain(self.stem(x)))


def wrapped(name):
    from torch.distributed.fsdp import fully_shard

    model = Model()
    units = WRAPPINGS[name](model)
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    return model, len(units) + 1


def stepper(model, x):
    def step():
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)
    return step


def measure(rank, steps):
    """This rank's rows: each wrapping's peak, sharded bytes, and step time."""
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(rank))
    rows, models = {}, {}
    for name in WRAPPINGS:
        try:
            model, units = wrapped(name)
            step = stepper(model, x)
            step()  # warm-up: lazy initialisation, first gathers
            with rt.fsdp.track_unsharded(model) as peak:
                step()
            sharded = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
            rows[name] = {"units": units, "peak_bytes": peak[0], "sharded_bytes": sharded}
            models[name] = model
        except Exception as e:  # one wrapping's failure is its row's
            rows[name] = {"error": describe(e)}
    times = interleaved_seconds({n: (lambda n=n: stepper(models[n], x)) for n in models}, torch.device("cpu"),
                                steps)
    for name, t in times.items():
        rows[name].update({"step_seconds": t["seconds"]} if "seconds" in t else t)
    return rows


def _worker(rank, port, steps, out):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        rows = measure(rank, steps)
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def run(steps=5, out_dir=None):
    """Every rank's rows, ``[{wrapping: row}]``, from ``WORLD`` spawned CPU processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(out_dir or ".", f".fsdp-{os.getpid()}.pt")
    os.environ["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "0")
    mp.start_processes(_worker, args=(port, steps, out), nprocs=WORLD, start_method="spawn")
    try:
        return torch.load(out)
    finally:
        os.remove(out)


def lines(ranks):
    """Table lines: the largest peak over ranks, and rank 0's time."""
    base = max(r["root only"].get("peak_bytes", 0) for r in ranks) or float("nan")
    result = []
    for name in WRAPPINGS:
        rows = [r[name] for r in ranks]
        if any("error" in r for r in rows):
            result.append([name, "", "error: " + next(r["error"] for r in rows if "error" in r), "", "", ""])
            continue
        peak = max(r["peak_bytes"] for r in rows)
        result.append([name, rows[0]["units"], f"{peak:,}", f"{peak / base:.3f}",
                       f"{max(r['sharded_bytes'] for r in rows):,}", f"{rows[0]['step_seconds'] * 1e3:.1f}"])
    return result


def main(out_dir, steps=5):
    os.makedirs(out_dir, exist_ok=True)  # the ranks write there first
    ranks = run(steps, out_dir)
    table = lines(ranks)
    print(text_table(COLUMNS, table))
    info = meta(torch.device("cpu"), world=WORLD, backend="gloo", depth=DEPTH, width=WIDTH, batch=BATCH,
                method=__doc__.split("\n\n")[1].replace("\n", " "))
    stem = os.path.join(out_dir, f"fsdp-cpu-{info['date']}")
    markdown = (f"# python -m bench fsdp, {info['device']}, torch {info['torch']}, {info['date']}\n\n"
                f"{WORLD} ranks on gloo; {DEPTH} blocks, width {WIDTH}, batch {BATCH} per rank. "
                f"{info['method']}\n\n{markdown_table(COLUMNS, table)}\n")
    print(write(stem, info, ranks, markdown))
    return ranks
