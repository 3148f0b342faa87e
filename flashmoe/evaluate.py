"""What quantization and expert pruning (a smaller K) cost a model: the measures behind `flashmoe eval`.

- Perplexity on held-out text, teacher-forced in non-overlapping windows: the loss the model was
  trained to lower, comparable across conversions of one model (same tokenizer, same windows).
- Against a reference (the same model at 16 bits, or at its own K): KL(reference || model) of the
  next-token distributions and top-1 agreement over the same windows. More sensitive than
  perplexity, and meaningful even for a random-weight model, whose perplexity says nothing.
- Structured-output validity: greedy answers to prompts that call for a tool call or a JSON
  object, unconstrained and under the server's grammars, so a quantized model's format errors show
  and the grammar's guarantee is checked end to end.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .engine import Engine
from .runtime.sampling import SamplingParams
from .tool_calls import TOOL_CALL_OPEN, parse_output, tool_schemas

ProgressCallback = Callable[[int, int], None]  # (done, total), after each window or prompt

# Rows of log-probabilities handled at once for the KL: bounds the temporaries to a few [64, vocab].
_KL_ROWS = 64


@dataclass(slots=True)
class Perplexity:
    tokens: int  # positions scored
    windows: int
    nll: float  # mean negative log-likelihood, nats per token

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@dataclass(slots=True)
class Comparison:
    model: Perplexity
    reference: Perplexity  # the reference's own, on the same windows (it comes for free)
    kl: float  # mean KL(reference || model), nats per token
    top1: float  # share of positions where the two models' most likely next token is the same


@dataclass(slots=True)
class Prompt:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None  # given: a tool call is expected; else a JSON object


@dataclass(slots=True)
class Validity:
    tool_valid: int = 0
    tool_total: int = 0
    json_valid: int = 0
    json_total: int = 0
    outputs: list[str] = field(default_factory=list)  # the answers, in prompt order, to see what went wrong


def run(engine: Engine, reference: Engine | None, text: str, prompts: list[Prompt], window: int = 512,
        max_tokens: int | None = None, gen_tokens: int = 128,
        track: Callable[[str], ProgressCallback | None] = lambda description: None) -> dict[str, Any]:
    """Everything `flashmoe eval` reports, as plain data for its table and JSON: perplexity (and
    the comparison, given a reference), then validity unconstrained and constrained (given prompts).
    `track(description)` gives the progress callback of each phase."""
    report: dict[str, Any] = {"model": str(engine.dir), **_model_fields(engine)}
    seconds: dict[str, float] = {}
    ids = engine.tokenizer.encode(text)
    t0 = time.perf_counter()
    if reference is None:
        ppl = perplexity(engine, ids, window, max_tokens, track("perplexity"))
    else:
        cmp = compare(engine, reference, ids, window, max_tokens, track("perplexity and comparison"))
        ppl = cmp.model
        report["reference"] = {"model": str(reference.dir), **_model_fields(reference), "ppl": cmp.reference.ppl}
        report.update(kl=cmp.kl, top1=cmp.top1)
    report.update(window=window, windows=ppl.windows, tokens=ppl.tokens, nll=ppl.nll, ppl=ppl.ppl)
    seconds["scoring"] = time.perf_counter() - t0
    report["validity"] = {}
    for mode in ("unconstrained", "constrained") if prompts else ():
        t0 = time.perf_counter()
        validity = structured_validity(engine, prompts, mode == "constrained", gen_tokens, track(f"prompts, {mode}"))
        report["validity"][mode] = asdict(validity)
        seconds[f"prompts_{mode}"] = time.perf_counter() - t0
    report["seconds"] = seconds
    return report


def _model_fields(engine: Engine) -> dict[str, Any]:
    layout = engine.manifest.layout
    return {"bits": layout.bits, "group_size": None if layout.bits == 16 else layout.group_size, "k": engine.top_k}


# -- perplexity and comparison ---------------------------------------------------------------------
def read_text(path: Path) -> str:
    """The held-out text; an error for a missing, empty or non-UTF-8 file."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    text = path.read_text(encoding="utf-8")  # UnicodeDecodeError is a ValueError: reported as such
    if not text.strip():
        raise ValueError(f"data file {path} is empty")
    return text


def split_windows(ids: list[int], window: int, max_tokens: int | None = None) -> list[list[int]]:
    """Consecutive windows of `window` tokens (the last may be shorter), cut so that at most
    `max_tokens` positions are scored. Each window scores all its tokens but the first, which has
    no context; a fresh state per window keeps every score's context inside its window."""
    if window < 2:
        raise ValueError(f"--window must be at least 2 tokens, got {window}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}")
    if len(ids) < window:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}: use a smaller --window or more text")
    budget = len(ids) if max_tokens is None else max_tokens
    windows = []
    for start in range(0, len(ids), window):
        n = min(window, len(ids) - start, budget + 1)
        if n < 2:
            break
        windows.append(ids[start : start + n])
        budget -= n - 1
    return windows


def perplexity(engine: Engine, ids: list[int], window: int, max_tokens: int | None = None,
               progress: ProgressCallback | None = None) -> Perplexity:
    """The model's perplexity on `ids`, scored window by window (see split_windows)."""
    windows = _windows(ids, window, max_tokens, engine)
    nll, tokens = 0.0, 0
    for i, w in enumerate(windows):
        logp, targets = _log_probs(engine, w)
        nll += _nll(logp, targets)
        tokens += len(targets)
        if progress:
            progress(i + 1, len(windows))
    return Perplexity(tokens, len(windows), nll / tokens)


def compare(engine: Engine, reference: Engine, ids: list[int], window: int, max_tokens: int | None = None,
            progress: ProgressCallback | None = None) -> Comparison:
    """The model against a reference on the same windows: both perplexities, KL(reference || model)
    and top-1 agreement. One window of logits from each model is held at a time."""
    check_comparable(engine, reference)
    windows = _windows(ids, window, max_tokens, engine, reference)
    nll = nll_ref = kl = 0.0
    agree = tokens = 0
    for i, w in enumerate(windows):
        logp, targets = _log_probs(engine, w)  # [T-1, V]
        ref = _log_probs(reference, w)[0].to(logp.device)
        nll, nll_ref = nll + _nll(logp, targets), nll_ref + _nll(ref, targets)
        for rows in range(0, len(targets), _KL_ROWS):
            r, m = ref[rows : rows + _KL_ROWS], logp[rows : rows + _KL_ROWS]
            kl += float(torch.sum(r.exp() * (r - m), dtype=torch.float64))
        agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
        tokens += len(targets)
        del logp, ref  # before the next window's logits exist: two [T, V] tensors at most
        if progress:
            progress(i + 1, len(windows))
    n = len(windows)
    return Comparison(Perplexity(tokens, n, nll / tokens), Perplexity(tokens, n, nll_ref / tokens), kl / tokens, agree / tokens)


def check_comparable(engine: Engine, reference: Engine) -> None:
    """KL and top-1 compare distributions id by id: both models must give every id the same meaning."""
    a, b = engine.args.vocab_size, reference.args.vocab_size
    if a != b:
        raise ValueError(f"the models' vocabularies differ: {engine.dir} has {a} token ids, the reference {reference.dir} has {b}")
    if _tokenizer_json(engine) != _tokenizer_json(reference):
        raise ValueError(
            f"the tokenizers of {engine.dir} and the reference {reference.dir} differ (tokenizer.json): "
            "their token ids do not mean the same text"
        )


def _tokenizer_json(engine: Engine) -> Any:
    return json.loads((engine.dir / "tokenizer.json").read_text(encoding="utf-8"))  # parsed: formatting may differ


def _windows(ids: list[int], window: int, max_tokens: int | None, *engines: Engine) -> list[list[int]]:
    for engine in engines:
        if window > engine.context_length:
            raise ValueError(f"--window {window} is larger than the context length of {engine.dir} ({engine.context_length} tokens)")
    return split_windows(ids, window, max_tokens)


@torch.inference_mode()
def _log_probs(engine: Engine, window: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities of each next token [T-1, V] fp32, the tokens that came next [T-1]), from a
    fresh state, fed in the engine's prefill chunks."""
    ids = torch.tensor(window, dtype=torch.long, device=engine.device)
    logits = engine.forward(ids, engine.new_state(), last_only=False)[:-1]
    logits -= logits.logsumexp(-1, keepdim=True)  # in place: no second [T, V] tensor
    return logits, ids[1:]


def _nll(logp: torch.Tensor, targets: torch.Tensor) -> float:
    return -float(logp.gather(1, targets[:, None]).sum(dtype=torch.float64))


# -- structured output ------------------------------------------------------------------------------
def load_prompts(path: Path) -> list[Prompt]:
    """The prompt set: one JSON object a line, {"messages": [...], "tools": [...]} (tools optional)."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e})") from None
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f'{path} line {n}: expected {{"messages": [...], "tools": [...]}} with a non-empty list of message objects')
        tools = obj.get("tools")
        if tools is not None and (not isinstance(tools, list) or not tools or len(tool_schemas(tools)) != len(tools)):
            raise ValueError(f'{path} line {n}: "tools" must be a non-empty list of function definitions, each with a name')
        prompts.append(Prompt(messages, tools))
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts


def structured_validity(engine: Engine, prompts: list[Prompt], constrained: bool, max_tokens: int = 128,
                        progress: ProgressCallback | None = None) -> Validity:
    """Greedy answers (chat template, thinking off) and how many are valid (tool_call_valid,
    json_answer_valid). Constrained: under the grammar the server uses for tool_choice "required"
    with tools, for response_format json_object without."""
    from .server.grammar import Grammars  # llguidance: only loaded when constraining

    grammars = Grammars.for_engine(engine) if constrained else None
    result = Validity()
    for i, p in enumerate(prompts):
        ids = engine.tokenizer.encode_chat(p.messages, tools=p.tools, enable_thinking=False)
        processor = None
        if grammars is not None:
            processor = grammars.processor(grammars.tool_calls(p.tools, "required") if p.tools else grammars.json(None))
        gen = engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), logits_processor=processor)
        answer = "".join(step.text for step in gen)
        result.outputs.append(answer)
        if p.tools:
            result.tool_total += 1
            result.tool_valid += tool_call_valid(answer, p.tools)
        else:
            result.json_total += 1
            result.json_valid += json_answer_valid(answer)
        if progress:
            progress(i + 1, len(prompts))
    return result


def tool_call_valid(text: str, tools: list[dict[str, Any]]) -> bool:
    """At least one tool call; every call names an offered tool with arguments that match its
    parameter schema (see conforms); no malformed call block (the parser leaves those as text)."""
    schemas = tool_schemas(tools)
    out = parse_output(text, tools)
    return (bool(out.tool_calls) and TOOL_CALL_OPEN not in out.content
            and all(c.name in schemas and conforms(c.arguments, schemas[c.name]) for c in out.tool_calls))


def json_answer_valid(text: str) -> bool:
    """The whole answer, but for surrounding whitespace, is one JSON object."""
    try:
        return isinstance(json.loads(text.strip()), dict)
    except ValueError:
        return False


def conforms(value: Any, schema: Any) -> bool:
    """Whether `value` matches the JSON-schema keywords tool definitions use: type, enum, const,
    properties, required, additionalProperties, items, anyOf / oneOf (taken as any of), minimum,
    maximum, minLength, maxLength. Others (pattern, format, $ref...) are not checked: the
    jsonschema package would, but it is a test-only dependency and brings compiled ones with it."""
    if not isinstance(schema, dict):
        return True
    types = schema.get("type")
    if types is not None and not any(_is_type(value, t) for t in ([types] if isinstance(types, str) else types)):
        return False
    if ("enum" in schema and value not in schema["enum"]) or ("const" in schema and value != schema["const"]):
        return False
    if any(key in schema and not any(conforms(value, s) for s in schema[key]) for key in ("anyOf", "oneOf")):
        return False
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties", True)
        if any(key not in value for key in schema.get("required", ())) or (extra is False and not value.keys() <= props.keys()):
            return False
        return all(conforms(v, props.get(key, extra)) for key, v in value.items())
    if isinstance(value, list):
        return all(conforms(v, schema.get("items")) for v in value)
    if isinstance(value, str):
        return schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)
    return True


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    return name in kinds and isinstance(value, kinds[name])
