"""The decoder every family builds: embedding, layers (a mixer, full attention or Gated DeltaNet,
then a dense MLP or the MoE block), final norm, head. What differs by family comes from its Args
(models/args.py): the layer plan, the attention variant, the norms' weight form, the routing, and
for Qwen4-Exp a residual of several streams (hyper-connections, which take the norms' places) and
hashed n-gram embeddings added to it before some layers.
Module names equal the checkpoint's tensor names after the family's `sanitize`, so dense weights
load by name.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from ..kernels.cpu_step import gemv, takes_gemv
from ..layers.attention import Attention
from ..layers.deltanet import GatedDeltaNet
from ..layers.fused import project
from ..layers.hyper import HyperConnection
from ..layers.int8_linear import dequantized_matmul
from ..layers.mlp import MLP
from ..layers.norm import RMSNorm
from ..layers.ple import PendingRows, PerLayerEmbedding
from ..layers.rotary import RotaryEmbedding
from ..moe.block import MoEBlock, MoESpec
from ..layers.state import SequenceState
from .args import ModelArgs
from .context import StepContext


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int, rotary: RotaryEmbedding):
        super().__init__()
        spec, H, eps, zero_centred = args.layer(index), args.hidden_size, args.rms_norm_eps, args.ZERO_CENTRED_NORMS
        hyper = args.hyper_connections()
        self.index = index
        self.is_linear = spec.mixer == "linear_attention"
        if self.is_linear:
            d = args.deltanet()
            self.linear_attn = GatedDeltaNet(H, d.k_heads, d.v_heads, d.k_dim, d.v_dim, d.conv_kernel, eps, d.output_gate)
        else:
            self.self_attn = Attention(H, args.attention(), eps, zero_centred, spec.window, rotary)
        self.mlp = MoEBlock(H, spec.mlp) if isinstance(spec.mlp, MoESpec) else MLP(H, spec.mlp)
        self.ple = None if spec.ple is None else PerLayerEmbedding(H, hyper.streams, spec.ple, eps, zero_centred)
        self.hyper = hyper is not None
        if self.hyper:
            self.attn_hyper_connection = HyperConnection(H, hyper, eps, zero_centred)
            self.mlp_hyper_connection = HyperConnection(H, hyper, eps, zero_centred)
        else:
            self.input_layernorm = RMSNorm(H, eps, zero_centred)
            self.post_attention_layernorm = RMSNorm(H, eps, zero_centred)

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.is_linear else self.self_attn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list, ctx: StepContext) -> torch.Tensor:
        """x [T, H] (hyper-connections: [T, streams * H]): the step's tokens, each sequence's (one
        cache each) after the one before. A layer with per-layer embeddings collects its n-gram
        rows from ctx.ngram_rows (their reads started with the step)."""
        T = x.shape[0]
        if self.ple is not None:
            with ctx.section("ngram_wait"):  # what the reads add to the step: their time not overlapped
                rows = ctx.ngram_rows[self.index].result()
            with ctx.section("mixer"):
                x = x + self.ple(x, rows, [state.ngrams[self.index] for state in ctx.states], ctx.slices(T))
        with ctx.section("mixer"):
            if self.hyper:
                (h, shares), norm = self.attn_hyper_connection(x), None
            else:  # the mixer norms its input: its one-call CPU decode step does it inside
                h, norm = x, self.input_layernorm
            # Every matmul runs on the whole batch at once, the mixers' state per sequence: the
            # routed experts read each expert the batch needs once.
            if self.is_linear:
                h = self.linear_attn(h, caches, ctx.slices(T), norm, ctx.active)
            else:
                h = self.self_attn(h, cos, sin, caches, ctx, norm)
            if self.hyper:
                x = HyperConnection.inject(x, h, shares)
                h, shares = self.mlp_hyper_connection(x)
        if self.hyper:  # the MLP's output alone (added to zeros), then a share of it to each stream
            return HyperConnection.inject(x, self._mlp(h, h.new_zeros(h.shape), ctx), shares)
        if (out := ctx.moe_step(self.index, x, h)) is not None:  # the rest of the layer in one call
            return out
        with ctx.section("mixer"):
            x, h = self.post_attention_layernorm.add(x, h)  # x + h and its norm
        return self._mlp(h, x, ctx)

    def _mlp(self, h: torch.Tensor, residual: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """residual + the MLP of its normed input h."""
        if not isinstance(self.mlp, MoEBlock):
            with ctx.section("dense_mlp"):
                return residual + self.mlp(h)
        with ctx.section("routing"):  # the router's matmul also computes the shared expert's inputs
            logits, shared_inputs = self.mlp.project(h)
            weights, ids = self.mlp.route(logits)
        with ctx.section("shared_expert"):
            residual = self.mlp.add_shared(residual, shared_inputs)
        if (guess := ctx.guess_next(self.index, residual)) is not None:
            with ctx.section("routing"):  # one read of this layer's routing brings the next layer's guess too
                ids = torch.cat([ids, guess], dim=-1)
        return ctx.run_experts(self.index, h, ids, weights, residual=residual)

    def new_state(self, dtype: torch.dtype, device) -> object:
        """This layer's mixer's part of a sequence's state: a KV cache, or the DeltaNet's conv and recurrent state."""
        return self.mixer.new_state(dtype, device)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, eps, zero_centred = args.hidden_size, args.rms_norm_eps, args.ZERO_CENTRED_NORMS
        self.hyper = args.hyper_connections()
        self.rotary = RotaryEmbedding(*args.rotary(), args.yarn())
        self.model = nn.Module()
        # Built on the meta device and always loaded: a given (empty) weight skips nn.Embedding's
        # random init, whose normal_ on the meta device imports torch._dynamo (1.2 s at every start).
        self.model.embed_tokens = nn.Embedding(args.vocab_size, H, _weight=torch.empty(args.vocab_size, H))
        self.model.layers = nn.ModuleList(DecoderLayer(args, i, self.rotary) for i in range(args.num_hidden_layers))
        if self.hyper is not None:  # the streams' last mix is the head's input: no final norm
            self.model.hyper_connection_mixer = HyperConnection(H, self.hyper, eps, zero_centred, injects=False)
        else:
            self.model.norm = RMSNorm(H, eps, zero_centred)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(H, args.vocab_size, bias=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def fuse_projections(self) -> None:
        """Run the projections that read one input as one matmul (layers/fused.py). Once, after the
        weights are loaded onto their device (and after any Int8Linear swap)."""
        for layer in self.layers:
            layer.mixer.in_proj.fuse()
            layer.mlp.in_proj.fuse()

    @property
    def ngram_layers(self) -> dict[int, PerLayerEmbedding]:
        """The layers with per-layer n-gram embeddings, by index."""
        return {i: layer.ple for i, layer in enumerate(self.layers) if layer.ple is not None}

    def attach_ngram_tables(self, fetch: Callable[[int, torch.Tensor], PendingRows]) -> None:
        """Read layer i's n-gram rows with fetch(i, rows) (the engine's: from their files on disk)."""
        for i, ple in self.ngram_layers.items():
            ple.ple_embedding.fetch_rows = functools.partial(fetch, i)

    def graph_obstacle(self) -> str | None:
        """Why a decode step of this model cannot be recorded as CUDA graphs (runtime/graphs.py), or
        None: a recording replays fixed shapes, and hands the host only the routed experts' calls."""
        reasons = []
        if any(hasattr(layer.mixer, "indexer") for layer in self.layers):
            reasons.append("QSA's block selection changes shape as blocks complete")
        if self.ngram_layers:
            reasons.append("the host reads the n-gram rows at every step")
        return ", and ".join(reasons) or None

    def new_state(self, dtype: torch.dtype, device) -> SequenceState:
        ngrams = {i: layer.ple.new_state(dtype, device) for i, layer in enumerate(self.layers) if layer.ple is not None}
        return SequenceState([layer.new_state(dtype, device) for layer in self.layers], ngrams)

    def start_ngram_reads(self, ids: torch.Tensor, ctx: StepContext) -> None:
        """Hash the n-grams of the step's ids [T] and start reading their rows into ctx.ngram_rows
        (layers with per-layer embeddings; their histories advance). Before `forward`, from the ids
        on the host (a prompt's, the sampler's): no layer then waits for the GPU to hand them back,
        and the reads overlap the layers before the first PLE layer."""
        with ctx.section("ngram_start"):
            ctx.ngram_rows = {i: ple.start(ids, [state.ngrams[i] for state in ctx.states], ctx.slices(ids.shape[0]))
                              for i, ple in self.ngram_layers.items()}

    def forward(self, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """ids [T] continue the sequences in ctx.states, each's tokens after the one before (their
        caches written in place; the caller advances their positions; with per-layer embeddings,
        the caller has started the step's n-gram reads: start_ngram_reads) -> logits [T, vocab]
        (fp32), or with ctx.last_only each sequence's last position's [sequences, vocab]."""
        T = ids.shape[0]
        cos, sin = self.rotary(ctx.positions(T, ids.device))
        x = self.model.embed_tokens(ids)
        if self.hyper is not None:
            x = x.repeat(1, self.hyper.streams)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, [state.layers[i] for state in ctx.states], ctx)
        with ctx.section("head"):
            return self.logits(x[ctx.last_positions(T)] if ctx.last_only else x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.norm(x) if self.hyper is None else self.model.hyper_connection_mixer(x)[0]
        if self.args.tie_word_embeddings:  # the embedding table, kept 16-bit even with --dense-bits 8
            table = self.model.embed_tokens.weight
            if takes_gemv(x, table):  # a decode step's rows on the CPU
                return gemv(x, table)
            if table.dtype != x.dtype:  # bf16 in an fp32 CPU engine (layers/int8_linear.Bf16Embedding)
                return dequantized_matmul(x, table)
            return (x @ table.t()).float()
        return project(self.lm_head, x).float()  # an nn.Linear, or an Int8Linear with --dense-bits 8
