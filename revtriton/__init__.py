"""revtriton: reversible residual networks with fused Triton coupling kernels.

``ReversibleBlock`` is an additive coupling ``y1 = x1 + F(x2), y2 = x2 + G(y1)``;
``AffineBlock`` (RealNVP/Glow) and ``MomentumBlock`` (MomentumNet) are the other couplings;
``ReversibleSequential`` chains blocks so that only the chain's output is kept for backward,
and with ``log_det=True`` also returns the log-determinant per sample for normalizing flows.
"""
from . import ops
from .blocks import ReversibleBlock
from .couplings import AffineBlock, MomentumBlock
from .drift import reconstruction_error
from .memory import saved_activation_bytes
from .sequential import ReversibleSequential

__all__ = ["ReversibleBlock", "AffineBlock", "MomentumBlock", "ReversibleSequential", "reconstruction_error", "saved_activation_bytes", "ops"]
