import os
import sys

import torch

# Without a GPU, Triton kernels run under its interpreter; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from fastsel.backends import available  # noqa: E402

class BackendCase(str):
    """A backend name that also says which device this case runs it on."""

    device = "cpu"


def _cases():
    cases = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for name in available(device):
            case = BackendCase(name)
            case.device = device
            cases.append(case)
    return cases


BACKEND_CASES = _cases()


def pytest_report_header(config):
    import fastsel
    return [f"fastsel backends: {fastsel.list_backends()}"]


@pytest.fixture(params=BACKEND_CASES, ids=lambda c: c if c.device == "cpu" else f"{c}-{c.device}")
def backend_name(request):
    """Every backend on every device it runs on here: on the CPU (Triton only under
    TRITON_INTERPRET=1), and on a GPU when there is one. ``backend_name.device`` says which."""
    return request.param


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
