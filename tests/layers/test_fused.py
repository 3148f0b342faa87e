"""Projections that read one input run as one matmul (layers/fused.py): the logits of one matmul
per projection, no weight held twice, checkpoint names kept, and the matmuls it saves."""

import itertools
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from flashmoe import kernels
from flashmoe.convert import convert
from flashmoe.engine import Engine, EngineConfig
from flashmoe.layers.fused import Projections
from flashmoe.moe.block import MoEBlock
from flashmoe.models.transformer import Model

from tests.conftest import build_hf_model
from tests.test_parity import our_run, rel_err

# F.linear calls per layer in one decode step: (one per projection, fused 16-bit, fused --dense-bits 8).
# With int8 the 16-bit gates (DeltaNet b/a; router and shared_expert_gate) are a matmul of their own.
MATMULS = {
    "deltanet+moe": (10, 4, 6),
    "attention+moe": (9, 4, 5),
    "deltanet+mlp": (8, 4, 5),  # Qwen3-Next's dense-MLP layer
}


@pytest.fixture(scope="module", params=["text", "next"])
def packed(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"fused-{request.param}")
    build_hf_model(request.param, d / "hf", seed=5)
    convert(d / "hf", d / "packed", bits=16)
    return d / "packed"


def engines(packed, dense_bits: int) -> tuple[Engine, Engine]:
    """(fused, unfused) fp32 engines of the packed model."""
    fused = Engine(packed, EngineConfig(dtype="float32", dense_bits=dense_bits))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Model, "fuse_projections", lambda self: None)
        return fused, Engine(packed, EngineConfig(dtype="float32", dense_bits=dense_bits))


@pytest.mark.parametrize("dense_bits", [16, 8])
def test_fused_projections_give_the_logits_of_separate_ones(packed, dense_bits):
    fused, unfused = engines(packed, dense_bits)
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(3))
    got_prompt, got_steps, got_tokens = our_run(fused, prompt, 8)
    ref_prompt, ref_steps, ref_tokens = our_run(unfused, prompt, 8)
    # fp32 sums in another order (a wider matmul may block K differently), carried through the layers;
    # a wrong split or missing scale moves the logits by O(1)
    assert rel_err(got_prompt, ref_prompt) <= 1e-5
    assert rel_err(got_steps, ref_steps) <= 1e-5
    assert got_tokens == ref_tokens


def storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(storages.values())


@pytest.mark.parametrize("dense_bits", [16, 8])
def test_fused_weights_are_row_views_of_one_tensor(packed, dense_bits):
    """No weight is held twice, the checkpoint names stay, and the router alone (the prefetch
    guess calls it) is the fused matmul's first columns."""
    fused, unfused = engines(packed, dense_bits)
    assert fused.model.state_dict().keys() == unfused.model.state_dict().keys()
    assert storage_bytes(fused.model) == storage_bytes(unfused.model)
    groups = 0
    for projections in (m.in_proj for m in fused.model.modules() if isinstance(getattr(m, "in_proj", None), Projections)):
        layers = iter(projections.layers())
        for group, widths in projections.fused or []:
            for layer in itertools.islice(layers, len(widths)):
                for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers()):
                    assert t.untyped_storage().data_ptr() == getattr(group, name).untyped_storage().data_ptr()
            groups += len(widths) > 1
    assert groups >= 2 * len(fused.model.layers)
    moe = next(layer.mlp for layer in fused.model.layers if isinstance(layer.mlp, MoEBlock))
    h = torch.randn(3, fused.args.hidden_size)
    assert torch.allclose(moe.gate(h), moe.in_proj(h)[0], rtol=1e-6, atol=1e-6)


class LinearCalls(TorchFunctionMode):
    """Counts F.linear calls (nn.Linear, and Int8Linear's CPU path) per decoder layer."""

    def __init__(self, model):
        super().__init__()
        self.layer, self.calls = None, Counter()
        self.hooks = [hook for i, layer in enumerate(model.layers) for hook in (
            layer.register_forward_pre_hook(lambda m, args, i=i: setattr(self, "layer", i)),
            layer.register_forward_hook(lambda m, args, out: setattr(self, "layer", None)),  # not the lm_head's
        )]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.calls[self.layer] += 1
        return func(*args, **(kwargs or {}))


def matmuls_per_layer_kind(engine: Engine) -> dict[str, int]:
    """F.linear calls of each kind of layer in one decode step (the CPU's numba GEMV turned off: it
    takes the fused projections' decode rows one call each, as F.linear does)."""
    model, state = engine.model, engine.new_state()
    engine.forward([1, 2, 3], state)
    counter = LinearCalls(model)
    with counter, pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "use_cpu_kernels", lambda x: False)
        engine.forward([4], state)
    for h in counter.hooks:
        h.remove()
    kinds = {}
    for i, layer in enumerate(model.layers):
        kind = ("deltanet" if layer.is_linear else "attention") + ("+moe" if isinstance(layer.mlp, MoEBlock) else "+mlp")
        assert kinds.setdefault(kind, counter.calls[i]) == counter.calls[i]
    return kinds


@pytest.mark.parametrize("dense_bits", [16, 8])
def test_matmuls_per_decode_step(packed, dense_bits):
    fused, unfused = engines(packed, dense_bits)
    got_fused, got_unfused = matmuls_per_layer_kind(fused), matmuls_per_layer_kind(unfused)
    assert got_unfused == {kind: MATMULS[kind][0] for kind in got_unfused}
    assert got_fused == {kind: MATMULS[kind][1 if dense_bits == 16 else 2] for kind in got_fused}
