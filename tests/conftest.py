"""Test session set-up.

Without CUDA, the Triton kernels run on CPU tensors through Triton's interpreter, which must
be switched on before triton is first imported: every revtriton op in this session then
launches the real kernels. Set TRITON_INTERPRET=0 to test the plain PyTorch CPU path instead.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
