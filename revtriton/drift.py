"""How far a chain's inverse drifts from exact in finite precision."""
import torch


@torch.no_grad()
def reconstruction_error(chain, x):
    """``|inverse(forward(x)) - x| / |x|`` in Frobenius norms, measured in float64.

    Run it under ``torch.autocast`` to measure streams kept in ``x.dtype`` while F and G
    compute in lower precision.
    """
    x_back = chain.inverse(chain(x))
    return ((x_back.double() - x.double()).norm() / x.double().norm()).item()
