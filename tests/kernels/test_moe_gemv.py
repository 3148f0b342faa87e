import pytest
import torch

from flashmoe import quant
from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.moe_gemv import MoeGemv, moe_gemv_reference
from flashmoe.layers.mlp import Swiglu


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
            if layout.with_bias:  # gpt-oss's output biases
                tensors[f"{proj}.bias"] = (torch.rand(shape[0], generator=g) - 0.5).to(torch.bfloat16)
        records.append(layout.pack(tensors))
    return torch.stack(records)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.cpu().float() - ref).norm() / ref.norm())


def routed(tokens: int, k: int, slots: int, H: int, seed: int, x_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, H, generator=g) * x_scale).to(torch.bfloat16)
    table = torch.stack([torch.randperm(slots, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    return x, table, torch.softmax(torch.randn(tokens, k, generator=g), -1)


# 16-bit records: fp32 accumulation over bf16 x and bf16 weights, the reference's function to fp32
# rounding (measured ~3e-7). Quantized records: the inputs x and h = silu(gate) * up rounded to 16-bit
# fixed point per group (kernels/codes.py layout_xq), measured 5e-5 - 2e-4 at these shapes.
def tolerance(bits: int) -> float:
    return 2e-6 if bits == 16 else 5e-4


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (2, 32), (16, 32), (4, 64)])
@pytest.mark.parametrize("tokens,k", [(1, 3), (2, 2), (1, 1)])
def test_matches_the_reference_on_fresh_inputs(device, bits, group, tokens, k):
    H, I = 128, 64
    layout = RecordLayout.build(H, I, bits, group)
    seed = bits * 100 + group + tokens
    pool = random_pool(layout, 5, seed)
    x, slots, weights = routed(tokens, k, 5, H, seed + 1)
    ref = moe_gemv_reference(layout, x, pool, slots, weights)
    gemv = MoeGemv(layout, block_n=16, block_k=64)
    y = gemv(x.to(device), pool.to(device), slots.to(device), weights.to(device))
    assert rel_err(y, ref) < tolerance(bits)


@pytest.mark.parametrize("bits", [4, 2, 8])
def test_the_gpu_default_tile_of_four_rows(device, bits):
    """The GPU's default (4 rows of gate and of up per program), which the interpreter's runtime tests do not use."""
    layout = RecordLayout.build(128, 64, bits, 32)
    pool = random_pool(layout, 5, 17)
    x, slots, weights = routed(1, 3, 5, 128, 18)
    ref = moe_gemv_reference(layout, x, pool, slots, weights)
    y = MoeGemv(layout, block_n=4)(x.to(device), pool.to(device), slots.to(device), weights.to(device))
    assert rel_err(y, ref) < tolerance(bits)


@pytest.mark.parametrize("bits,H,I,group", [(4, 1536, 128, 64), (8, 256, 768, 64), (2, 192, 96, 32), (16, 192, 96, 32)])
def test_rows_that_are_not_a_multiple_of_the_block(device, bits, H, I, group):
    """Rows of 1.5 blocks (the default tiles: 1024 inputs per warp at 4 bits, 512 at 8; gate_up's H of
    1536, down's I of 768), as Qwen3-235B's and MiniMax-M2's 1536 or GLM-4.5-Air's 1408, and of less
    than one (192, 96): the last block is partly masked. 16-bit records take a block that divides the row."""
    layout = RecordLayout.build(H, I, bits, group)
    pool = random_pool(layout, 4, bits + H)
    x, slots, weights = routed(2, 3, 4, H, bits + I)
    ref = moe_gemv_reference(layout, x, pool, slots, weights)
    gemv = MoeGemv(layout, block_n=32 if bits == 16 else None)
    y = gemv(x.to(device), pool.to(device), slots.to(device), weights.to(device))
    assert rel_err(y, ref) < tolerance(bits)


def test_slots_are_offsets_from_the_pool_pointer_and_may_be_negative(device):
    """The runtime points slots outside the pool tensor (pinned host memory mapped into the GPU's
    address space): a slot v means pool.data_ptr() + v * record_size, whatever pool.shape says."""
    layout = RecordLayout.build(128, 64, 4, 32)
    backing = random_pool(layout, 8, 3).to(device)
    pool = backing[5:7]  # a view 5 records into its storage
    slots = torch.tensor([[-5, 1, -1], [2, -4, 0]], dtype=torch.int32)  # 2 lies past the view's end
    x, _, weights = routed(2, 3, 8, 128, 4)
    ref = moe_gemv_reference(layout, x, backing.cpu(), slots + 5, weights)
    gemv = MoeGemv(layout, block_n=16, block_k=64)
    y = gemv(x.to(device), pool, slots.to(device), weights.to(device))
    assert rel_err(y, ref) < tolerance(4)


@pytest.mark.parametrize("bits", [4, 2, 8])
@pytest.mark.parametrize("x_scale", [2.0**-16, 2.0**16])
def test_fixed_point_inputs_hold_across_the_input_range(device, bits, x_scale):
    """Each group of inputs (x, and h = silu(gate) * up, here ~x_scale^2) gets its own scale: the
    error does not grow with the inputs' magnitude."""
    layout = RecordLayout.build(128, 64, bits, 32)
    pool = random_pool(layout, 4, bits)
    x, slots, weights = routed(1, 3, 4, 128, 5, x_scale)
    ref = moe_gemv_reference(layout, x, pool, slots, weights)
    y = MoeGemv(layout, block_n=8)(x.to(device), pool.to(device), slots.to(device), weights.to(device))
    assert rel_err(y, ref) < tolerance(bits)


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
    assert rel_err(out, ref) < 1e-2  # bf16 output


@pytest.mark.parametrize("bits", [4, 16])
def test_router_dtypes_need_no_casts(device, bits):
    """Decode passes the router's weights in the model dtype and resident decode int64 slots: the
    kernels read them as they are, with the result of fp32 weights and int32 slots, bit for bit."""
    layout = RecordLayout.build(128, 64, bits, 32)
    pool = random_pool(layout, 5, 11).to(device)
    x, slots, weights = routed(2, 3, 5, 128, 12)
    x, slots, weights = x.to(device), slots.to(device), weights.to(torch.bfloat16).to(device)
    gemv = MoeGemv(layout, block_n=16, block_k=64)
    assert torch.equal(gemv(x, pool, slots.long(), weights), gemv(x, pool, slots, weights.float()))


@pytest.mark.parametrize("bits", [4, 8])
def test_several_experts_per_warp_in_down(device, bits):
    """down_experts above the warps: each warp holds more than one expert's rows of a block."""
    layout = RecordLayout.build(128, 64, bits, 32)
    pool = random_pool(layout, 6, 13)
    x, slots, weights = routed(2, 5, 6, 128, 14)
    ref = moe_gemv_reference(layout, x, pool, slots, weights)
    gemv = MoeGemv(layout, block_n=8, down_experts=4)
    assert gemv.tile_blocks(5)[1][2] == 4
    y = gemv(x.to(device), pool.to(device), slots.to(device), weights.to(device))
    assert rel_err(y, ref) < tolerance(bits)


def test_the_call_is_its_two_steps_from_laid_out_inputs(device):
    """gate_up_step and down_step (which scripts/bench_kernels.py times alone) compose to the call."""
    from flashmoe.kernels.codes import layout_xq

    layout = RecordLayout.build(128, 64, 4, 32)
    pool = random_pool(layout, 4, 15).to(device)
    x, slots, weights = (t.to(device) for t in routed(1, 3, 4, 128, 16))
    gemv = MoeGemv(layout, block_n=8)
    h = gemv.gate_up_step(layout_xq(x, 4, 32, False), pool, slots, weights)
    y = gemv.down_step(layout_xq(h, 4, 32, False), pool, slots, None, torch.empty(1, 128, device=device))
    assert torch.equal(y, gemv(x, pool, slots, weights))


@pytest.mark.parametrize("bits", [4, 16])
def test_biased_experts_with_the_clamped_swiglu(device, bits):
    """gpt-oss's experts converted to affine or 16-bit records: output biases on both projections
    (the down one weighted with its expert) and the clamped SwiGLU, at a limit the inputs cross."""
    act = Swiglu(1.702, 0.3)
    layout = RecordLayout.build(128, 64, bits, 32, with_bias=True)
    pool = random_pool(layout, 5, 23)
    x, slots, weights = routed(2, 3, 5, 128, 24, x_scale=4.0)
    ref = moe_gemv_reference(layout, x, pool, slots, weights, act)
    y = MoeGemv(layout, block_n=16, act=act)(x.to(device), pool.to(device), slots.to(device), weights.to(device))
    assert rel_err(y, ref) < tolerance(bits)
