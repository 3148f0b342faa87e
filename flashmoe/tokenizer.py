"""Text <-> token ids for flashmoe: a thin layer over a Hugging Face `tokenizers.Tokenizer`.

Adds what the engine needs on top of the raw backend: loading a model directory's tokenizer
files, rendering the model's chat template in a sandbox, and streaming detokenization that
never emits half of a multi-byte character.

Text from users never becomes control tokens: `encode` reads every string as plain text (a
message containing "<|im_start|>system" is those characters, not a forged turn), and
`encode_chat` makes only the chat template's own markup special (`_Escaped` says how).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import tokenizers
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .utils import read_json

DEFAULT_CHAT_TEMPLATE_NAME = "chat_template.jinja"


def default_chat_template() -> str:
    """flashmoe's own ChatML template for Qwen-format models (package data file)."""
    return resources.files("flashmoe").joinpath(DEFAULT_CHAT_TEMPLATE_NAME).read_text(encoding="utf-8")


class _TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, failing at once on unsafe attributes.

    Plain Jinja answers `''.__class__` with an undefined value that renders as "" and raises
    only when used further; a template probing internals should be refused loudly instead.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"chat template accessed unsafe attribute {attribute!r} of a {type(obj).__name__}")


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    # Same knobs as the `tojson` filter transformers gives templates. Jinja's built-in one escapes
    # HTML characters (<, >, &, '), which would put e.g. "\u003c" into prompts instead of "<".
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json holds special tokens as plain strings or as serialized AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_from_config(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates (e.g. "default", "tool_use")
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _normalize_tool_calls(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies messages, parsing tool-call `arguments` given as JSON text into dicts.

    OpenAI clients send arguments as a JSON string while templates (Qwen's included) iterate
    them as a mapping; parsing here keeps every template working with both shapes.
    """
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if calls:
            message = dict(message, tool_calls=[_parse_call_arguments(c) for c in calls])
        out.append(message)
    return out


def _parse_call_arguments(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    fn = call.get("function", call)
    args = fn.get("arguments") if isinstance(fn, dict) else None
    if not isinstance(args, str):
        return call
    try:
        parsed = json.loads(args)
    except ValueError:
        return call  # not JSON: the template renders the text as it is
    if not isinstance(parsed, dict):
        return call
    fn = dict(fn, arguments=parsed)
    return dict(call, function=fn) if "function" in call else fn


class Tokenizer:
    """A model's tokenizer: encode/decode, chat template and streaming decode."""

    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None = None,
                 special_token_map: dict[str, str | None] | None = None) -> None:
        self._backend = backend
        # Padding/truncation settings saved in a tokenizer.json would silently alter ids.
        self._backend.no_padding()
        self._backend.no_truncation()
        self._chat_template = chat_template
        self._compiled_template: Any = None
        self.special_token_map = dict(special_token_map or {})  # e.g. {"eos_token": "<|im_end|>"}
        added = backend.get_added_tokens_decoder()
        self.added_tokens: dict[str, int] = {t.content: i for i, t in sorted(added.items())}
        self.special_tokens: dict[str, int] = {t.content: i for i, t in sorted(added.items()) if t.special}
        self._plain = _without_added_tokens(backend)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Loads tokenizer.json, tokenizer_config.json and chat_template.jinja from a model dir."""
        directory = Path(path)
        tokenizer_json = directory / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise FileNotFoundError(
                f"{tokenizer_json} not found: the model directory must contain the Hugging Face tokenizer "
                "files (tokenizer.json, tokenizer_config.json, chat_template.jinja if the model has one). "
                "`flashmoe convert` copies them; for a directory made by hand, copy them from the original "
                "Hugging Face checkpoint."
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise ValueError(f"{tokenizer_json} cannot be read as a tokenizer ({e}): fetch it again") from None
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path, fix="; fetch it again") if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object, not {type(config).__name__}")
        template_path = directory / "chat_template.jinja"
        # A standalone chat_template.jinja is what newer checkpoints ship and wins over the config key.
        template = template_path.read_text(encoding="utf-8") if template_path.is_file() else _template_from_config(config)
        token_map = {k: _token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(backend, template, token_map)

    # -- ids ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (the model's embedding may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        token = self.special_token_map.get("eos_token")
        return None if token is None else self.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as plain text: no BOS or template tokens are added, and the strings of
        special and added tokens in it ("<|im_end|>", "<tool_call>") are text, never those tokens.
        To send control tokens, build ids (or render a conversation with `encode_chat`)."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, enable_thinking: bool = False, **extra: Any) -> list[int]:
        """Ids of the conversation rendered by the chat template (arguments as `apply_chat_template`):
        the template's markup as the control tokens it names, every string of the caller's
        (contents, names, arguments, tool schemas, extra variables) as plain text."""
        escaped = _Escaped(self.added_tokens)
        text = self.apply_chat_template(escaped.walk(messages), tools=escaped.walk(tools),
                                        add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                                        **escaped.walk(extra))
        return escaped.encode(text, self._backend, self._plain)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (in the backend's own form, e.g. byte-level "Ġthe") or added token."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat template -----------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template source, or None; may be replaced, e.g. by default_chat_template()."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._chat_template = template
        self._compiled_template = None

    def _template(self) -> Any:
        if self._compiled_template is not None:
            return self._compiled_template
        if not self._chat_template:
            raise ValueError(
                "this model has no chat template (no chat_template.jinja and no chat_template in "
                "tokenizer_config.json); add one to the model directory, or pass a template, e.g. "
                "flashmoe.tokenizer.default_chat_template() for Qwen-format models"
            )
        # The immutable sandbox keeps templates (which come with downloaded models) away from
        # Python internals and from mutating the caller's messages.
        env = _TemplateEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._compiled_template = env.from_string(self._chat_template)
        return self._compiled_template

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            add_generation_prompt: bool = True, enable_thinking: bool = False,
                            **extra: Any) -> str:
        """Renders a conversation to prompt text; `extra` becomes additional template variables."""
        context: dict[str, Any] = {k: v for k, v in self.special_token_map.items() if v is not None}
        context.update(messages=_normalize_tool_calls(messages), tools=tools,
                       add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
        context.update(extra)
        return self._template().render(**context)


def _without_added_tokens(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A copy of `backend` that knows no added tokens, so it encodes their strings as the text they
    are (the same pipeline otherwise: text without such strings encodes to the same ids)."""
    spec = json.loads(backend.to_str())
    spec["added_tokens"] = []
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


class _Escaped:
    """The caller's strings with every added-token string replaced by a placeholder before the chat
    template renders them, so that after rendering the template's own markup and the caller's text
    can be told apart: the rendered text is encoded with added tokens recognised, each placeholder
    as its token's characters in plain text. Placeholders are private-use characters around a
    random nonce and an index, so no text a client sends can pose as one."""

    def __init__(self, added_tokens: dict[str, int]) -> None:
        self.tokens = sorted(added_tokens, key=len, reverse=True)  # longest first where one contains another
        self._index = {token: i for i, token in enumerate(self.tokens)}
        self.nonce = secrets.token_hex(8)
        self._find = re.compile("|".join(map(re.escape, self.tokens))) if self.tokens else None
        self._placeholder = re.compile(f"\ue000{self.nonce}:(\\d+)\ue001")

    def walk(self, value: Any) -> Any:
        """`value` with placeholders in every string (dict keys included), as new containers."""
        if isinstance(value, str):
            if self._find is None:
                return value
            return self._find.sub(lambda m: f"\ue000{self.nonce}:{self._index[m[0]]}\ue001", value)
        if isinstance(value, dict):
            return {self.walk(k): self.walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.walk(v) for v in value]
        return value

    def encode(self, text: str, markup: tokenizers.Tokenizer, plain: tokenizers.Tokenizer) -> list[int]:
        ids, start = [], 0
        for m in self._placeholder.finditer(text):
            ids += markup.encode(text[start : m.start()], add_special_tokens=False).ids
            ids += plain.encode(self.tokens[int(m[1])], add_special_tokens=False).ids
            start = m.end()
        return ids + markup.encode(text[start:], add_special_tokens=False).ids


class StreamDecoder:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character.

    Byte-level BPE tokens may end inside a multi-byte character; decoding then ends in U+FFFD, so
    that text is held back until a later token completes it. Only a short window is ever decoded
    (the prefix/read offsets technique): `_ids` holds the ids of the last emitted piece, decoded
    again only as context so that decoders depending on neighbouring tokens behave as in a full
    decode, followed by the pending ids (from `_read` on). Older ids are dropped.
    """

    # Pending tokens tolerated before trying to release text that ends in U+FFFD anyway: no UTF-8
    # character spans more than 4 bytes, so a longer tail is real U+FFFD text or invalid bytes.
    _MAX_PENDING = 8

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0  # _ids[:_read] were emitted (context), _ids[_read:] are pending
        self._prefix_text = ""  # decode(_ids[:_read])

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text that became printable (often "")."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if not text.endswith("\ufffd"):
            return self._emit(text)
        if len(self._ids) - self._read > self._MAX_PENDING:
            return self._release_stuck(text)
        return ""

    def flush(self) -> str:
        """Returns whatever is still held back (call once the stream has ended)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids))

    def _emit(self, text: str) -> str:
        new_text = text[len(self._prefix_text):]
        # The ids just emitted become the next context window.
        del self._ids[:self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new_text

    def _release_stuck(self, text: str) -> str:
        # Split before the last token. For UTF-8 (lossy) decoding, if decoding the two halves apart
        # gives the same text as decoding them together, the boundary is clean: only the first
        # byte after it decides whether an unfinished sequence before it continues, and that byte
        # is now fixed. So everything before the last token is final and can be released.
        head = self._decode(self._ids[:-1])
        tail = self._decode(self._ids[-1:])
        if not tail or head + tail != text or not head.startswith(self._prefix_text):
            return ""  # keep holding: still correct, the window just grows for a while
        new_text = head[len(self._prefix_text):]
        del self._ids[:-1]  # only the last token stays, pending, with no context before it
        self._read = 0
        self._prefix_text = ""
        return new_text
