"""Triton kernels for reversible couplings (installed as ``revtriton.kernels``).

Only ``@triton.jit`` functions and their launchers live here: no autograd, no nn.Module.
Every launcher works in place on tensors that :func:`revtriton.kernels.layout.row_layout`
can address as strided rows, so the two halves of a tensor split along any dimension are
passed as views, never copied.
"""
from .additive import add_, sub_, sub_add_
from .affine import affine_backward_, affine_forward_, affine_inverse_, affine_inverse_backward_
from .momentum import (momentum_backward_v_, momentum_backward_x_, momentum_forward_, momentum_inverse_,
                       momentum_inverse_backward_)

__all__ = ["add_", "sub_", "sub_add_", "affine_forward_", "affine_inverse_", "affine_backward_",
           "affine_inverse_backward_",
           "momentum_forward_", "momentum_inverse_", "momentum_backward_x_", "momentum_backward_v_",
           "momentum_inverse_backward_"]
