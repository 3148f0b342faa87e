"""The MXFP4 expert kernels against `layout.weights` + `swiglu_expert` on fresh random records:
gpt-oss's biased experts with its clamped SwiGLU (and the plain one), rows and inputs that end in
partial blocks, decode with and without a residual, prefill's per-row outputs. Decode keeps fp32
inputs (within 1e-5 of the reference); prefill's tensor cores take fp16 inputs (x and h rounded to
fp16, 11 significant bits: 1.8e-4 to 4.2e-4 measured), so prefill is also checked against the reference
on those rounded inputs, where only fp32 rounding separates them."""

import pytest
import torch

from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.moe_mxfp4 import MoeMxfp4
from flashmoe.layers.mlp import SILU, Swiglu, swiglu_expert

from .conftest import rel
from .test_cpu_experts import biased_pool

LAYOUT = RecordLayout.build(192, 96, 4, 32, with_bias=True, scheme="mxfp4")  # 96 rows, 96 inputs: partial blocks


def expert(pool, slot, x, act):
    return swiglu_expert(x[None].float(), *LAYOUT.weights(pool[slot], torch.float32), act, LAYOUT.biases(pool[slot], torch.float32))[0]


def expert_fp16_inputs(pool, slot, x, act):
    """The expert as prefill computes it: x and the activation h rounded to fp16, all else fp32."""
    return expert(pool, slot, x.half().float(), lambda gate, up: act(gate, up).half().float())


def check_prefill(y, pool, per_row, x, act):
    assert rel(y, torch.stack([expert(pool, s, x[i], act) for i, s in enumerate(per_row)])) < 1e-3
    assert rel(y, torch.stack([expert_fp16_inputs(pool, s, x[i], act) for i, s in enumerate(per_row)])) < 1e-5


@pytest.mark.parametrize("act", [Swiglu(1.702, 0.3), SILU])
@pytest.mark.parametrize("tokens,k,with_residual", [(1, 3, False), (3, 2, True)])
def test_decode_matches_the_reference(device, poison, act, tokens, k, with_residual):
    g = torch.Generator().manual_seed(tokens * 10 + k)
    pool = biased_pool(LAYOUT, 6, seed=4)
    x = torch.randn(tokens, 192, generator=g)
    table = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    residual = torch.randn(tokens, 192, generator=g) if with_residual else None
    ref = torch.stack([sum(weights[t, j] * expert(pool, int(table[t, j]), x[t], act) for j in range(k)) for t in range(tokens)])
    if residual is not None:
        ref = ref + residual
    on = {t: v.to(device) if v is not None else None for t, v in dict(x=x, pool=pool, table=table, w=weights, r=residual).items()}
    y = MoeMxfp4(LAYOUT, act)(on["x"], on["pool"], on["table"], on["w"], on["r"])
    assert rel(y, ref) < 1e-5


def test_grouped_gives_each_rows_expert_unweighted(device, poison):
    act = Swiglu(1.702, 0.3)
    pool = biased_pool(LAYOUT, 5, seed=9)
    slots, counts = [4, 1, 2], [2, 1, 3]
    x = torch.randn(6, 192, generator=torch.Generator().manual_seed(3))
    per_row = [s for s, c in zip(slots, counts) for _ in range(c)]
    y = MoeMxfp4(LAYOUT, act).grouped(x.to(device), pool.to(device), slots, counts)
    check_prefill(y, pool, per_row, x, act)


def test_grouped_tiles_split_an_experts_rows(device, poison):
    """An expert with more rows than a tile: its codes are read once per tile, each tile's rows right
    (four groups a step: 192 and 96 inputs end in partial steps)."""
    act = Swiglu(1.702, 0.3)
    pool = biased_pool(LAYOUT, 3, seed=5)
    slots, counts = [2, 0], [5, 2]
    x = torch.randn(7, 192, generator=torch.Generator().manual_seed(8))
    per_row = [s for s, c in zip(slots, counts) for _ in range(c)]
    y = MoeMxfp4(LAYOUT, act, block_m=2, groups=4).grouped(x.to(device), pool.to(device), slots, counts)
    check_prefill(y, pool, per_row, x, act)


@pytest.mark.parametrize("prefill", [False, True])
def test_every_scale_exponent(device, poison, prefill):
    """down's rows scaled by 2^-107 .. 2^103 (a different E8M0 byte per row, all of a row's groups
    alike): each row exact to fp32 rounding after its scale is divided out, so no exponent is
    mishandled and no small row is lost beside a large one (prefill: against its fp16 inputs)."""
    act = Swiglu(1.702, 0.3)
    pool = biased_pool(LAYOUT, 2, seed=6)
    seg = {s.name: s for s in LAYOUT.segments}
    scales = seg["down_proj.scales"]
    exponent = torch.linspace(20, 230, LAYOUT.hidden_size).round().to(torch.uint8)  # one byte per down row
    pool[:, scales.offset : scales.offset + scales.nbytes] = exponent.repeat_interleave(scales.shape[1]).repeat(2, 1)
    bias = seg["down_proj.bias"]
    pool[:, bias.offset : bias.offset + bias.nbytes] = 0  # the bias would swamp the small rows
    x = torch.randn(1, 192, generator=torch.Generator().manual_seed(2))
    slots, weights = torch.tensor([[1, 0]], dtype=torch.int32), torch.tensor([[0.75, 0.25]])
    if prefill:
        ref = expert_fp16_inputs(pool, 1, x[0], act)
        y = MoeMxfp4(LAYOUT, act, groups=1).grouped(x.to(device), pool.to(device), [1], [1])
    else:
        ref = 0.75 * expert(pool, 1, x[0], act) + 0.25 * expert(pool, 0, x[0], act)
        y = MoeMxfp4(LAYOUT, act, groups=1)(x.to(device), pool.to(device), slots.to(device), weights.to(device))
    unscale = torch.exp2(127 - exponent.double())
    assert rel(y.cpu().double()[0] * unscale, ref.double() * unscale) < 1e-5
