"""Memory measures: the exact bytes autograd keeps for backward, and the peak a step adds."""
import ctypes

import torch
from torch import nn

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


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


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_bytes(fn, device, warmup=1):
    """Run ``fn()`` ``warmup`` times, then once more; return ``(result, bytes)``: the result of
    that last call and the peak memory it added on ``device``. The warm-up calls keep lazy
    initialisation and first-call caches out of the figure.

    CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated before. CPU (Linux,
    glibc): the resident set's high-water mark minus the resident set before, after handing
    the heap's free pages back (``malloc_trim``) and resetting the mark (``/proc/self/clear_refs``).
    Before the warm-up, allocations of 64 KiB and more are set to be mapped on their own
    (``mallopt``), so that a tensor the call frees leaves the resident set and the peak counts
    only what is live at once. That setting stays for the rest of the process and slows
    allocation-heavy CPU work: measure after training, not before.
    """
    device = torch.device(device)
    if device.type == "cuda":
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, 65536)
    for _ in range(warmup):
        fn()
    libc.malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    result = fn()
    return result, (_status_kib("VmHWM") - before) * 1024
