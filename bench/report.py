"""Results as tables on stdout, and as JSON, Markdown and a PNG plot on disk."""
import datetime
import json
import math
import os
import platform

import torch

COLUMNS = ("workload", "method", "peak MiB", "x eager", "step ms", "x eager ", "µs per block")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def meta(device, **fields):
    """What every result file records: the device, today's date, torch's version, and ``fields``."""
    return {"device": device_name(device), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            **fields}


def add_ratios(rows):
    """Give each row its peak memory and step time as ratios to the eager row of its workload."""
    eager = {r["workload"]: r for r in rows if r["method"] == "eager" and "error" not in r}
    for r in rows:
        base = eager.get(r["workload"])
        if base and "error" not in r:
            r["peak_ratio"] = r["peak_bytes"] / base["peak_bytes"]
            r["time_ratio"] = r["step_seconds"] / base["step_seconds"]
    return rows


def cells(r):
    if "error" in r:
        return [r["workload"], r["method"], f"error: {r['error']}", "", "", "", ""]
    per_block = f"{r['step_seconds'] / r['depth'] * 1e6:.0f}" if r.get("kind") == "overhead" else ""
    return [r["workload"], r["method"], f"{r['peak_bytes'] / 2**20:.1f}", f"{r.get('peak_ratio', math.nan):.3f}",
            f"{r['step_seconds'] * 1e3:.1f}", f"{r.get('time_ratio', math.nan):.2f}", per_block]


def text_table(columns, lines):
    """A fixed-width text table of ``lines`` (lists of cells) under ``columns``."""
    lines = [columns] + lines
    widths = [max(len(str(line[i])) for line in lines if len(line) > i) for i in range(len(columns))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def markdown_row(line):
    return "| " + " | ".join(str(c) for c in line) + " |"


def markdown_table(columns, lines):
    """A Markdown table of ``lines`` (lists of cells) under ``columns``."""
    return "\n".join([markdown_row(columns), "|" + "---|" * len(columns)] + [markdown_row(line) for line in lines])


def table(rows):
    """The suite's rows as a fixed-width text table."""
    return text_table(COLUMNS, [cells(r) for r in rows])


def write(stem, meta, rows, markdown, **sections):
    """Write ``stem``.json (``meta``, ``rows`` and any other ``sections``) and ``stem``.md
    (``markdown``); return a message."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "rows": rows, **sections}, f, indent=1)
    with open(f"{stem}.md", "w") as f:
        f.write(markdown)
    return f"results: {stem}.json, {stem}.md"


NO_PLOT = "matplotlib is not installed (pip install -e .[plot]): no plot"


def pyplot():
    """matplotlib.pyplot drawing to files, or None without matplotlib (an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def sweep_figure(plt, rows):
    """The depth sweeps side by side: peak memory and step time as a ratio to eager against
    depth, one line per method and sweep (chain solid, affine dotted), depths as integers."""
    from matplotlib.ticker import LogFormatter

    sweep = [r for r in rows if r.get("kind") in ("chain", "affine") and "error" not in r]
    depths = sorted({r["depth"] for r in sweep})
    fig, (memory, time) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    colors = {}
    for kind, method in dict.fromkeys((r["kind"], r["method"]) for r in sweep):
        line = [r for r in sweep if (r["kind"], r["method"]) == (kind, method)]
        style = dict(marker="o", color=colors.setdefault(method, f"C{len(colors)}"),
                     linestyle="-" if kind == "chain" else ":",
                     label=method if kind == "chain" else f"{method} (affine)")
        for ax, field, unit in ((memory, "peak_bytes", 2**20), (time, "time_ratio", 1)):
            points = sorted((r["depth"], r[field] / unit) for r in line if field in r)
            if points:
                ax.plot(*zip(*points), **style)
    memory.set(xlabel="depth (reversible blocks)", ylabel="peak step memory (MiB)", yscale="log",
               title="Peak memory of one training step")
    time.set(xlabel="depth (reversible blocks)", ylabel="step time (x eager)", title="Step time relative to eager")
    memory.set_xscale("log")  # shared: both panels
    for set_formatter in (memory.yaxis.set_major_formatter, memory.yaxis.set_minor_formatter):
        set_formatter(LogFormatter(labelOnlyBase=False))  # 20, 50, 200, not 2x10^1
    memory.set_xticks(depths, [str(d) for d in depths])
    memory.set_xticks([], minor=True)
    memory.legend()
    fig.tight_layout()
    return fig


def plot(rows, path):
    """Write the depth sweeps' figure (:func:`sweep_figure`) to ``path``. Returns a message."""
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    fig = sweep_figure(plt, rows)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"


INFERENCE_COLUMNS = ("workload", "method", "forward ms", "x eager")


def inference_cells(r):
    if "error" in r:
        return [r["workload"], r["method"], f"error: {r['error']}", ""]
    return [r["workload"], r["method"], f"{r['forward_seconds'] * 1e3:.1f}", f"{r.get('time_ratio', math.nan):.2f}"]


def inference_table(rows):
    """The inference rows as a fixed-width text table."""
    return text_table(INFERENCE_COLUMNS, [inference_cells(r) for r in rows])


def read_checks(rows):
    """A line per reversible row: the time its backward spent in the read check, per step."""
    return [f"{r['workload']}: {r['check_seconds'] * 1e3:.2f} ms a step, {r['check_seconds'] / r['step_seconds']:.1%} "
            f"of it" for r in rows if "check_seconds" in r]


def save(rows, meta, stem, inference=()):
    """Write ``stem``.json, ``stem``.md and ``stem``.png of the training ``rows`` and the
    ``inference`` rows; return the paths written, as messages."""
    header = f"# python -m bench ({meta['device']}, {meta['date']})\n\nMemory: {meta['memory_method']}.\n\n"
    checks = "\n".join(f"- {line}" for line in read_checks(rows))
    markdown = header + markdown_table(COLUMNS, [cells(r) for r in rows]) + "\n"
    if checks:
        markdown += f"\nBackward's read check (revtriton; host time):\n\n{checks}\n"
    if inference:
        markdown += (f"\nInference: a forward without grad in eval mode; compiled: torch.compile(fullgraph=True) of "
                     f"the reversible model.\n\n{markdown_table(INFERENCE_COLUMNS, [inference_cells(r) for r in inference])}\n")
    return [write(stem, meta, rows, markdown, inference=list(inference)), plot(rows, f"{stem}.png")]
