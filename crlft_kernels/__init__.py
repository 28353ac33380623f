"""Triton kernels, each with a plain PyTorch reference beside it. The kernel runs on a CUDA tensor, or on a CPU
tensor when TRITON_INTERPRET=1 was set before triton was imported (the tests); elsewhere the reference runs."""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS, or a CPU-only install without triton
    triton = tl = None
HAS_TRITON = triton is not None
# True: every call takes the PyTorch reference, even on a GPU (tests/test_gpu.py runs one model both ways).
FORCE_REFERENCE = False


def use_triton(t: torch.Tensor) -> bool:
    if FORCE_REFERENCE:
        return False
    return HAS_TRITON and (
        t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    )
