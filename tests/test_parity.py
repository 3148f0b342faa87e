"""At 16-bit our logits match transformers' (the reference) on tiny random models of every family."""

import pytest
import torch

from flashmoe.convert import convert
from flashmoe.engine import Engine, EngineConfig
from flashmoe.runtime.sampling import SamplingParams

from .conftest import FAMILY_CONFIGS, build_hf_model

PROMPT_LEN, DECODE_STEPS = 24, 16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def reference_run(model, prompt: torch.Tensor, steps: int):
    """transformers: prompt logits, then greedy decode with its own cache; per-step logits."""
    with torch.no_grad():
        out = model(prompt[None], use_cache=True)
        prompt_logits = out.logits[0]
        step_logits, tokens = [], []
        token = int(prompt_logits[-1].argmax())
        for _ in range(steps):
            tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            step_logits.append(out.logits[0, -1])
            token = int(out.logits[0, -1].argmax())
    return prompt_logits, torch.stack(step_logits), tokens


def our_run(engine: Engine, prompt: torch.Tensor, steps: int):
    state = engine.new_state()
    with torch.inference_mode():
        prompt_logits = engine.forward(prompt, state, last_only=False)
        step_logits, tokens = [], []
        token = int(prompt_logits[-1].argmax())
        for _ in range(steps):
            tokens.append(token)
            logits = engine.forward([token], state)
            step_logits.append(logits[-1])
            token = int(logits[-1].argmax())
    return prompt_logits, torch.stack(step_logits), tokens


def check_parity(hf_dir, reference, tmp_path, prompt_len=PROMPT_LEN, bits: int | None = 16):
    packed = tmp_path / "packed"
    convert(hf_dir, packed, bits=bits)
    engine = Engine(packed, EngineConfig(dtype="float32"))
    prompt = torch.randint(0, 256, (prompt_len,), generator=torch.Generator().manual_seed(1))
    ref_prompt, ref_steps, ref_tokens = reference_run(reference, prompt, DECODE_STEPS)
    got_prompt, got_steps, got_tokens = our_run(engine, prompt, DECODE_STEPS)
    assert rel_err(got_prompt, ref_prompt) <= 1e-4
    assert rel_err(got_steps, ref_steps) <= 1e-4
    assert got_tokens == ref_tokens
    return engine, prompt


def test_released_vlm_layout_matches_transformers(tiny_vlm, tmp_path):
    engine, prompt = check_parity(*tiny_vlm, tmp_path)
    # The generate loop (greedy) produces the same tokens as the model called directly.
    gen = engine.generate(prompt.tolist(), SamplingParams(max_tokens=DECODE_STEPS, temperature=0))
    _, _, ref_tokens = reference_run(tiny_vlm[1], prompt, DECODE_STEPS)
    assert [s.token for s in gen] == ref_tokens


def test_text_model_with_tied_embeddings_matches_transformers(tmp_path):
    ref = build_hf_model("text", tmp_path / "hf", seed=2, tie_word_embeddings=True)
    check_parity(tmp_path / "hf", ref, tmp_path)


def test_qwen3_next_matches_transformers(tmp_path):
    ref = build_hf_model("next", tmp_path / "hf", seed=3)
    check_parity(tmp_path / "hf", ref, tmp_path)


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_family_matches_transformers(model_type, tmp_path):
    """Each family in its release layout (as transformers saves it), prompt and decode, against its
    transformers model."""
    ref = build_hf_model(model_type, tmp_path / "hf", seed=6)
    check_parity(tmp_path / "hf", ref, tmp_path)


def test_fused_expert_layout_converts_identically(tiny_vlm, tmp_path):
    """Per-expert tensors re-saved as fused [E, 2I, H] / [E, H, I] give the same packed experts."""
    from flashmoe.formats.safetensors import Checkpoint, save_file

    hf_dir, reference = tiny_vlm
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    tensors = {}
    with Checkpoint(hf_dir) as ckpt:
        names = ckpt.names()
        for name in names:
            if ".mlp.experts." not in name:
                tensors[name] = ckpt.read(name)
        for layer in range(4):
            p = f"model.language_model.layers.{layer}.mlp.experts."
            gate = [ckpt.read(f"{p}{e}.gate_proj.weight") for e in range(8)]
            up = [ckpt.read(f"{p}{e}.up_proj.weight") for e in range(8)]
            tensors[p + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
            tensors[p + "down_proj"] = torch.stack([ckpt.read(f"{p}{e}.down_proj.weight") for e in range(8)])
    tensors["mtp.layers.0.mlp.gate.weight"] = torch.zeros(8, 64, dtype=torch.bfloat16)  # skipped
    save_file(tensors, fused_dir / "model.safetensors")
    for f in hf_dir.iterdir():
        if f.suffix != ".safetensors":
            (fused_dir / f.name).write_bytes(f.read_bytes())
    check_parity(fused_dir, reference, tmp_path)
    a = (tmp_path / "packed" / "experts" / "layer_002.bin").read_bytes()
    convert(hf_dir, tmp_path / "split", bits=16)
    assert a == (tmp_path / "split" / "experts" / "layer_002.bin").read_bytes()


def test_prefill_equals_token_by_token(packed16):
    """Chunked prefill (several chunks of the delta rule) gives the logits of one-token steps."""
    engine = Engine(packed16, EngineConfig(dtype="float32"))
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(5))
    whole = engine.forward(ids, engine.new_state(), last_only=False)
    state = engine.new_state()
    steps = torch.cat([engine.forward(ids[i : i + 1], state) for i in range(len(ids))])
    assert rel_err(whole, steps) <= 1e-4


def test_long_prompt_matches_transformers(tiny_vlm, tmp_path):
    """A 150-token prompt crosses the 64-token chunks of the delta rule on both sides."""
    check_parity(*tiny_vlm, tmp_path, prompt_len=150)


def unpack_to_hf(packed, out):
    """A packed model back in Hugging Face layout: dense tensors as stored, experts dequantized to
    bf16 as fused [E, 2I, H] / [E, H, I] tensors. transformers then loads exactly the weights our
    16-bit conversion of it serves."""
    from flashmoe.formats.packed import Manifest
    from flashmoe.formats.safetensors import SafetensorsFile, save_file

    out.mkdir()
    manifest = Manifest.load(packed)
    with SafetensorsFile(packed / manifest.dense_file) as f:
        tensors = {name: f.read(name) for name in f.tensors}
    rs = manifest.layout.record_size
    for ef in manifest.expert_files:
        data = torch.frombuffer(bytearray((packed / ef.file).read_bytes()), dtype=torch.uint8)
        weights = [manifest.layout.weights(data[e * rs : (e + 1) * rs], torch.bfloat16) for e in range(ef.num_experts)]
        p = f"model.layers.{ef.layer}.mlp.experts."
        tensors[p + "gate_up_proj"] = torch.stack([w[0] for w in weights])
        tensors[p + "down_proj"] = torch.stack([w[1] for w in weights])
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_bytes((packed / "config.json").read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((packed / name).read_bytes())


def test_trained_demo_model_matches_transformers(tmp_path):
    """The shipped trained model (real, skewed routing; see docs/QUALITY.md): its weights, experts
    dequantized, give transformers' logits and greedy tokens on real text."""
    import transformers

    from flashmoe.demo import DEMO_MODEL, HELDOUT_TEXT
    from flashmoe.tokenizer import Tokenizer

    unpack_to_hf(DEMO_MODEL, tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = Tokenizer.from_dir(DEMO_MODEL).encode(HELDOUT_TEXT.read_text()[:4000])[:96]
    packed = tmp_path / "packed"
    convert(tmp_path / "hf", packed, bits=16)
    engine = Engine(packed, EngineConfig(dtype="float32"))
    prompt = torch.tensor(ids)
    ref_prompt, ref_steps, ref_tokens = reference_run(reference, prompt, DECODE_STEPS)
    got_prompt, got_steps, got_tokens = our_run(engine, prompt, DECODE_STEPS)
    assert rel_err(got_prompt, ref_prompt) <= 1e-4
    assert rel_err(got_steps, ref_steps) <= 1e-4
    assert got_tokens == ref_tokens
    # The model predicts held-out code well (a random model would be near ln(vocab) = 9 nats).
    nll = torch.nn.functional.cross_entropy(ref_prompt[:-1], prompt[1:])
    assert nll < 3.0
