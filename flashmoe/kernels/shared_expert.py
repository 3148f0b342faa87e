"""The shared expert's elementwise work, x + sigmoid(shared_gate) * down_proj(silu(gate) * up), in
two launches around the down projection instead of five (silu, multiply; sigmoid, multiply, add).

- `swiglu`: h = silu(gate) * up, the down projection's input ([T, I] rows, views of the fused
  in_proj output). Also the dense MLP's (MLP.down).
- `gated_residual`: x + sigmoid(shared_gate) * y, the down projection's output y added to the
  residual stream x; shared_gate [T, 1].

With --dense-bits 8 the int8 GEMV takes both itself (one row): `silu_mul` in its input's layout,
`gated_add` in its epilogue (kernels/codes.py layout_x, kernels/int8_gemv.py), so the shared
expert is the down projection's two launches and nothing more.

Each step is rounded to the activations' dtype where the eager ops round, so at 16 bits the
kernels give the eager values (`swiglu_reference`, `gated_residual_reference`: the model's PyTorch
path in MLP.down and SparseMoE.add_shared) but where an exp's last bit tips a rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 1024  # values per program


@triton.jit
def silu_mul(gate, up, dt: tl.constexpr):
    """silu(gate) * up from fp32 values, rounded to dt after each op as eagerly -> fp32."""
    s = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    return (s * up).to(dt).to(tl.float32)


@triton.jit
def gated_add(x, gate, y, dt: tl.constexpr):
    """x + sigmoid(gate) * y from fp32 values (y already in dt), rounded as eagerly -> fp32."""
    g = tl.sigmoid(gate).to(dt).to(tl.float32)
    return x + (g * y).to(dt).to(tl.float32)


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, h_ptr, I, gate_stride, up_stride, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = i < I
    gate = tl.load(gate_ptr + t * gate_stride + i, mask=live).to(tl.float32)
    up = tl.load(up_ptr + t * up_stride + i, mask=live).to(tl.float32)
    dt = h_ptr.dtype.element_ty
    tl.store(h_ptr + t * I + i, silu_mul(gate, up, dt).to(dt), mask=live)


@triton.jit
def _gated_residual_kernel(x_ptr, gate_ptr, y_ptr, out_ptr, H, x_stride, gate_stride, y_stride, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = i < H
    x = tl.load(x_ptr + t * x_stride + i, mask=live).to(tl.float32)
    y = tl.load(y_ptr + t * y_stride + i, mask=live).to(tl.float32)
    gate = tl.load(gate_ptr + t * gate_stride).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    tl.store(out_ptr + t * H + i, gated_add(x, gate, y, dt).to(dt), mask=live)


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> None:
    if t.shape != shape or t.dtype != dtype or t.stride(-1) != 1:
        raise ValueError(f"{name} must be [{shape[0]}, {shape[1]}] {dtype} with unit column stride, got "
                         f"{tuple(t.shape)} {t.dtype}")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [T, I] of one dtype, unit column stride (row views of a wider tensor are fine)
    -> silu(gate) * up, [T, I] contiguous, in their dtype."""
    T, I = gate.shape
    _check_rows("gate", gate, (T, I), gate.dtype)
    _check_rows("up", up, (T, I), gate.dtype)
    h = torch.empty(T, I, dtype=gate.dtype, device=gate.device)
    _swiglu_kernel[(T, triton.cdiv(I, BLOCK))](gate, up, h, I, gate.stride(0), up.stride(0), BLOCK=BLOCK, num_warps=4)
    return h


def gated_residual(x: torch.Tensor, shared_gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y [T, H], shared_gate [T, 1], all of one dtype with unit column stride -> x + sigmoid(shared_gate) * y,
    [T, H] contiguous."""
    T, H = x.shape
    _check_rows("x", x, (T, H), x.dtype)
    _check_rows("y", y, (T, H), x.dtype)
    _check_rows("shared_gate", shared_gate, (T, 1), x.dtype)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    _gated_residual_kernel[(T, triton.cdiv(H, BLOCK))](
        x, shared_gate, y, out, H, x.stride(0), shared_gate.stride(0), y.stride(0), BLOCK=BLOCK, num_warps=4,
    )
    return out


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gated_residual_reference(x: torch.Tensor, shared_gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + torch.sigmoid(shared_gate) * y
