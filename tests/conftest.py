"""Test session set-up.

Without CUDA, the Triton kernels run on CPU tensors through Triton's interpreter, which must
be switched on before triton is first imported: every revtriton op in this session then
launches the real kernels. Set TRITON_INTERPRET=0 to test the plain PyTorch CPU path instead.

Tests that need a GPU carry the ``cuda`` marker (a device-parametrized test marks its "cuda"
parameter: ``helpers.DEVICES``): ``python -m pytest -m cuda tests`` runs exactly them, and
without CUDA they are collected and skipped. On CUDA they compute fp32 in IEEE fp32 (TF32 off).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (run them alone with -m cuda); skipped without one")


def _runs_on_cuda(item):
    """Whether a test's own parameters name a CUDA device (it must then carry the marker)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return str(params.get("device", "")).startswith("cuda")


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items if _runs_on_cuda(item) and item.get_closest_marker("cuda") is None]
    if unmarked:  # -m cuda would miss them on a GPU machine, and they would fail without one
        raise pytest.UsageError("tests with device='cuda' but no cuda marker (use helpers.DEVICES): "
                                + ", ".join(unmarked))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _ieee_fp32_on_cuda(request):
    """CUDA tests compare fp32 with eager at 1e-5: TF32 (cuDNN convolutions use it by default)
    rounds operands to 10 mantissa bits and alone made such comparisons miss by 2e-4."""
    if request.node.get_closest_marker("cuda") is None:
        yield
        return
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
