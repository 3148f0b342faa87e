import pytest
import torch

from flashmoe.convert import convert
from flashmoe.engine import ContextLengthError, Engine, EngineConfig
from flashmoe.generation import _StopStrings
from flashmoe.runtime.sampling import SamplingParams



@pytest.fixture(scope="module")
def engine(packed16):
    return Engine(packed16, EngineConfig(dtype="float32"))


def test_stop_strings_hold_back_possible_prefixes():
    s = _StopStrings(["STOP", "\n\n"])
    assert s.push("hello ST") == ("hello ", False)
    assert s.push("O") == ("", False)
    assert s.push("Px") == ("", True)
    t = _StopStrings(["END"])
    assert t.push("abE") == ("ab", False)
    assert t.flush("N") == "EN"  # at the end, what was held back is released


def test_generate_streams_text_that_matches_the_tokens(engine):
    gen = engine.generate("Hello", SamplingParams(max_tokens=12, temperature=0.8, seed=3))
    steps = list(gen)
    assert 1 <= len(steps) <= 12 and steps[-1].finish_reason in ("stop", "length")
    tokens = [s.token for s in steps if s.token not in engine.stop_ids]
    assert "".join(s.text for s in steps) == engine.tokenizer.decode(tokens)
    assert gen.stats.prompt_tokens == 5 and gen.stats.decode_tokens == len(steps) - 1
    again = [s.token for s in engine.generate("Hello", SamplingParams(max_tokens=12, temperature=0.8, seed=3))]
    assert again == [s.token for s in steps]  # the seed makes sampling reproducible


def test_stop_string_ends_generation_without_emitting_it(engine):
    free = "".join(s.text for s in engine.generate("abc", SamplingParams(max_tokens=20, temperature=0)))
    stop = free[3:5]
    steps = list(engine.generate("abc", SamplingParams(max_tokens=20, temperature=0, stop=[stop])))
    assert steps[-1].finish_reason == "stop"
    assert "".join(s.text for s in steps) == free[: free.index(stop)]


def test_ignore_eos_runs_to_max_tokens(engine, monkeypatch):
    monkeypatch.setattr(engine, "stop_ids", set(range(engine.args.vocab_size)))  # every token ends a sequence
    assert len(list(engine.generate([1, 2, 3], SamplingParams(max_tokens=5)))) == 1
    steps = list(engine.generate([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True)))
    assert len(steps) == 5 and steps[-1].finish_reason == "length"


def test_prompt_past_the_context_is_a_clear_error(engine):
    with pytest.raises(ContextLengthError, match="context length is 512"):
        engine.generate([1] * 600)
    gen = engine.generate([1] * 505, SamplingParams(max_tokens=50, temperature=0))
    assert len(list(gen)) <= 7  # clamped to the context


def test_continuing_a_state_equals_one_long_prompt(engine):
    first = engine.new_state()
    list(engine.generate([5, 6, 7], SamplingParams(max_tokens=1), state=first))
    cont = [s.token for s in engine.generate([8, 9], SamplingParams(max_tokens=6), state=first)]
    whole = [s.token for s in engine.generate([5, 6, 7, 8, 9], SamplingParams(max_tokens=6))]
    assert cont == whole


def test_logits_processor_constrains_sampling(engine):
    def only_b(generated, logits):
        out = torch.full_like(logits, float("-inf"))
        out[ord("b")] = 0
        return out

    steps = list(engine.generate("x", SamplingParams(max_tokens=5, temperature=1.0, seed=0), logits_processor=only_b))
    assert "".join(s.text for s in steps) == "bbbbb"


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_track_16_bit(default_init_16, bits):
    """8-bit: greedy tokens identical to 16-bit. 4-bit: next-token top-1 agreement measured and bounded."""
    d, engine = default_init_16
    convert(d / "hf", d / f"q{bits}", bits=bits, group_size=32)
    quantized = Engine(d / f"q{bits}", EngineConfig(dtype="float32"))
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (16,), generator=g) for _ in range(8)]
    if bits == 8:
        for p in prompts[:3]:
            ref = [s.token for s in engine.generate(p.tolist(), SamplingParams(max_tokens=12))]
            assert [s.token for s in quantized.generate(p.tolist(), SamplingParams(max_tokens=12))] == ref
        return
    agree = total = 0
    with torch.inference_mode():
        for p in prompts:
            a = engine.forward(p, engine.new_state(), last_only=False).argmax(-1)
            b = quantized.forward(p, quantized.new_state(), last_only=False).argmax(-1)
            agree, total = agree + int((a == b).sum()), total + len(p)
    assert agree / total >= 0.9  # measured 0.977 (125/128) with seed 0


# -- several sequences in one step ------------------------------------------------------------------

PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42, 43, 44, 45, 46, 47, 48], [200, 17, 3]]


def _alone(engine: Engine, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    state, logits, tokens = engine.new_state(), [], []
    out = engine.forward(prompt, state)
    for _ in range(steps):
        logits.append(out[-1])
        tokens.append(int(out[-1].argmax()))
        out = engine.forward([tokens[-1]], state)
    return logits, tokens


@pytest.fixture(scope="module", params=["qwen3_5_moe", "qwen3_moe", "minimax_m2", "glm4_moe", "gpt_oss"])
def family_engine(request, packed16, tmp_path_factory):
    """A 16-bit fp32 engine of each family's tiny random model (Qwen3.5's with DeltaNet layers)."""
    from .conftest import build_hf_model

    if request.param == "qwen3_5_moe":
        return Engine(packed16, EngineConfig(dtype="float32", threads=1))
    d = tmp_path_factory.mktemp(request.param)
    build_hf_model(request.param, d / "hf", seed=13)
    convert(d / "hf", d / "q16", bits=16)
    return Engine(d / "q16", EngineConfig(dtype="float32", threads=1))


def test_a_batch_of_different_prompts_gives_what_each_gives_alone(family_engine):
    """Prompts of 5, 9 and 3 tokens prefilled in one step, then decoded in steps of one token each:
    every sequence's logits and greedy tokens as when it runs alone."""
    engine, steps = family_engine, 3
    alone = [_alone(engine, p, steps) for p in PROMPTS]
    states = [engine.new_state() for _ in PROMPTS]
    out, tokens = engine.forward_batch(PROMPTS, states), [[] for _ in PROMPTS]
    for step in range(steps):
        for i, (logits, _) in enumerate(alone):
            assert float((out[i] - logits[step]).norm() / logits[step].norm()) < 1e-5, (i, step)
            tokens[i].append(int(out[i].argmax()))
        out = engine.forward_batch([[t[-1]] for t in tokens], states)
    assert tokens == [t for _, t in alone]
    assert [s.position for s in states] == [len(p) + steps for p in PROMPTS]


def check_batched_decode(engine: Engine, steps: int = 3, prompts: list[list[int]] | None = None) -> None:
    """Sequences (two by default) prefilled one by one, then decoded in batched steps: as each alone."""
    prompts = prompts or [PROMPTS[2], PROMPTS[0]]
    alone = [_alone(engine, p, steps) for p in prompts]
    # Prefilled one by one: a batched prefill past KERNEL_MAX_TOKENS takes another expert path
    # (PyTorch's), whose rounding can flip a near-tied routing choice.
    states = [engine.new_state() for _ in prompts]
    out = torch.cat([engine.forward(p, s) for p, s in zip(prompts, states)])
    for step in range(steps):
        for i, (logits, tokens) in enumerate(alone):
            # The batch's matmuls, conv and recurrence round differently from one sequence's, and the
            # recurrent state carries it forward: measured up to 1.4e-4 by the third step
            assert float((out[i].cpu() - logits[step].cpu()).norm() / logits[step].cpu().norm()) < 1e-3, (i, step)
            assert int(out[i].argmax()) == tokens[step]
        out = engine.forward_batch([[t[step]] for _, t in alone], states)


def test_a_batch_of_quantized_experts_gives_what_each_gives_alone(packed4):
    """4-bit records through the numba kernel, several tokens at once (tests/test_gpu.py: the GPU path)."""
    check_batched_decode(Engine(packed4, EngineConfig(dtype="float32", threads=1)))


def test_a_batched_step_reads_each_expert_once(packed16, monkeypatch):
    """One decode step of three sequences: each layer loads the union of their routed experts, each once."""
    engine = Engine(packed16, EngineConfig(dtype="float32", threads=1))
    states = [engine.new_state() for _ in PROMPTS]
    engine.forward_batch(PROMPTS, states)
    routed, loaded = {}, {}
    store_load = engine.store.load
    monkeypatch.setattr(engine.store, "load", lambda layer, experts, *a, **kw: (
        loaded.setdefault(layer, []).extend(experts), store_load(layer, experts, *a, **kw))[1])
    for layer in engine.moe_layers:  # each layer's routed experts, wrapped to record the ids they get
        engine.experts[layer] = lambda x, ids, w, residual=None, _s=engine.experts[layer], _l=layer: (
            routed.__setitem__(_l, set(ids.flatten().tolist())), _s(x, ids, w, residual))[1]
    engine.forward_batch([[1], [2], [3]], states)
    assert routed and all(sorted(loaded[layer]) == sorted(routed[layer]) for layer in routed)
    assert any(len(routed[layer]) > engine.top_k for layer in routed)  # the tokens chose different experts


def test_forward_batch_refuses_what_is_not_a_batch(engine):
    state = engine.new_state()
    for ids, states in [([[1]], [state, engine.new_state()]), ([[1], []], [state, engine.new_state()]), ([[1], [2]], [state, state])]:
        with pytest.raises(ValueError, match="one non-empty list of ids for each of several distinct states"):
            engine.forward_batch(ids, states)
    with pytest.raises(ContextLengthError, match="exceed the model's context length"):
        engine.forward_batch([[1] * (engine.context_length + 1)], [state])


def test_a_batched_generation_prefills_a_slice_at_a_time(packed16, monkeypatch):
    """Batched, a long prompt is prefilled in requests of PREFILL_SLICE tokens, and the generation
    then decodes what it decodes unbatched (fp32); its forwards are the caller's."""
    from flashmoe import generation
    from flashmoe.generation import ForwardRequest

    monkeypatch.setattr(generation, "PREFILL_SLICE", 4)
    engine = Engine(packed16, EngineConfig(dtype="float32", threads=1))
    prompt, params = list(range(3, 13)), SamplingParams(max_tokens=4, temperature=0)
    plain = [s.token for s in engine.generate(prompt, params)]
    tokens, slices, steps = [], [], 0
    for item in engine.generate(prompt, params, batched=True):
        if isinstance(item, ForwardRequest):
            if item.prefill:
                slices.append(item.tokens)
            else:
                steps += 1
            item.logits = item.alone()
        else:
            tokens.append(item.token)
    assert slices == [prompt[:4], prompt[4:8], prompt[8:]] and steps == 3  # a step between every two tokens
    assert tokens == plain


def test_auto_dtype_is_float32_on_the_cpu_with_the_projections_kept_16_bit(engine):
    assert EngineConfig().torch_dtype() == (torch.float32, "the CPU's default")
    assert EngineConfig(device="cuda").torch_dtype() == (torch.bfloat16, "the GPU's default")
    assert EngineConfig(dtype="bfloat16").torch_dtype() == (torch.bfloat16, "--dtype")
    # an fp32 CPU engine holds the file's bf16 projections as they are: half the bytes of fp32
    projections = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "scale")]
    assert projections and all(m.weight.dtype == torch.bfloat16 for m in projections)


def test_auto_device_takes_the_cpu_where_there_is_no_gpu_and_says_why(packed16, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine = Engine(packed16, EngineConfig(device="auto"))
    assert engine.device.type == "cpu" and engine.config.device == "cpu" and engine.dtype == torch.float32
    assert engine.choices[:2] == ["cpu (auto: no CUDA GPU)", "float32 (the CPU's default)"]
    with pytest.raises(ValueError, match="--preload is for the GPU path"):  # a GPU-only option, and no GPU
        Engine(packed16, EngineConfig(device="auto", preload=True))


def test_a_batched_steps_time_is_charged_to_each_generation(engine):
    """Two batched generations whose forwards the caller runs together: each one's prefill and
    decode time is what the caller says the batch took, per forward (the scheduler's timing)."""
    from flashmoe.generation import ForwardRequest

    params = SamplingParams(max_tokens=4, temperature=0)
    runs = [engine.generate(p, params, batched=True) for p in PROMPTS[:2]]
    streams = [iter(g) for g in runs]
    steps = 0
    while True:
        requests = [next((i for i in s if isinstance(i, ForwardRequest)), None) for s in streams]
        if any(r is None for r in requests):
            break
        logits = engine.forward_batch([r.tokens for r in requests], [r.state for r in requests])
        for i, r in enumerate(requests):
            r.logits, r.seconds = logits[i : i + 1], 0.25
        steps += not requests[0].prefill
    assert steps == 3  # the prompts' prefill, then a step between every two of the 4 tokens
    for g in runs:
        assert g.stats.prefill_seconds == 0.25
        assert g.stats.decode_tokens == 3 and 0.75 <= g.stats.decode_seconds < 0.75 + 0.5  # + its own sampling


def test_a_released_state_recomputed_from_its_tokens_continues_as_before(engine):
    """Preemption's two halves: release frees the caches and keeps the tokens; recompute prefills
    them again into the same state object, which then decodes what it would have."""
    state = engine.new_state()
    engine.forward([5, 6, 7, 8, 9, 10], state)
    engine.forward([11], state)
    kept = state.clone()
    engine.release(state)
    assert state.layers == [] and state.tokens == list(range(5, 12))
    engine.recompute(state)
    assert state.position == kept.position == 7
    got, want = engine.forward([12], state), engine.forward([12], kept)
    assert float((got - want).norm() / want.norm()) < 1e-5  # a prefill's fp32 sums against steps'
