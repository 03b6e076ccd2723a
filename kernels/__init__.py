"""Triton kernels for reversible couplings (installed as ``revtriton.kernels``).

Only ``@triton.jit`` functions and their launchers live here: no autograd, no nn.Module.
Every launcher works in place on tensors that :func:`revtriton.kernels.layout.row_layout`
can address as strided rows, so the two halves of a tensor split along any dimension are
passed as views, never copied.
"""
from .additive import add_, sub_, sub_add_

__all__ = ["add_", "sub_", "sub_add_"]
