"""Shared by the examples: the memory of one training step of a reversible model against its eager twin."""
from revtriton import saved_activation_bytes
from revtriton.memory import peak_memory_bytes


def step_memory(loss_of, model, *inputs):
    """``(peak bytes, saved bytes)`` of one forward and backward of ``loss_of(model, *inputs)``
    on CPU: the peak it adds to the process and the activations autograd keeps for backward."""
    def step():
        loss, saved = saved_activation_bytes(loss_of, model, *inputs)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return saved

    saved, peak = peak_memory_bytes(step, "cpu")
    return peak, saved


def against_eager(loss_of, model, eager, *inputs):
    """``{"reversible": (peak, saved), "eager": (peak, saved)}``: :func:`step_memory` of ``model``
    and of ``eager``, its twin built with ``reversible=False`` and given its state_dict."""
    return {"reversible": step_memory(loss_of, model, *inputs), "eager": step_memory(loss_of, eager, *inputs)}


def print_memory(memory, inputs):
    """Print what :func:`against_eager` returned for a step on ``inputs`` (words)."""
    print(f"one training step (forward and backward) on {inputs}:")
    for name, (peak, saved) in memory.items():
        print(f"{name:>12}: peak {peak / 2**20:5.1f} MiB, activations saved for backward {saved / 2**20:5.2f} MiB")
