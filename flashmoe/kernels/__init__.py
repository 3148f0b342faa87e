"""Triton kernels for the GPU path. Each module names the PyTorch code it is tested against.

The layers call the dense-part kernels (norms, rope, router, attention_decode, deltanet_step) for
CUDA tensors only: the CPU keeps the PyTorch reference, and triton need not be installed there.
"""

import os

import torch

# Triton runs the kernels in its interpreter (CI, CPU-only machines; tests/conftest.py sets it before
# triton is imported): no PTX there, and its bf16 dot products are computed wrongly.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the layers compute x's step with the Triton kernels. Tests patch it to run them in
    Triton's interpreter on the CPU, against the PyTorch path."""
    return x.is_cuda
