"""``python -m bench``: end to end on a tiny workload (the plain PyTorch CPU path, as users run it),
the kernel benchmark's cases, the plot and ``--build-only``."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from bench import __main__ as cli
from bench import graphs, kernels, report, suite
from bench.measure import interleaved_seconds, run
from bench.workloads import as_method, build, build_reversible, by_method, label
from revtriton import saved_activation_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_tiny_suite_writes_every_field_finite_and_positive(tmp_path):
    proc = bench("--preset", "tiny", "--steps", "2", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "memory:" in proc.stdout and "chain depth 4" in proc.stdout
    (result,) = tmp_path.glob("cpu-tiny-*.json")
    data = json.loads(result.read_text())
    assert {"device", "date", "memory_method", "preset", "torch"} <= data["meta"].keys()
    assert {(r["workload"], r["method"]) for r in data["rows"]} >= {
        ("chain depth 2", "eager"), ("chain depth 4", "checkpoint"), ("transformer 2x32", "revtriton"),
        ("encoder-decoder 2x32", "checkpoint"), ("encoder-decoder 2x32", "revtriton")}
    for row in data["rows"]:
        assert "error" not in row, row
        fields = ("peak_bytes", "step_seconds", "peak_ratio", "time_ratio")
        for field in fields + (("check_seconds",) if row["method"] == "revtriton" else ()):
            assert math.isfinite(row[field]) and row[field] > 0, (row["workload"], row["method"], field)
        assert row["method"] == "revtriton" or "check_seconds" not in row
    markdown = (tmp_path / result.name.replace(".json", ".md")).read_text()
    assert markdown.count("|") > 20 and "- encoder-decoder 2x32: " in markdown  # the read check's time
    # inference: eager, reversible and compiled whole, for the chain and the transformer
    assert {(r["workload"], r["method"]) for r in data["inference"]} == {
        (w, m) for w in ("chain depth 4", "transformer 2x32") for m in ("eager", "revtriton", "compiled")}
    for row in data["inference"]:
        assert math.isfinite(row["forward_seconds"]) and row["forward_seconds"] > 0 and row["time_ratio"] > 0, row
    assert "| transformer 2x32 | compiled |" in markdown


def test_missing_peer_is_reported_in_its_row_and_the_others_still_run(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "memcnn" else find_spec(name))
    workload = dict(kind="chain", depth=2, batch=2, channels=4, size=4)
    rows = run(workload, ["eager", "memcnn", "revtriton"], torch.device("cpu"), steps=2)
    assert "memcnn is not installed" in rows["memcnn"]["error"]
    for method in ("eager", "revtriton"):
        assert rows[method]["peak_bytes"] > 0 and rows[method]["step_seconds"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernels job measures for real")
def test_kernels_job_says_why_it_measures_nothing_on_cpu(tmp_path):
    proc = bench("kernels", tmp_path=tmp_path)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout


def test_bad_arguments_are_refused(tmp_path):
    proc = bench("--steps", "0", tmp_path=tmp_path)
    assert proc.returncode == 2 and "0 is not a positive integer" in proc.stderr


def test_a_method_that_fails_is_reported_in_its_row_and_the_others_are_timed(monkeypatch):
    from bench import measure

    real_build = measure.build

    def build(workload, method):
        if method == "checkpoint":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real_build(workload, method)

    monkeypatch.setattr(measure, "build", build)
    workload = dict(kind="chain", depth=2, batch=2, channels=4, size=4)
    times = measure.step_seconds(workload, ["eager", "checkpoint", "revtriton"], torch.device("cpu"), steps=3)
    assert times["checkpoint"] == {"error": "out of memory: CUDA out of memory. Tried to allocate 2 GiB"}
    assert list(times) == ["eager", "checkpoint", "revtriton"]
    assert all(times[m]["step_seconds"] > 0 for m in ("eager", "revtriton"))


# python -m bench kernels: the case table, on CPU (the fused ops through Triton's interpreter)

CASE_IDS = [case.name for case in kernels.CASES]


@pytest.mark.parametrize("dtype", list(kernels.DTYPES.values()), ids=list(kernels.DTYPES))
@pytest.mark.parametrize("case", kernels.CASES, ids=CASE_IDS)
def test_each_kernel_case_and_its_eager_equivalent_compute_the_same_values(case, dtype):
    fused, eager = kernels.outcomes(case, 4 * 8192, dtype, "cpu", samples=4)
    assert len(fused) == len(case.writes)
    torch.testing.assert_close(fused, eager)  # bf16: the interpreter truncates, so up to one ulp


def _after(op, tensors):
    copies = [t.clone() for t in tensors]
    op(*copies)
    return copies


@pytest.mark.parametrize("dtype", list(kernels.DTYPES.values()), ids=list(kernels.DTYPES))
@pytest.mark.parametrize("case", kernels.CASES, ids=CASE_IDS)
def test_each_kernel_case_counts_the_bytes_its_op_reads_plus_writes(case, dtype):
    n, samples = 4 * 256, 4
    tensors = kernels.inputs(case, n, dtype, "cpu", samples)
    after = _after(case.fused, tensors)
    written = [i for i, (t, a) in enumerate(zip(tensors, after)) if not torch.equal(t, a)]
    read = [i for i in range(len(tensors))  # changing its value changes what the op writes
            if any(not torch.equal(a[j], after[j])
                   for a in [_after(case.fused, [t + 1 if k == i else t for k, t in enumerate(tensors)])]
                   for j in written)]
    assert ({case.args[i] for i in read}, {case.args[i] for i in written}) == (set(case.reads), set(case.writes))
    observed = sum(tensors[i].nbytes for i in read) + sum(tensors[i].nbytes for i in written)
    assert kernels.moved_bytes(case, n, dtype, samples) == observed


@pytest.mark.parametrize("case", kernels.CASES, ids=CASE_IDS)
def test_each_kernel_case_stays_finite_over_twice_the_calls_of_a_timed_loop(case):
    calls = 2 * kernels.FULL.calls  # a loop's calls on one set, twice over (a loop spreads them over 2 sets or more)
    for dtype in kernels.DTYPES.values():
        tensors = kernels.inputs(case, 2**16, dtype, "cpu")
        for _ in range(calls):
            case.eager(*tensors)  # the fused op's values (see above), without the interpreter's slowness
        assert all(t.isfinite().all() for t in tensors), (case.name, dtype)


def test_kernel_inputs_refuse_a_size_that_does_not_split_into_samples():
    with pytest.raises(ValueError, match="n=100 elements; expected a multiple of samples=64"):
        kernels.inputs(kernels.CASES[0], 100, torch.float32, "cpu")


def test_kernel_cases_include_the_backward_of_the_inverse():
    names = {case.name for case in kernels.CASES}
    assert {"affine_inverse_backward", "affine_inverse_backward ld_grad", "momentum_inverse_backward"} <= names


@pytest.mark.parametrize("set_bytes, l2, sets", [(96 << 20, 50 << 20, 3), (64 << 20, 50 << 20, 3),
                                                 (4 << 30, 50 << 20, 2), (2 << 20, 50 << 20, 51), (100, 0, 2)])
def test_a_timed_loop_rotates_through_enough_sets_that_l2_holds_none_of_the_next_calls_operands(set_bytes, l2, sets):
    assert kernels.working_sets(set_bytes, l2) == sets
    assert (sets - 1) * set_bytes >= kernels.L2_FACTOR * l2  # touched between two uses of one set
    assert sets == 2 or (sets - 2) * set_bytes < kernels.L2_FACTOR * l2  # and no more sets than that takes


def test_a_timed_loop_has_the_same_bytes_at_every_size_down_to_a_tenth_of_its_calls():
    assert [kernels.FULL.calls_for(n) for n in kernels.FULL.elements] == [50, 12, 5]
    assert kernels.TINY.calls_for(kernels.TINY.elements[0]) == kernels.TINY.calls


def test_timed_reports_device_and_host_time_per_call_and_finiteness_on_fresh_sets_each_loop():
    made = []

    def make_sets():
        made.append([(torch.zeros(4), torch.ones(4)) for _ in range(2)])
        return made[-1]

    result = kernels.timed(torch.Tensor.add_, make_sets, 6, 3, kernels.Clock(torch.device("cpu")))
    assert len(made) == 4  # the warm-up's, then one per loop
    assert [a.tolist() for a, _ in made[0]] == [[4.0] * 4, [3.0] * 4]  # one call, then 6 alternating
    assert [a.tolist() for a, _ in made[-1]] == [[3.0] * 4] * 2  # 6 calls, 3 on each set
    assert result["seconds"] > 0 and result["host_seconds"] > 0 and result["queued"] and result["finite"]
    overflow = kernels.timed(torch.Tensor.mul_, lambda: [(torch.full((4,), 1e30), torch.full((4,), 1e30))], 2, 2,
                             kernels.Clock(torch.device("cpu")))
    assert not overflow["finite"]


def _result(seconds, host_seconds, queued=True, finite=True):
    return {"seconds": seconds, "host_seconds": host_seconds, "queued": queued, "finite": finite}


def test_kernel_results_are_written_as_json_and_markdown_named_by_device_kind_and_date(tmp_path):
    meta = report.meta(torch.device("cpu"), kind="cuda", copy_gbs=4000.0, loops=3, copy_elements=2**28,
                       l2_bytes=50 << 20)
    case = kernels.CASES[2]  # coupling_backward: reads 4 tensors, writes 2
    rows = [kernels.row(case, 2**24, "bf16", {"fused": _result(1e-4, 2e-5), "eager": _result(2e-4, 3e-5, False)},
                        meta["copy_gbs"], 3, 50)]
    assert rows[0]["bytes"] == 6 * 2**24 * 2
    assert (rows[0]["fused_gbs"], rows[0]["eager_of_copy"], rows[0]["time_ratio"]) == pytest.approx(
        (6 * 2**25 / 1e-4 / 1e9, 6 * 2**25 / 2e-4 / 1e9 / 4000, 0.5))
    assert kernels.save(rows, meta, str(tmp_path)) == (f"results: {tmp_path}/kernels-cuda-{meta['date']}.json, "
                                                       f"{tmp_path}/kernels-cuda-{meta['date']}.md")
    saved = json.loads((tmp_path / f"kernels-cuda-{meta['date']}.json").read_text())
    assert saved == {"meta": meta, "rows": rows}
    table = (tmp_path / f"kernels-cuda-{meta['date']}.md").read_text().splitlines()
    assert table[-1] == ("| coupling_backward | bf16 | 2^24 | 192 | 3 | 50 | 100 | 20.0 | 2013 | 50% | 200* | 30.0 | "
                         "1007 | 25% | 0.50 | yes |")
    assert "L2: 50 MiB" in table[2] and "sleep kernel" in table[2]


def test_kernels_job_writes_a_tiny_smoke_run_with_every_case_finite(tmp_path):
    proc = bench("kernels", "--preset", "tiny", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("kernels-*.json")  # kernels-cpu-DATE here, kernels-cuda-DATE on a GPU
    data = json.loads(result.read_text())
    assert {(r["op"], r["dtype"]) for r in data["rows"]} == {(c.name, d) for c in kernels.CASES for d in kernels.DTYPES}
    for r in data["rows"]:
        assert r["fused_finite"] and r["eager_finite"] and r["sets"] >= 2, r
        for field in ("fused_seconds", "fused_host_seconds", "eager_seconds", "eager_host_seconds", "fused_gbs"):
            assert math.isfinite(r[field]) and r[field] > 0, (r["op"], field)
    assert "| momentum_inverse_backward | bf16 |" in (tmp_path / result.name.replace(".json", ".md")).read_text()


def test_kernels_job_keeps_the_rows_it_measured_when_stopped(tmp_path, monkeypatch):
    timed = kernels.timed
    results = []

    def stopping(*args):
        if len(results) == 5:  # the copy's, then two rows of both variants
            raise KeyboardInterrupt  # as a time limit would stop it
        results.append(timed(*args))
        return results[-1]

    monkeypatch.setattr(kernels, "timed", stopping)
    monkeypatch.setattr(kernels, "CHECK_ELEMENTS", kernels.SAMPLES * 16)
    with pytest.raises(KeyboardInterrupt):
        kernels.main(str(tmp_path), tiny=True)
    (result,) = tmp_path.glob("kernels-*.json")
    assert [r["op"] for r in json.loads(result.read_text())["rows"]] == [c.name for c in kernels.CASES[:2]]


# the plot

def _sweep_rows():
    rows = []
    for kind, methods in (("chain", ("eager", "checkpoint", "revtriton")), ("affine", ("eager", "revtriton"))):
        for depth in (4, 16, 64):
            for i, method in enumerate(methods):
                rows.append(dict(workload=f"{kind} depth {depth}", kind=kind, depth=depth, method=method,
                                 peak_bytes=(depth if method == "eager" else 2) * 2**20, time_ratio=1 + 0.2 * i))
    return rows + [dict(workload="revnet38", kind="cifar", method="eager", peak_bytes=2**20, time_ratio=1.0)]


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "sweep.png"
    assert report.plot(_sweep_rows(), str(path)) == f"plot: {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_shows_memory_and_time_ratio_against_depths_labelled_as_integers():
    plt = report.pyplot()
    fig = report.sweep_figure(plt, _sweep_rows())
    try:
        fig.canvas.draw()
        memory, time = fig.axes
        for ax in (memory, time):
            assert [label.get_text() for label in ax.get_xticklabels()] == ["4", "16", "64"]
            assert ax.get_xticklabels(minor=True) == []
            assert {(line.get_label(), line.get_linestyle()) for line in ax.lines} == {
                ("eager", "-"), ("checkpoint", "-"), ("revtriton", "-"), ("eager (affine)", ":"),
                ("revtriton (affine)", ":")}
        assert (memory.get_ylabel(), time.get_ylabel()) == ("peak step memory (MiB)", "step time (x eager)")
        memory_ticks = [label.get_text() for minor in (False, True) for label in memory.get_yticklabels(minor=minor)]
        assert "20" in memory_ticks and all(re.fullmatch(r"[0-9.]*", text) for text in memory_ticks), memory_ticks
        (revtriton,) = [line for line in time.lines if line.get_label() == "revtriton"]
        assert list(revtriton.get_xdata()) == [4, 16, 64] and list(revtriton.get_ydata()) == [1.4, 1.4, 1.4]
        (eager,) = [line for line in memory.lines if line.get_label() == "eager"]
        assert list(eager.get_ydata()) == [4, 16, 64]
    finally:
        plt.close(fig)


# --build-only

def test_build_only_prints_each_model_of_the_preset_and_measures_nothing(tmp_path):
    proc = bench("--preset", "tiny", "--build-only", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = []
    for workload, methods in suite.plan("tiny", peers=False):
        for method in methods:
            model, x = build(workload, method)[:2]
            expected.append(f"{label(workload)}  {method}: {sum(p.numel() for p in model.parameters()):,} "
                            f"parameters, input {tuple(x.shape)}")
    assert proc.stdout.splitlines() == expected
    assert not list(tmp_path.iterdir())


def test_build_only_names_every_failure_and_exits_non_zero_after_trying_all(monkeypatch, capsys):
    real_by_method, real_build = suite.by_method, suite.build_reversible

    def by_method(workload, model, method):
        if method == "checkpoint":
            raise RuntimeError("no checkpoint today")
        return real_by_method(workload, model, method)

    def build_reversible(workload):
        if workload["kind"] == "transformer":
            raise torch.OutOfMemoryError("CPU out of memory")
        return real_build(workload)

    monkeypatch.setattr(suite, "by_method", by_method)
    monkeypatch.setattr(suite, "build_reversible", build_reversible)
    with pytest.raises(SystemExit, match=r"7 \(workload, method\) failed to build"):
        cli.main(["--preset", "tiny", "--build-only"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 19
    assert "chain depth 4  checkpoint: FAILED RuntimeError: no checkpoint today" in lines
    assert "transformer 2x32  eager: FAILED out of memory: CPU out of memory" in lines
    assert any(line.startswith("chain depth 4  revtriton: ") and "parameters" in line for line in lines)


def test_as_method_switches_one_model_between_methods_as_if_built_for_each():
    workload = dict(kind="chain", depth=3, batch=2, channels=4, size=4)
    model, x = build_reversible(workload)[:2]
    saved = {}
    for method in ("checkpoint", "revtriton", "eager", "checkpoint", "eager", "revtriton"):
        fresh, fresh_x = build(workload, method)[:2]
        got = saved_activation_bytes(as_method(model, method), x.detach().requires_grad_())[1]
        saved[method] = saved_activation_bytes(fresh, fresh_x.requires_grad_())[1]
        assert got == saved[method], method
    assert len(set(saved.values())) == 3


def test_by_method_refuses_an_unknown_method_and_a_peer_on_a_workload_it_cannot_wrap():
    workload = dict(kind="affine", depth=2, batch=2, channels=4, size=4)
    model = build_reversible(workload)[0]
    with pytest.raises(ValueError, match="method='fast'; expected one of eager, checkpoint, revtriton, memcnn, revlib"):
        by_method(workload, model, "fast")
    with pytest.raises(ValueError, match="method='revlib' for a workload of kind 'affine'; expected kind 'chain'"):
        by_method(workload, model, "revlib")


def test_build_only_goes_with_the_suite_only(tmp_path):
    proc = bench("kernels", "--build-only", tmp_path=tmp_path)
    assert proc.returncode == 2 and "--build-only goes with the suite and graphs jobs, not 'kernels'" in proc.stderr



def test_ratios_are_each_method_over_the_eager_row_of_its_workload():
    rows = [
        dict(workload="a", method="revtriton", peak_bytes=100, step_seconds=0.375),
        dict(workload="a", method="eager", peak_bytes=400, step_seconds=0.25),
        dict(workload="b", method="eager", peak_bytes=50, step_seconds=1.0),
        dict(workload="b", method="checkpoint", peak_bytes=25, step_seconds=1.5),
        dict(workload="b", method="memcnn", error="memcnn is not installed"),
        dict(workload="c", method="revtriton", peak_bytes=10, step_seconds=0.1),  # no eager row
        dict(workload="d", method="eager", error="out of memory"),
        dict(workload="d", method="revtriton", peak_bytes=10, step_seconds=0.1),  # eager failed
    ]
    assert report.add_ratios(rows) is rows
    ratios = {(r["workload"], r["method"]): (r.get("peak_ratio"), r.get("time_ratio")) for r in rows}
    assert ratios == {
        ("a", "revtriton"): (0.25, 1.5), ("a", "eager"): (1.0, 1.0),  # less memory, more time: < 1, > 1
        ("b", "eager"): (1.0, 1.0), ("b", "checkpoint"): (0.5, 1.5), ("b", "memcnn"): (None, None),
        ("c", "revtriton"): (None, None), ("d", "eager"): (None, None), ("d", "revtriton"): (None, None)}


def test_the_overhead_row_reports_microseconds_per_block():
    rows = report.add_ratios([
        {"workload": "overhead depth 64", "kind": "overhead", "depth": 64, "method": "eager", "peak_bytes": 2,
         "step_seconds": 0.0064},
        {"workload": "overhead depth 64", "kind": "overhead", "depth": 64, "method": "revtriton", "peak_bytes": 1,
         "step_seconds": 0.0128}])
    assert [report.cells(r)[-2:] for r in rows] == [["1.00", "100"], ["2.00", "200"]]


def test_host_job_writes_finite_positive_host_times_of_every_op(tmp_path):
    proc = bench("host", "--preset", "tiny", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("host-cpu-*.json")
    data = json.loads(result.read_text())
    assert {"device", "date", "torch", "triton", "calls", "rounds"} <= data["meta"].keys()
    calls = {r["call"] for r in data["rows"]}
    names = {case.name for case in kernels.CASES}
    assert calls == names | {f"{name} (chain)" for name in names} | {"add_", "stub launcher alone"}
    for row in data["rows"]:
        assert "error" not in row, row
        for field in ("median_us", "p10_us", "p90_us", "ratio"):
            assert math.isfinite(row[field]) and row[field] > 0, (row["call"], field)
    markdown = (tmp_path / result.name.replace(".json", ".md")).read_text()
    assert "| coupling_forward |" in markdown and "| coupling_forward (chain) |" in markdown


# python -m bench graphs: CUDA only; on CPU its models, its uncaptured steps and its report

def test_graphs_job_builds_every_model_with_build_only_and_says_why_it_measures_nothing_on_cpu(tmp_path):
    proc = bench("graphs", "--build-only", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(graphs.WORKLOADS) * len(graphs.VARIANTS)
    assert all("parameters, input" in line and "FAILED" not in line for line in lines), lines
    assert "overhead depth 64  revtriton captured: " in proc.stdout
    if not torch.cuda.is_available():
        proc = bench("graphs", tmp_path=tmp_path)
        assert proc.returncode == 0 and "no CUDA device" in proc.stdout and not list(tmp_path.iterdir())


def test_graphs_rows_compare_each_captured_step_with_its_methods_uncaptured_one(tmp_path):
    workload = dict(kind="overhead", width=4, depth=2, batch=2)
    uncaptured = [v for v, (_, capture, _) in graphs.VARIANTS.items() if not capture]
    times = interleaved_seconds({v: graphs.maker(workload, v, torch.device("cpu")) for v in uncaptured},
                                torch.device("cpu"), 2)
    times["revtriton captured"] = {"seconds": times["revtriton"]["seconds"] / 4}
    times["eager captured"] = {"error": "RuntimeError: operation not permitted when stream is capturing"}
    rows = graphs.rows_of(workload, times)
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["revtriton captured"]["time_ratio"] == pytest.approx(0.25)
    assert by_variant["eager"]["time_ratio"] == 1 and by_variant["revtriton"]["step_seconds"] > 0
    assert "time_ratio" not in by_variant["eager captured"]
    meta = report.meta(torch.device("cpu"), kind="cuda", warmup=graphs.WARMUP)
    assert graphs.save(rows, meta, str(tmp_path)).startswith(f"results: {tmp_path}/graphs-cuda-{meta['date']}.json")
    markdown = (tmp_path / f"graphs-cuda-{meta['date']}.md").read_text()
    assert "| overhead depth 2 | eager captured | error: RuntimeError: operation not permitted" in markdown
    assert "| overhead depth 2 | revtriton captured |" in markdown
    assert json.loads((tmp_path / f"graphs-cuda-{meta['date']}.json").read_text())["rows"] == rows
