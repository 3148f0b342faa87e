"""Token log-probabilities in OpenAI's two shapes: the chat API's `logprobs.content` entries and
the completions API's `{tokens, token_logprobs, top_logprobs, text_offset}`.

The engine reports token ids (Step.logprob, Step.top_logprobs; `token_logprobs` in
runtime/sampling.py says of which distribution). Here they become each token's text and its
exact bytes: a byte-level token may hold part of a UTF-8 character, whose text then reads U+FFFD
while `bytes` has the real bytes, which join across tokens into the character.
"""

from __future__ import annotations

from typing import Any

from ..generation import Step
from ..tokenizer import Tokenizer


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's, which Qwen's tokenizers use), character -> byte: printable
    bytes stand for themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_OF = _byte_level_alphabet()


class TokenText:
    """A token id's text and bytes, as the logprob shapes report them."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])  # "" for ids past the tokenizer's vocabulary

    def raw_bytes(self, token_id: int) -> list[int] | None:
        """The token's bytes: its byte-level spelling read back, where that decodes to the token's
        text (so the tokenizer is byte-level); else its text's UTF-8, unless the text holds U+FFFD
        (bytes this tokenizer does not show); None for ids it does not know."""
        text, spelling = self.text(token_id), self.tokenizer.id_to_token(token_id)
        if spelling is None:
            return None
        if all(c in _BYTE_OF for c in spelling):
            raw = bytes(_BYTE_OF[c] for c in spelling)
            if raw.decode("utf-8", errors="replace") == text:
                return list(raw)
        return None if "\ufffd" in text else list(text.encode("utf-8"))

    def alternative(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self.text(token_id), "logprob": logprob, "bytes": self.raw_bytes(token_id)}


class ChatLogprobs:
    """The chat API's `logprobs` of the tokens gathered since the last `take`: one entry per
    generated token, with its `top_logprobs` alternatives."""

    def __init__(self, tokens: TokenText) -> None:
        self.tokens = tokens
        self.entries: list[dict[str, Any]] = []

    def add(self, step: Step) -> None:
        top = [self.tokens.alternative(i, lp) for i, lp in step.top_logprobs or ()]
        self.entries.append({**self.tokens.alternative(step.token, step.logprob), "top_logprobs": top})

    def take(self) -> dict[str, Any]:
        entries, self.entries = self.entries, []
        return {"content": entries, "refusal": None}


class LegacyLogprobs:
    """The completions API's `logprobs` of the tokens gathered since the last `take`. Each token's
    `text_offset` is where its text starts in the choice's text (the tokens' texts, joined); its
    `top_logprobs` holds the N most likely tokens and always the chosen one, as OpenAI's do (so
    up to N + 1)."""

    def __init__(self, tokens: TokenText) -> None:
        self.tokens = tokens
        self.text_length = 0
        self.steps: list[Step] = []
        self.offsets: list[int] = []

    def add(self, step: Step) -> None:
        self.steps.append(step)
        self.offsets.append(self.text_length)
        self.text_length += len(step.text)

    def take(self) -> dict[str, Any]:
        steps, offsets, self.steps, self.offsets = self.steps, self.offsets, [], []
        text = self.tokens.text
        return {
            "tokens": [text(s.token) for s in steps],
            "token_logprobs": [s.logprob for s in steps],
            "top_logprobs": [{**{text(i): lp for i, lp in s.top_logprobs or ()}, text(s.token): s.logprob} for s in steps],
            "text_offset": offsets,
        }
