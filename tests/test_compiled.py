"""Every kernel launch a chain or op can make compiles ahead of time, on this CPU-only machine, for
CUDA sm_80, sm_90 and sm_100 and AMD gfx942, into the code a memory-bound kernel should be
(``python -m bench compiled``; the launches and figures are described in bench/compiled.py)."""
import itertools
import json
import os
import re
import subprocess
import sys

import pytest

from bench.compiled import LAYOUTS, PRECISIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTIGUOUS = ("long", "strided")  # rows of 8192 elements whose row strides are multiples of 16


# sm_90 (the GPU this project validates on) gets every layout; the other targets long and short rows
RUNS = {("sm_90",): tuple(LAYOUTS), ("sm_80", "sm_100", "gfx942"): ("long", "short")}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    found = []
    for targets, layouts in RUNS.items():
        out = tmp_path_factory.mktemp("compiled")
        args = [f"--target={t}" for t in targets] + [f"--layout={layout}" for layout in layouts]
        proc = subprocess.run([sys.executable, "-m", "bench", "compiled", *args, "--out", str(out)], cwd=ROOT,
                              env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (path,) = out.glob("compiled-*.json")
        found += json.loads(path.read_text())["rows"]
    return found


def test_every_launch_compiles_for_every_target(rows):
    from bench.compiled import launches

    expected = {(t, launch, layout, precision) for targets, layouts in RUNS.items()
                for t, layout, precision in itertools.product(targets, layouts, PRECISIONS)
                for launch in launches(layout, precision)}
    assert {(r["target"], r["launch"], r["layout"], r["precision"]) for r in rows} == expected
    assert len(rows) == len(expected) == 15 * 5 * (len(LAYOUTS) + 3 * 2)


# Spills a toolchain is known to make, and the most bytes each may spill: (triton version prefix,
# target, launch, layout, precision) -> bytes.
KNOWN_SPILLS = {
    # Triton 3.8's PTX for fp64 affine_forward_ld on rows of one element (8 rows a thread, 8 fp64
    # atomics) run through the ptxas it bundles (CUDA 12.9, --regAllocOptLevel=2) is held to 128
    # registers and spills one 32-bit value (4 bytes stored, 4 loaded). The same PTX through
    # ptxas 13.4 (triton 3.9's) takes 132 registers and no spill; triton 3.6's PTX through either
    # takes 122. The kernel's only cheap lever, issuing the atomics before the store, removes the
    # spill but doubles the registers of the short fp32/fp16/bf16 launches on triton 3.6 (58-64
    # to 127-128), the version the GPU machine runs: the toolchain's spill is the lesser cost.
    ("3.8.", "sm_90", "affine_forward_ld", "short", "fp64"): 8,
    # Triton 3.9's ptxas (13.x) gives the fp32 affine inverse on rows of 525 split into body and
    # tail (n_rows 1, 4 warps) an 8-byte stack frame at 48 registers: 4 bytes stored and loaded.
    # Which launch such a frame lands in moves with the toolchain and the code's order (tail
    # first: triton 3.6's sm_90 fp16/bf16 affine backward; an inverse formed with exp(-s_c):
    # triton 3.9's sm_80 bf16 inverse on rows of one element); this arrangement keeps triton 3.6,
    # the GPU machine's, and 3.8 free of it.
    ("3.9.", "sm_90", "affine_inverse_", "odd", "fp32"): 8,
}


def _allowed_spill(r, triton_version):
    return max([limit for (version, *case), limit in KNOWN_SPILLS.items() if triton_version.startswith(version)
                and case == [r["target"], r["launch"], r["layout"], r["precision"]]], default=0)


def test_no_kernel_spills_registers(rows):
    from importlib.metadata import version

    triton_version = version("triton")
    spilled = [(r["target"], r["launch"], r["layout"], r["precision"], r["spill_bytes"]) for r in rows
               if r["spill_bytes"] > _allowed_spill(r, triton_version)]
    assert not spilled, f"triton {triton_version}"


@pytest.mark.parametrize("target", ["sm_80", "sm_90", "sm_100"])
def test_contiguous_rows_move_128_bits_per_access(rows, target):
    """Every precision (an fp32 stream with bf16 operands too, as under autocast) loads and stores
    every element with 128-bit accesses; what is left is one value per row: ``ld_grad``."""
    for r in rows:
        if r["target"] == target and r["layout"] in CONTIGUOUS:
            name = (r["launch"], r["layout"], r["precision"])
            assert r["wide_loads"] > 0 and r["wide_stores"] > 0, name
            assert r["narrow_stores"] == 0, name
            assert r["narrow_loads"] == (1 if r["launch"].endswith("backward_ld") else 0), name


def test_amd_contiguous_fp32_rows_move_128_bits_per_access(rows):
    for r in rows:
        if r["target"] == "gfx942" and r["layout"] in CONTIGUOUS and r["precision"] == "fp32":
            assert r["wide_loads"] > 0 and r["wide_stores"] > 0, r["launch"]


def test_no_64_bit_integer_division(rows):
    """Finding a program's tile divides once per program in 32 bits; a row's sample needs no
    division where rows are samples (rows_per_sample == 1 compiles as a constant) and divides in
    32 bits where they are not: the "inner" layout (rows of 2, 8 rows a sample, 4 rows a thread)
    took four 64-bit divisions a thread before."""
    inner = {(r["launch"], r["signature"]["n_rows"], r["signature"]["rows_per_sample"]) for r in rows
             if r["layout"] == "inner" and r["launch"].endswith("_ld")}
    assert inner == {(name, "i32", "i32") for name in ("affine_forward_ld", "affine_backward_ld",
                                                       "affine_inverse_backward_ld")}
    assert [r for r in rows if r["div64"]] == []


def test_rows_of_odd_length_move_their_body_128_bits_per_access(rows):
    """Rows of 175 or 525 elements (the "odd" layout): where one tensor's rows start 16-byte
    aligned (a chain's halves addressed as one row), its loads of each row's body, all but the
    last 15 elements at most, are 128 bits wide and only the tail is masked element by element.
    Rows 175 elements apart (the per-sample rows of the log-determinant launches) cannot start
    aligned: those stay scalar, with no split (the kernel compiles as for one part)."""
    odd = [r for r in rows if r["target"] == "sm_90" and r["layout"] == "odd"]
    assert len(odd) == 15 * 5
    for r in odd:
        name = (r["launch"], r["precision"])
        if r["launch"].endswith("_ld"):
            assert r["wide_loads"] == 0 and r["constexprs"]["PARTS"] == "1", name
        else:
            assert r["wide_loads"] > 0 and r["constexprs"]["PARTS"] == "2", name


def test_the_log_det_adds_one_relaxed_atomic_per_program_on_long_rows(rows):
    for r in rows:
        if r["target"] == "sm_90" and r["launch"] == "affine_forward_ld" and r["layout"] in CONTIGUOUS:
            bits = 64 if r["precision"] == "fp64" else 32
            (atomic,) = r["atomics"]  # triton 3.9 emits red (no result), 3.6 atom
            assert re.fullmatch(rf"(red|atom)\.global\.gpu\.relaxed\.add\.f{bits}", atomic), atomic
        else:
            assert r["atomics"] == [] or r["launch"] == "affine_forward_ld", (r["launch"], r["atomics"])


def test_one_compiled_kernel_serves_every_scale_momentum_and_sign(rows):
    """``clamp``, ``beta`` and the sign of ``add_``/``sub_`` are runtime fp64 arguments: the launchers
    choose only the dtype, the tile (and whether its rows split into body and tail) and the affine
    direction at compile time."""
    specialised = {"n_rows", "n_cols", "rows_per_sample"}  # by Triton: ints equal to 1, pointers that are None
    chosen = {name for r in rows for name in r["constexprs"]
              if name not in specialised and not name.endswith(("_stride", "_ptr"))}
    assert chosen == {"ACC", "BLOCK_R", "BLOCK_C", "INVERSE", "PARTS"}
    scalars = {(name, r["signature"][name]) for r in rows for name in ("sign", "clamp", "beta") if name in r["signature"]}
    assert scalars == {("sign", "fp64"), ("clamp", "fp64"), ("beta", "fp64")}  # exact in fp64 kernels
    for r in rows:
        if r["launch"] == "sub_":
            (twin,) = [a for a in rows if a["launch"] == "add_" and
                       all(a[k] == r[k] for k in ("target", "layout", "precision"))]
            assert twin["constexprs"] == r["constexprs"]
