import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture
def device():
    """Kernels run on the GPU when there is one, else in Triton's interpreter (set in tests/conftest.py)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
