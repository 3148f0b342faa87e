"""8-bit resident dense weights (`--dense-bits 8`): `Int8Linear` replaces an nn.Linear by int8 codes
with one fp32 scale per output channel (flashmoe.quant.quantize_int8_rows); its bias, if any (GLM's
q/k/v), stays 16-bit.

Only the large projections are quantized. Kept 16-bit: the router (`mlp.gate`: a flipped routing
decision costs far more than its bytes save), `shared_expert_gate` (one row), the DeltaNet gates
`in_proj_a` / `in_proj_b` (64 rows each, driving the state's decay), norms, conv1d, A_log / dt_bias,
and the embedding table (a lookup: one row per token is read).

The swap comes before loading, and fusing the projections of one input (layers/fused.py) after it:
int8 layers are fused with int8 ones only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Module names (last component) of the nn.Linear layers that become Int8Linear.
INT8_LINEARS = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj", "up_proj",
     "down_proj", "lm_head"}
)

DEQUANT_ROWS = 16384  # weight rows per converted block in Int8Linear.dequantized_matmul (128 MiB of bf16 at K=4096)


def is_int8_linear(module_name: str) -> bool:
    """Whether the nn.Linear of this (dotted) module name is stored as int8 with --dense-bits 8."""
    return module_name.rpartition(".")[2] in INT8_LINEARS


class Int8Linear(nn.Module):
    """y = (x @ weight^T) * scale (+ bias): weight int8 [out, in], scale fp32 [out]. On a GPU, one row
    (decode) goes through the Triton GEMV, which reads each weight byte once and needs no
    host sync (safe inside CUDA graphs). More rows (prefill), inputs whose width
    is not a multiple of 4 (tiny models), and the CPU, take `dequantized_matmul`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.takes_gemv(rows):
            from ..kernels.int8_gemv import int8_gemv

            y = int8_gemv(rows, self.weight, self.scale)
        else:
            y = self.dequantized_matmul(rows)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def takes_gemv(self, rows: torch.Tensor) -> bool:
        """Whether rows [M, in_features] go through the Triton GEMV (a GPU, one row)."""
        if not rows.is_cuda:
            return False
        from ..kernels.int8_gemv import fits  # Triton: the CPU path imports none of it

        return fits(rows, self.weight)

    def dequantized_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return dequantized_matmul(rows, self.weight, self.scale)


def dequantized_matmul(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """rows [M, K] @ weight^T [K, N] (times scale [N]) for weights stored narrower than the rows
    (int8 codes, exact as floats since |code| <= 127, or bf16): converted to the rows' dtype for the
    library matmul, which is compute-bound here, DEQUANT_ROWS weight rows at a time so that the
    temporary stays small even for an lm_head; the scales then multiply its output columns."""
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=rows.dtype, device=rows.device)
    for start in range(0, weight.shape[0], DEQUANT_ROWS):
        block = slice(start, start + DEQUANT_ROWS)
        y = F.linear(rows, weight[block].to(rows.dtype))
        out[:, block] = y if scale is None else y * scale[block]
    return out


class Bf16Linear(Int8Linear):
    """y = x @ weight^T (+ bias) for fp32 x on the CPU, the weight kept as the checkpoint stores it,
    bfloat16 (exactly its values, in half the bytes of fp32): a decode row reads it through the
    numba GEMV (kernels/cpu_step.py, via layers/fused.project), more rows convert it a block at a
    time for the library matmul. No scale: the values are the weights themselves."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.bfloat16))
        self.register_buffer("scale", None)
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    def takes_gemv(self, rows: torch.Tensor) -> bool:
        return False  # the GPU's int8 GEMV: not for these


class Bf16Embedding(nn.Module):
    """An embedding table kept as the checkpoint stores it, bfloat16, in an fp32 engine on the CPU:
    the rows looked up are widened to fp32 (exact), and as a tied lm_head the table is read at half
    the bytes of fp32 (the numba GEMV over bf16, models/transformer.Model.logits)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.bfloat16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


def use_int8_linears(model: nn.Module) -> list[str]:
    """Swap the model's quantizable nn.Linear layers for (empty) Int8Linear ones, in place, on the
    device the model was built on (meta, before loading) -> the swapped modules' names."""
    return _swap(model, Int8Linear, is_int8_linear)


def use_bf16_linears(model: nn.Module) -> list[str]:
    """Swap every (remaining) nn.Linear layer for an empty Bf16Linear, as use_int8_linears does, and
    every nn.Embedding for an empty Bf16Embedding."""
    return _swap(model, Bf16Linear, lambda name: True) + _swap(model, Bf16Embedding, lambda name: True, nn.Embedding)


def _swap(model: nn.Module, kind: type, chosen, replaced: type = nn.Linear) -> list[str]:
    swapped = [name for name, m in model.named_modules() if type(m) is replaced and chosen(name)]
    for name in swapped:
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        new = (kind(old.num_embeddings, old.embedding_dim) if replaced is nn.Embedding
               else kind(old.in_features, old.out_features, old.bias is not None))
        setattr(model.get_submodule(parent), child, new)
    return swapped
