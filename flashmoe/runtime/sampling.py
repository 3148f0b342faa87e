"""Next-token sampling: repetition penalty, temperature, top-k, top-p, seeded; greedy at temperature 0."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


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

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [vocab] (fp32) -> the drawn token, also recorded as seen."""
        token = self._draw(logits)
        if self.seen is not None:
            self.seen[token] = True
        return token

    def _draw(self, logits: torch.Tensor) -> int:
        p = self.params
        if self.seen is not None:  # HF's rule: divide positive logits, multiply negative ones
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if p.temperature == 0:
            return int(logits.argmax())
        # Work on the candidates only: top-k first (a cheap partial sort), then top-p over those.
        if p.top_k and p.top_k < logits.numel():
            values, candidates = torch.topk(logits, p.top_k)
        else:
            values, candidates = logits.sort(descending=True)
        probs = torch.softmax(values / p.temperature, dim=-1)
        if p.top_p < 1.0:
            # drop a token when the tokens ranked above it already reach top_p; the first always stays
            probs[probs.cumsum(0) - probs >= p.top_p] = 0
        return int(candidates[torch.multinomial(probs, 1, generator=self.generator)])
