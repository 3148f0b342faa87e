"""Next-token sampling: repetition penalty, temperature, top-k, top-p, seeded; greedy at temperature 0
(or nearly: GREEDY_BELOW). Also the log-probabilities of the model's distribution, for clients that ask for them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..utils import is_int, short_repr


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # run to max_tokens through end-of-sequence tokens (benchmarks)
    logprobs: int | None = None  # each Step's logprob and its top-N alternatives (0: none); None = off, no cost

    def __post_init__(self) -> None:
        # Checked here, where every caller passes (CLI, server, generation_config.json): a NaN or a string
        # would otherwise fail inside torch, or sample from nothing without a word.
        p = self
        rules = (
            ("max_tokens", is_int(p.max_tokens) and p.max_tokens >= 1, "an integer of at least 1"),
            ("temperature", _finite(p.temperature) and p.temperature >= 0, "a finite number >= 0 (0 = greedy)"),
            ("top_p", _finite(p.top_p) and 0 < p.top_p <= 1, "a number in (0, 1]"),
            ("top_k", is_int(p.top_k) and p.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("repetition_penalty", _finite(p.repetition_penalty) and p.repetition_penalty > 0, "a finite number > 0 (1 = off)"),
            ("seed", p.seed is None or (is_int(p.seed) and -(2**63) <= p.seed < 2**64), "a 64-bit integer"),  # what torch takes
            ("logprobs", p.logprobs is None or (is_int(p.logprobs) and p.logprobs >= 0), "an integer >= 0"),
        )
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"{name} must be {rule}, not {short_repr(getattr(self, name))}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Below this temperature sampling is greedy: the distribution is one-hot to fp32 precision anyway
# (logits 0.001 apart are 100 apart after the division), and far smaller temperatures overflow
# the division to inf, which leaves no distribution to draw from.
GREEDY_BELOW = 1e-5


class Sampler:
    """Draws the next token on the logits' device; the only host sync is reading the token.

    With a repetition penalty it keeps a device mask of the ids seen so far (the prompt's, then
    each token it draws), so no growing history crosses to the device per step."""

    def __init__(self, params: SamplingParams, vocab_size: int, device="cpu", seen: list[int] | None = None):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if seen:
                self.seen[torch.tensor(seen, device=device)] = True

    def __call__(self, logits: torch.Tensor, argmax: int | None = None) -> int:
        """logits [vocab] (fp32) -> the drawn token, also recorded as seen; argmax: the logits'
        most likely token where the caller has it already (a greedy draw then reads nothing back)."""
        if argmax is not None and self.seen is None and self.params.temperature < GREEDY_BELOW:
            return argmax
        token = self._draw(logits)
        if self.seen is not None:
            self.seen[token] = True
        return token

    def _draw(self, logits: torch.Tensor) -> int:
        p = self.params
        if self.seen is not None:  # HF's rule: divide positive logits, multiply negative ones
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if p.temperature < GREEDY_BELOW:
            return int(logits.argmax())
        # Work on the candidates only: top-k first (a cheap partial sort), then top-p over those; with
        # neither, every token in vocabulary order (sorting 8k logits took 0.7 ms a token on the CPU).
        if p.top_k and p.top_k < logits.numel():
            values, candidates = torch.topk(logits, p.top_k)
        elif p.top_p < 1.0:
            values, candidates = logits.sort(descending=True)
        else:
            values, candidates = logits, None
        probs = torch.softmax(values / p.temperature, dim=-1)
        if p.top_p < 1.0:
            # drop a token when the tokens ranked above it already reach top_p; the first always stays
            probs[probs.cumsum(0) - probs >= p.top_p] = 0
        drawn = torch.multinomial(probs, 1, generator=self.generator)
        return int(drawn if candidates is None else candidates[drawn])


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under the model's own distribution (log_softmax of the raw
    logits in fp32: no temperature, penalty, top-k/top-p or grammar mask applied), and the `top`
    most likely tokens with theirs, most likely first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(min(top, logprobs.numel()))
    return float(logprobs[token]), list(zip(ids.tolist(), values.tolist()))
