import pytest
import torch

from flashmoe import quant
from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.moe_gemv import MoeGemv, moe_gemv_reference


def random_pool(layout: RecordLayout, slots: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    H, I = layout.hidden_size, layout.intermediate_size
    records = []
    for _ in range(slots):
        tensors = {}
        for proj, shape in {"gate_up_proj": (2 * I, H), "down_proj": (H, I)}.items():
            w = torch.randn(shape, generator=g) / shape[1] ** 0.5
            if layout.bits == 16:
                tensors[f"{proj}.weight"] = w.to(torch.bfloat16)
            else:
                q, s, b = quant.quantize(w, layout.bits, layout.group_size)
                tensors.update({f"{proj}.weight": q, f"{proj}.scales": s, f"{proj}.biases": b})
        records.append(layout.pack(tensors))
    return torch.stack(records)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (2, 32), (16, 32), (4, 64)])
@pytest.mark.parametrize("tokens,k", [(1, 3), (2, 2)])
def test_matches_the_reference_on_fresh_inputs(device, bits, group, tokens, k):
    H, I = 128, 64
    layout = RecordLayout.build(H, I, bits, group)
    seed = bits * 100 + group + tokens
    pool = random_pool(layout, 5, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, H, generator=g).to(torch.bfloat16)
    slots = torch.stack([torch.randperm(5, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    ref = moe_gemv_reference(layout, x, pool, slots, weights)
    gemv = MoeGemv(layout, block_n=16, block_k=64)
    y = gemv(x.to(device), pool.to(device), slots.to(device), weights.to(device))
    err = float((y.cpu() - ref).norm() / ref.norm())
    assert err < 1e-4, err  # fp32 accumulation over bf16 x and exact dequantized weights


def test_fused_residual_and_output_buffer(device):
    layout = RecordLayout.build(128, 64, 4, 32)
    pool = random_pool(layout, 4, 9)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(1, 128, generator=g).to(torch.bfloat16)
    residual = torch.randn(1, 128, generator=g).to(torch.bfloat16)
    slots = torch.tensor([[2, 0]], dtype=torch.int32)
    weights = torch.tensor([[0.7, 0.3]])
    out = torch.full((1, 128), float("nan"), dtype=torch.bfloat16, device=device)  # poisoned
    gemv = MoeGemv(layout, block_n=16, block_k=64)
    gemv(x.to(device), pool.to(device), slots.to(device), weights.to(device), residual=residual.to(device), out=out)
    ref = moe_gemv_reference(layout, x, pool, slots, weights) + residual.float()
    assert float((out.cpu().float() - ref).norm() / ref.norm()) < 1e-2  # bf16 output
