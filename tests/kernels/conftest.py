import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture
def device():
    """Kernels run on the GPU when there is one, else in Triton's interpreter (set in tests/conftest.py)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poison(monkeypatch):
    """torch.empty and empty_like hand out NaN-filled tensors (-1 for integers), so an output
    element a kernel leaves unwritten fails the comparison instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poisoned(empty_like(*a, **kw)))


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32, on the CPU (NaN if out holds any NaN)."""
    ref = ref.float().cpu()
    return float((out.float().cpu() - ref).norm() / ref.norm())
