"""Exact counts of the memory autograd keeps for backward."""
import torch
from torch import nn


def saved_activation_bytes(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)``; return ``(result, bytes)`` where ``bytes`` is the size of
    the distinct storages autograd saved for backward, parameters excluded."""
    storages = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn(*args, **kwargs)
    return result, sum(storages.values())
