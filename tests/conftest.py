import os
import sys

import torch

# Without a GPU, Triton kernels run under its interpreter; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from fastsel.backends import available  # noqa: E402

CPU_BACKENDS = available("cpu")


def pytest_report_header(config):
    import fastsel
    return [f"fastsel backends: {fastsel.backends()}"]


@pytest.fixture(params=CPU_BACKENDS)
def backend_name(request):
    """Every backend that runs on the CPU here (Triton only under TRITON_INTERPRET=1)."""
    return request.param


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
