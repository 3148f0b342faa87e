"""The decoder every family builds: embedding, layers (a mixer, full attention or Gated DeltaNet,
then a dense MLP or the MoE block), final norm, head. What differs by family comes from its Args
(models/args.py): the layer plan, the attention variant, the norms' weight form, the routing.
Module names equal the checkpoint's tensor names after the family's `sanitize`, so dense weights
load by name.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.attention import Attention
from ..layers.deltanet import GatedDeltaNet
from ..layers.mlp import MLP
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from ..moe.block import MoEBlock, MoESpec
from ..layers.state import SequenceState
from .args import ModelArgs
from .context import StepContext


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        spec, H, eps, zero_centred = args.layer(index), args.hidden_size, args.rms_norm_eps, args.ZERO_CENTRED_NORMS
        self.index = index
        self.is_linear = spec.mixer == "linear_attention"
        if self.is_linear:
            d = args.deltanet()
            self.linear_attn = GatedDeltaNet(H, d.k_heads, d.v_heads, d.k_dim, d.v_dim, d.conv_kernel, eps)
        else:
            self.self_attn = Attention(H, args.attention(), eps, zero_centred, spec.window)
        self.mlp = MoEBlock(H, spec.mlp) if isinstance(spec.mlp, MoESpec) else MLP(H, spec.mlp)
        self.input_layernorm = RMSNorm(H, eps, zero_centred)
        self.post_attention_layernorm = RMSNorm(H, eps, zero_centred)

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.is_linear else self.self_attn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list, ctx: StepContext) -> torch.Tensor:
        """x [T, H]: the step's tokens, each sequence's (one cache each) after the one before."""
        with ctx.section("mixer"):
            h = self.input_layernorm(x)
            # Every matmul runs on the whole batch at once, the mixers' state per sequence: the
            # routed experts read each expert the batch needs once.
            if self.is_linear:
                h = self.linear_attn(h, caches, ctx.slices(x.shape[0]))
            else:
                h = self.self_attn(h, cos, sin, caches, ctx)
            x, h = self.post_attention_layernorm.add(x, h)  # x + h and its norm
        if not isinstance(self.mlp, MoEBlock):
            with ctx.section("dense_mlp"):
                return x + self.mlp(h)
        with ctx.section("routing"):  # the router's matmul also computes the shared expert's inputs
            logits, shared_inputs = self.mlp.project(h)
            weights, ids = self.mlp.route(logits)
        with ctx.section("shared_expert"):
            x = self.mlp.add_shared(x, shared_inputs)
        if (guess := ctx.guess_next(self.index, x)) is not None:
            with ctx.section("routing"):  # one read of this layer's routing brings the next layer's guess too
                ids = torch.cat([ids, guess], dim=-1)
        return ctx.run_experts(self.index, h, ids, weights, residual=x)

    def new_state(self, dtype: torch.dtype, device) -> object:
        """This layer's part of a sequence's state: a KV cache, or the DeltaNet's conv and recurrent state."""
        return self.mixer.new_state(dtype, device)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.ZERO_CENTRED_NORMS)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(*args.rotary(), args.yarn())

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def fuse_projections(self) -> None:
        """Run the projections that read one input as one matmul (layers/fused.py). Once, after the
        weights are loaded onto their device (and after any Int8Linear swap)."""
        for layer in self.layers:
            layer.mixer.in_proj.fuse()
            layer.mlp.in_proj.fuse()

    def new_state(self, dtype: torch.dtype, device) -> SequenceState:
        return SequenceState([layer.new_state(dtype, device) for layer in self.layers])

    def forward(self, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """ids [T] continue the sequences in ctx.states, each's tokens after the one before (their
        caches written in place; the caller advances their positions) -> logits [T, vocab] (fp32),
        or with ctx.last_only each sequence's last position's [sequences, vocab]."""
        T = ids.shape[0]
        cos, sin = self.rotary(ctx.positions(T, ids.device))
        x = self.model.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, [state.layers[i] for state in ctx.states], ctx)
        with ctx.section("head"):
            return self.logits(x[ctx.last_positions(T)] if ctx.last_only else x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.norm(x)
        if self.args.tie_word_embeddings:  # the embedding table, kept 16-bit even with --dense-bits 8
            return (x @ self.model.embed_tokens.weight.t()).float()
        return self.lm_head(x).float()  # an nn.Linear, or an Int8Linear with --dense-bits 8
