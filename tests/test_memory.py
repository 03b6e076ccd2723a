"""revtriton.memory: the peak a step adds, measured on CPU from the resident set."""
import torch

from revtriton.memory import peak_memory_bytes

MIB = 2**20


def test_peak_memory_counts_what_is_live_at_once_not_what_was_ever_allocated():
    def one_at_a_time():
        return sum(torch.ones(16 * MIB).sum() for _ in range(3))  # 64 MiB each, freed in turn

    def all_at_once():
        tensors = [torch.ones(16 * MIB) for _ in range(3)]
        return sum(t.sum() for t in tensors)

    result, sequential = peak_memory_bytes(one_at_a_time, "cpu")
    _, together = peak_memory_bytes(all_at_once, "cpu")
    assert result == 3 * 16 * MIB
    assert 60 * MIB <= sequential < 72 * MIB  # one 64 MiB tensor, to within the resident set's noise
    assert 188 * MIB <= together < 200 * MIB
