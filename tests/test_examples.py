"""The side-input examples: each trains (short runs here), and its reversible model's step
keeps less memory than its eager twin's."""
import importlib.util
import pathlib

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.fixture(autouse=True)
def _as_run_from_examples(monkeypatch):
    """Import as ``python examples/NAME.py`` does (its folder first on sys.path, for
    step_memory), with the coupling ops' PyTorch path: the interpreter would make training slow."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def assert_leaner_than_eager(memory):
    """``memory``: ``{"reversible": (peak, saved), "eager": (peak, saved)}`` in bytes. Saved bytes
    are exact; a peak read from the resident set varies by a few MiB from run to run."""
    (peak, saved), (eager_peak, eager_saved) = memory["reversible"], memory["eager"]
    assert saved * 5 < eager_saved
    assert peak * 1.5 < eager_peak


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


def test_the_conditional_flow_learns_each_class(capsys):
    example = load("conditional_flow_2d")
    flow, history, memory = example.fit(steps=150, batch=256, depth=4, every=50, memory_batch=4096)
    assert sum(history[-10:]) / 10 < history[0] - 1.0
    assert_leaner_than_eager(memory)
    assert "negative log-likelihood" in capsys.readouterr().out
    # by mean point and mean |x|, the samples of each label are at least twice as near to the data
    # of its own class as to that of any other class
    data = torch.tensor([example.statistics(example.sample(torch.full((2000,), c))) for c in range(3)])
    for c, x in enumerate(example.samples_per_class(flow, 2000)):
        distances = (data - torch.tensor(example.statistics(x))).norm(dim=1)
        assert 2 * distances[c] < torch.cat([distances[:c], distances[c + 1:]]).min(), (c, distances)


def test_the_reverse_kl_flow_learns_the_ring_through_its_inverse(capsys):
    example = load("reverse_kl_flow")
    flow, history, memory = example.fit(steps=60, batch=256, depth=4, every=30, memory_batch=4096)
    assert sum(history[-10:]) / 10 < history[0] - 3.0  # from about 7.8 nats
    assert_leaner_than_eager(memory)
    assert "KL(q || p) estimate" in capsys.readouterr().out
