"""``python -m bench`` end to end on a tiny workload (the plain PyTorch CPU path, as users run it)."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bench.measure import run

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
        ("chain depth 2", "eager"), ("chain depth 4", "checkpoint"), ("transformer 2x32", "revtriton")}
    for row in data["rows"]:
        assert "error" not in row, row
        for field in ("peak_bytes", "step_seconds", "peak_ratio", "time_ratio"):
            assert math.isfinite(row[field]) and row[field] > 0, (row["workload"], row["method"], field)
    assert (tmp_path / result.name.replace(".json", ".md")).read_text().count("|") > 20


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
