"""Triton kernels for the GPU path, numba kernels for the CPU's. Each module names the PyTorch code
it is tested against.

The layers call the dense-part Triton kernels (norms, rope, router, attention_decode, deltanet_step)
for CUDA tensors only (triton need not be installed on a CPU machine), and the CPU's one-token step
kernels (cpu_step) for fp32 CPU tensors where numba is installed; elsewhere the PyTorch reference runs.
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


def use_cpu_kernels(x: torch.Tensor) -> bool:
    """Whether a one-token step of x (an fp32 CPU tensor) runs the numba kernels of cpu_step: not
    where the Triton ones take it (tests force those onto CPU tensors)."""
    from .cpu_experts import numba

    return numba is not None and not use_kernels(x) and x.dtype == torch.float32
