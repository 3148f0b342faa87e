"""Request bodies, validated: wrong types are a 400 naming the field; unknown fields are ignored.

Strict mode: no silent coercion ("10" is not an integer here), except that an integer is
accepted where a number is expected, as JSON does not tell them apart. Every number has a range
the engine can take, so no value gets as far as failing inside it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


# OpenAI's rule for function names, on both APIs: names go into the prompt and into the tool-call
# grammar as they are, so markup in one (`x>\n</function>`) would forge structure there.
ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
# No context comes near 2**31 tokens: a larger count is a client's mistake, refused as one.
_COUNT_LIMIT = 2**31 - 1
TokenCount = Annotated[int, Field(ge=1, le=_COUNT_LIMIT)]
TopK = Annotated[int, Field(ge=0, le=_COUNT_LIMIT)]  # 0 = off
# Stop strings are matched against the text after every token, at a cost that grows with the
# square of their length: a few short ones are what clients use.
StopStrings = Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=16)]
# OpenAI's `stop` may also be one string: read as a list of one, so errors name `stop.0`.
OneOrMoreStopStrings = Annotated[StopStrings, BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]


# -- OpenAI ----------------------------------------------------------------------------------
class ContentPart(_Body):
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: ToolName
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Body):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Body):
    name: ToolName


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaSpec(_Body):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: TopK | None = None  # not OpenAI's; common in local servers
    # Useful values lie near 1 (1 = off); the bounds keep the penalized fp32 logits finite.
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=100)
    max_tokens: TokenCount | None = None
    stop: OneOrMoreStopStrings | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # the sampler's generator takes 64 bits
    n: int = Field(default=1, ge=1, le=1)
    ignore_eos: bool = False  # not OpenAI's (vLLM's name): run to max_tokens through end-of-sequence tokens, for benchmarks


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: TokenCount | None = 16  # OpenAI's default for this endpoint
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)  # top-N alternatives per token, as OpenAI allows


# -- Anthropic Messages -----------------------------------------------------------------------
class ABlock(_Body):
    type: str
    text: str | None = None
    thinking: str | None = None
    id: str | None = None  # tool_use
    name: ToolName | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None  # tool_result
    content: str | list[ABlock] | None = None
    is_error: bool | None = None


class AMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[ABlock]


class ATool(_Body):
    name: ToolName
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class AToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: ToolName | None = None
    disable_parallel_tool_use: bool = False


class AThinking(_Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: TokenCount | None = None


class MessagesRequest(_Body):
    model: str | None = None
    max_tokens: TokenCount
    messages: list[AMessage] = Field(min_length=1)
    system: str | list[ABlock] | None = None
    stop_sequences: StopStrings | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: TopK | None = None
    stream: bool = False
    tools: list[ATool] | None = None
    tool_choice: AToolChoice | None = None
    thinking: AThinking | None = None
