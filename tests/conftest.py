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
