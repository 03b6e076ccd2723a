"""The side-input examples: each trains (short runs here), and its reversible model's step
keeps less memory than its eager twin's."""
import importlib.util
import pathlib

import pytest


def load(name):
    path = pathlib.Path(__file__).parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.fixture(autouse=True)
def _plain_cpu_ops(monkeypatch):
    """The coupling ops' PyTorch path: the interpreter would make training runs slow."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def assert_leaner_than_eager(memory):
    """``memory``: ``{"reversible": (peak, saved), "eager": (peak, saved)}`` in bytes."""
    (peak, saved), (eager_peak, eager_saved) = memory["reversible"], memory["eager"]
    assert saved * 5 < eager_saved
    assert peak * 2 < eager_peak


def test_the_reversal_example_learns_and_keeps_less_than_its_eager_twin(capsys):
    example = load("seq2seq_reverse")
    _, history, accuracy, memory = example.fit(steps=40, tokens=8, depth=2, every=20)
    assert sum(history[-10:]) / 10 < history[0] - 0.5
    assert accuracy > 1.5 / example.SYMBOLS  # better than guessing a symbol
    assert_leaner_than_eager(memory)
    assert "cross-entropy" in capsys.readouterr().out


def test_the_reversal_batches_are_reversed_sources_behind_bos():
    example = load("seq2seq_reverse")
    src, tgt_in, tgt = example.batch(50, 6)
    for s, i, t in zip(src, tgt_in, tgt):
        n = int((s != example.PAD).sum())
        assert (s[n:] == example.PAD).all() and (s[:n] >= 2).all()
        assert t[:n].tolist() == s[:n].flip(0).tolist() and (t[n:] == example.PAD).all()
        assert i[0] == example.BOS and i[1:].tolist() == t[:-1].tolist()

