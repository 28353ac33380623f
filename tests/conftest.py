"""Test set-up shared by every test file.

Triton decides at decoration time whether a kernel is compiled or interpreted, so TRITON_INTERPRET=1 is set
here, before anything imports triton: the kernels can then run on CPU tensors (with numpy) in tests marked
`triton`. Every other test runs with the variable removed, so `crlft_kernels.use_triton` is False on the CPU and
model/data/train tests take the fast PyTorch reference paths. Ahead-of-time compile tests run in a
subprocess without the variable.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels in the CPU interpreter")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(autouse=True)
def _interpreter_only_for_triton_tests(request, monkeypatch):
    if request.node.get_closest_marker("triton") is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest, and several stall when other jobs share the 2 cores (40 greedy tokens of
    SmolLM2 took 2.4 s on one thread, 40 s on two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
