import pytest
import torch
from torch import nn

from flashmoe import kernels, quant
from flashmoe.kernels.int8_gemv import int8_gemv, int8_linear_reference
from flashmoe.kernels.shared_expert import gated_residual, gated_residual_reference, swiglu, swiglu_reference
from flashmoe.layers.int8_linear import Int8Linear
from flashmoe.moe.block import MoEBlock, MoESpec
from flashmoe.moe.routing import Routing

from .conftest import rel

# The kernels round where the eager ops round, so they differ from them by fp32 rounding, and at
# bf16 by one step where an exp's last bit tips a rounding; in Triton's interpreter by up to one
# step per rounding, as its casts to bf16 truncate (the GPU's round to nearest).
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def rows(T: int, n: int, dtype, seed: int, pad: int = 5) -> torch.Tensor:
    """[T, n] as the first columns of wider rows (the views of the fused in_proj output)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, n + pad, generator=g) * 2).to(dtype)[:, :n]


# 1500 is not a multiple of the 1024-value block (two programs, the second masked).
@pytest.mark.parametrize("T,I", [(1, 64), (3, 1500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_the_eager_ops(device, poison, T, I, dtype):
    gate, up = rows(T, I, dtype, seed=I), rows(T, I, dtype, seed=I + 1)
    h = swiglu(gate.to(device), up.to(device))
    assert h.shape == (T, I) and h.dtype == dtype
    assert rel(h, swiglu_reference(gate, up)) < TOLERANCE[dtype]


@pytest.mark.parametrize("T,H", [(1, 64), (3, 1500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_matches_the_eager_ops(device, poison, T, H, dtype):
    x, y, gate = rows(T, H, dtype, seed=H, pad=0), rows(T, H, dtype, seed=H + 1, pad=0), rows(T, 1, dtype, seed=H + 2)
    out = gated_residual(x.to(device), gate.to(device), y.to(device))
    assert out.shape == (T, H) and out.dtype == dtype
    assert rel(out, gated_residual_reference(x, gate, y)) < TOLERANCE[dtype]


# N = 37: clamped rows past the last block; K = 100: a masked tail of words (and of the layout)
@pytest.mark.parametrize("n,k", [(40, 64), (37, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_gemv_with_swiglu_and_gated_residual_fused(device, poison, n, k, dtype):
    g = torch.Generator().manual_seed(n * k)
    q, scale = quant.quantize_int8_rows(torch.randn(n, k, generator=g) / k**0.5)
    gate, up = rows(1, k, dtype, seed=k), rows(1, k, dtype, seed=k + 1)
    shared_gate, residual = rows(1, 1, dtype, seed=n), rows(1, n, dtype, seed=n + 1, pad=0)
    y = int8_gemv(*(t.to(device) for t in (gate, q, scale)), block_n=8, num_warps=1,
                  up=up.to(device), shared_gate=shared_gate.to(device), residual=residual.to(device))
    down = int8_linear_reference(swiglu_reference(gate, up), q, scale).to(dtype)  # eagerly rounded here too
    assert y.shape == (1, n) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # fp32: sums in another order; bf16: five roundings
    assert rel(y, gated_residual_reference(residual, shared_gate, down)) < tol


def test_fused_options_refuse_what_they_do_not_support(device):
    q, scale = quant.quantize_int8_rows(torch.randn(16, 64))
    q, scale, x = q.to(device), scale.to(device), torch.randn(1, 64, device=device)
    with pytest.raises(ValueError, match="both shared_gate and residual"):
        int8_gemv(x, q, scale, shared_gate=torch.zeros(1, 1, device=device))
    with pytest.raises(ValueError, match=r"residual \[1, 16\]"):
        int8_gemv(x, q, scale, shared_gate=torch.zeros(1, 1, device=device), residual=torch.zeros(1, 8, device=device))
    with pytest.raises(ValueError, match="up must match x"):
        int8_gemv(x, q, scale, up=torch.zeros(1, 64, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="unit column stride"):
        swiglu(x[:, ::2], x[:, ::2])
    with pytest.raises(ValueError, match="shared_gate must be"):
        gated_residual(x, torch.zeros(1, 2, device=device), x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels on CPU tensors, in Triton's interpreter")
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_the_block_adds_its_shared_expert_on_the_kernels_without_changing_it(monkeypatch, int8, gated):
    """MoEBlock.add_shared on the kernels (the int8 GEMV taking the row, as on a GPU) against its
    PyTorch branch, from the views of a fused in_proj output: Qwen3.5's sigmoid-gated shared expert
    and GLM's plain one."""
    moe = MoEBlock(64, MoESpec(8, 2, 16, Routing(), shared_intermediate=48, shared_gate=gated))
    g = torch.Generator().manual_seed(int(int8))
    if int8:
        moe.shared_expert.down_proj = Int8Linear(48, 64)
        q, scale = quant.quantize_int8_rows(torch.randn(64, 48, generator=g) / 48**0.5)
        moe.shared_expert.down_proj.weight.copy_(q)
        moe.shared_expert.down_proj.scale.copy_(scale)
        monkeypatch.setattr(Int8Linear, "takes_gemv", lambda self, rows: rows.shape[0] == 1)
    else:
        nn.init.normal_(moe.shared_expert.down_proj.weight, std=48**-0.5, generator=g)
    T = 1 if int8 else 3
    fused = torch.randn(T, 1 + 2 * 48, generator=g)  # shared gate, gate, up side by side
    inputs = list(fused.split([1, 48, 48], dim=-1))[0 if gated else 1 :]
    x = torch.randn(T, 64, generator=g)
    with torch.no_grad():
        ref = moe.add_shared(x, inputs)
        monkeypatch.setattr(kernels, "use_kernels", lambda t: True)
        got = moe.add_shared(x, inputs)
    assert rel(got, ref) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 40])
def test_real_shapes_on_the_gpu(T):
    """The 397B's shared expert (hidden 4096, intermediate 1024) in bf16: decode's row through the
    int8 GEMV with both fused, a prefill's rows through the two elementwise kernels, against the
    eager ops on the same GPU."""
    H, I = 4096, 1024
    g = torch.Generator().manual_seed(T)
    q, scale = quant.quantize_int8_rows(torch.randn(H, I, generator=g) / I**0.5)
    q, scale = q.cuda(), scale.cuda()
    fused = (torch.randn(T, 1 + 2 * I, generator=g) * 2).to(torch.bfloat16).cuda()
    shared_gate, gate, up = fused.split([1, I, I], dim=-1)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).cuda()
    down = (int8_linear_reference(swiglu_reference(gate, up), q, scale)).to(torch.bfloat16)
    ref = gated_residual_reference(x, shared_gate, down)
    h = swiglu(gate, up)
    assert rel(h, swiglu_reference(gate, up)) < 4e-3  # round to nearest: at most one step where an exp tips it
    assert rel(gated_residual(x, shared_gate, down), ref) < 4e-3
    if T == 1:
        y = int8_gemv(gate, q, scale, up=up, shared_gate=shared_gate, residual=x)
        assert rel(y, ref) < 1e-2
