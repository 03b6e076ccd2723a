"""``python -m bench compiled``: every kernel launch a chain or op can make, compiled ahead of time
for GPU targets on this machine (no GPU needed), and what the compiled code shows.

The launches are captured from the real launchers of :mod:`revtriton.kernels`, called on CPU
tensors of each dtype and layout a chain or a direct op call gives them, with the launch itself
replaced by a record. Each record is compiled through the JIT's own argument specialisation
(``create_function_from_signature`` and ``_pack_args`` of ``triton.runtime.jit``), so the
signature, constexprs and alignment attributes are the ones a real launch would compile, and
``triton.compile`` runs the whole pipeline (PTX and cubin; AMD code for gfx942).

Per launch and target it reports instructions (PTX or AMD GCN lines that are instructions),
registers and spilled bytes (``ptxas -v``; the AMD code's metadata), 128-bit global loads and
stores (``ld.global.v4``/``st.global.v4`` and their 64-bit-element ``.v2`` equivalents in
fp64; ``global_load_dwordx4`` on AMD) and 64-bit integer divisions. Needs ``TRITON_INTERPRET``
unset or 0: the interpreter's kernels cannot be compiled.
"""
import contextlib
import datetime
import functools
import io
import os
import re
from concurrent.futures import ProcessPoolExecutor

import torch

from . import report

TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32), "sm_100": ("cuda", 100, 32),
           "gfx942": ("hip", "gfx942", 64)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# (stream dtype, dtype of what F, G, s and t return): autocast gives an fp32 stream bf16 operands
PRECISIONS = {name: (dtype, dtype) for name, dtype in DTYPES.items()} | {"fp32+bf16": (torch.float32, torch.bfloat16)}
# (shape of a chain's input, the dim it splits, whose halves the kernels get): a chain's stream
# keeps the halves as one contiguous (2, ...) buffer; an op called directly may get x's halves
LAYOUTS = {
    "long": ((8, 64, 16, 16), 1, "stream"),  # NCHW: rows of 8192 elements, a multiple of every block
    "odd": ((3, 10, 5, 7), 1, "stream"),  # rows of 175: the tail of each block is masked
    "strided": ((8, 64, 16, 16), 1, "x"),  # the halves of x itself: rows of 8192, a row stride of 16384
    "short": ((4096, 2), 1, "x"),  # the halves of an (N, 2) tensor: rows of one element, stride 2
    "inner": ((64, 8, 4), 2, "x"),  # the halves of x split after dim 1: rows of 2, 4 apart, 8 rows a sample
}


def _operands(layout, precision):
    """``(halves, out, samples)``: ``halves()`` gives two halves as the kernels get them in
    ``layout``, ``out()`` a tensor like F's output, and ``samples`` a log-determinant per sample."""
    (shape, dim, source), (dtype, out_dtype) = LAYOUTS[layout], PRECISIONS[precision]
    half = list(shape)
    half[dim] //= 2

    def halves():
        if source == "x":
            x = torch.zeros(shape, dtype=dtype)
            return x.narrow(dim, 0, half[dim]), x.narrow(dim, half[dim], half[dim])
        return tuple(torch.zeros(2, *half, dtype=dtype))

    def out(dtype=out_dtype):
        return torch.zeros(half, dtype=dtype)

    return halves, out, torch.zeros(shape[0], dtype=torch.promote_types(dtype, torch.float32))


def launches(layout, precision):
    """``{name: thunk}``: each thunk makes one launcher call the way a chain or op makes it."""
    from revtriton import kernels as k

    halves, out, samples = _operands(layout, precision)
    dtype = PRECISIONS[precision][0]
    ld_grad = samples.new_ones(()).expand(samples.shape)  # autograd hands in an expanded gradient
    return {
        "add_": lambda: k.add_(halves()[0], out()),
        "sub_": lambda: k.sub_(halves()[0], out()),
        "sub_add_": lambda: k.sub_add_(halves()[1], out(), halves()[0], out(dtype)),
        "affine_forward_": lambda: k.affine_forward_(halves()[1], out(), out(), None, 2.0),
        "affine_forward_ld": lambda: k.affine_forward_(halves()[1], out(), out(), samples, 2.0),
        "affine_inverse_": lambda: k.affine_inverse_(halves()[1], out(), out(), 2.0),
        "affine_backward_": lambda: k.affine_backward_(halves()[1], halves()[1], out(), out(), out(), None, 2.0),
        "affine_backward_ld": lambda: k.affine_backward_(halves()[1], halves()[1], out(), out(), out(), ld_grad, 2.0),
        "affine_inverse_backward_": lambda: k.affine_inverse_backward_(halves()[1], halves()[1], out(), out(), None,
                                                                       2.0),
        "affine_inverse_backward_ld": lambda: k.affine_inverse_backward_(halves()[1], halves()[1], out(), out(),
                                                                         ld_grad, 2.0),
        "momentum_forward_": lambda: k.momentum_forward_(*halves(), out(), 0.9),
        "momentum_inverse_": lambda: k.momentum_inverse_(halves()[1], out(), 0.9),
        "momentum_backward_x_": lambda: k.momentum_backward_x_(*halves(), *halves(), 0.9),
        "momentum_backward_v_": lambda: k.momentum_backward_v_(halves()[1], out(), halves()[0], out(dtype),
                                                               halves()[1], 0.9),
        "momentum_inverse_backward_": lambda: k.momentum_inverse_backward_(halves()[0], out(dtype), halves()[1],
                                                                           0.9),
    }


@contextlib.contextmanager
def _recorded(records):
    """Within the block, a kernel launch appends ``(kernel, args, kwargs)`` to ``records`` instead."""
    from triton.runtime.jit import JITFunction

    run = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: records.append((self, args, kwargs))
    try:
        yield
    finally:
        JITFunction.run = run


@functools.cache
def captured(layouts=tuple(LAYOUTS), precisions=tuple(PRECISIONS)):
    """``[(case, kernel, args, kwargs)]`` for every launcher call of every layout and precision;
    ``case`` is ``{"launch", "layout", "precision"}``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("python -m bench compiled compiles kernels for GPUs: unset TRITON_INTERPRET "
                           "(the interpreter's kernels cannot be compiled)")
    found = []
    for layout in layouts:
        for precision in precisions:
            for name, thunk in launches(layout, precision).items():
                records = []
                with _recorded(records):
                    thunk()
                (launch,) = records
                found.append(({"launch": name, "layout": layout, "precision": precision}, *launch))
    return found


def _source(kernel, args, kwargs, backend):
    """``(ASTSource, options)`` as ``JITFunction.run`` would build them for this launch."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


INSTRUCTION = re.compile(r"^\s+(@!?%\w+\s+)?[a-z_][\w.]*[\s;]", re.M)


def _ptxas_log(backend, ptx, options):
    """What ``ptxas -v`` says of ``ptx``, run by the backend exactly as its compile runs it."""
    from triton import knobs

    out = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(out):
        knobs.nvidia.dump_ptxas_log = True
        backend.make_cubin(ptx, {}, options, backend.target.arch)
    return out.getvalue()


def _ptx_figures(ptx, log):
    """Counts read off PTX, and registers and spills off the ptxas log."""
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {
        "instructions": len(INSTRUCTION.findall(ptx)),
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill_bytes": sum(spills),
        "wide_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32|ld\.global(?:\.\w+)*\.v2\.b64", ptx)),
        "wide_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32|st\.global(?:\.\w+)*\.v2\.b64", ptx)),
        "narrow_loads": len(re.findall(r"ld\.global(?!(?:\.\w+)*\.v[24]\.b)", ptx)),
        "narrow_stores": len(re.findall(r"st\.global(?!(?:\.\w+)*\.v[24]\.b)", ptx)),
        "div64": len(re.findall(r"\b(?:div|rem)\.[su]64", ptx)),
        "atomics": re.findall(r"\b(?:atom|red)\.[\w.]+", ptx),
    }


def _amd_figures(asm):
    """Counts read off AMD GCN assembly and its metadata."""
    def meta(key):
        return int(re.search(rf"\.{key}:\s+(\d+)", asm).group(1))

    body = asm.split(".end_amdhsa_kernel")[0]
    return {
        "instructions": len(re.findall(r"^\s+[sv]_\w+|^\s+(?:global|buffer|flat)_\w+", body, re.M)),
        "registers": meta("vgpr_count"),
        "spill_bytes": 4 * (meta("vgpr_spill_count") + meta("sgpr_spill_count")),
        "wide_loads": len(re.findall(r"(?:global|buffer)_load_dwordx4", body)),
        "wide_stores": len(re.findall(r"(?:global|buffer)_store_dwordx4", body)),
        "div64": None,
        "atomics": re.findall(r"(?:global|buffer)_atomic_\w+", body),
    }


def compile_one(launch, target_name):
    """Figures of one captured launch ``(case, kernel, args, kwargs)`` compiled for ``target_name``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    case, kernel, args, kwargs = launch
    target = GPUTarget(*TARGETS[target_name])
    backend = make_backend(target)
    source, options = _source(kernel, args, kwargs, backend)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    if target.backend == "cuda":
        ptx = compiled.asm["ptx"]
        figures = _ptx_figures(ptx, _ptxas_log(backend, ptx, options))
    else:
        figures = _amd_figures(compiled.asm["amdgcn"])
    return {**case, "kernel": kernel.__name__, "target": target_name, "num_warps": options.num_warps,
            "signature": dict(source.signature),
            "constexprs": {str(kernel.arg_names[path[0]]): str(v) for path, v in source.constants.items()},
            **figures}


def _compile_indexed(job):
    layouts, index, target_name = job
    return compile_one(captured(layouts)[index], target_name)


def _key(launch, target_name):
    """What makes two launches compile to the same code for ``target_name``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    _, kernel, args, kwargs = launch
    source, options = _source(kernel, args, kwargs, make_backend(GPUTarget(*TARGETS[target_name])))
    return target_name, kernel.__name__, str(source.signature), str(source.constants), str(source.attrs), \
        options.num_warps


def compile_all(targets, layouts=tuple(LAYOUTS), workers=os.cpu_count()):
    """One row of figures per captured launch (of ``layouts``, every precision) and target;
    launches that compile to the same code are compiled once, in parallel (forked) processes."""
    layouts = tuple(layouts)
    launches = captured(layouts)  # captured once, before the fork
    jobs = {}
    for target in targets:
        for i, launch in enumerate(launches):
            jobs.setdefault(_key(launch, target), (layouts, i, target))
    with ProcessPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
        figures = dict(zip(jobs, pool.map(_compile_indexed, jobs.values())))
    return [{**launches[i][0], **{k: v for k, v in figures[_key(launches[i], t)].items() if k not in launches[i][0]},
             "target": t} for t in targets for i in range(len(launches))]


COLUMNS = ("target", "launch", "layout", "precision", "instructions", "registers", "spill_bytes", "wide_loads",
           "wide_stores", "div64")


def main(targets, layouts, out_dir):
    """Compile every launch of ``layouts`` for ``targets``, print the table and write it to
    ``out_dir`` as JSON and Markdown (``compiled-DATE.*``); raises if any launch fails to compile."""
    import triton

    rows = compile_all(targets, layouts)
    lines = [[str(r[c]) for c in COLUMNS] for r in rows]
    print(report.text_table(COLUMNS, lines))
    date = datetime.date.today().isoformat()
    meta = {"triton": triton.__version__, "targets": list(targets), "layouts": list(layouts), "date": date}
    markdown = (f"# python -m bench compiled (triton {meta['triton']}, {date})\n\nPTX instructions, registers and "
                f"spilled bytes (ptxas -v), 128-bit global loads and stores and 64-bit integer divisions of each "
                f"kernel launch (bench/compiled.py).\n\n{report.markdown_table(COLUMNS, lines)}\n")
    print(report.write(os.path.join(out_dir, f"compiled-{date}"), meta, rows, markdown))
    return rows
