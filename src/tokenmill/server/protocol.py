"""OpenAI request and response schemas (pydantic), with vLLM's extra sampling fields.

Requests allow extra fields: unsupported.py decides which of them are refused with a 400,
which are accepted silently, and the rest are logged and ignored. Known fields are strict,
as OpenAI's API is: `"stream": "yes"` or `"n": "2"` is a 400, not coerced.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    field_validator,
    model_serializer,
    model_validator,
)

from tokenmill.server.structured import (
    STRUCTURED_FIELD_SCHEMAS,
    TOOL_FIELD_SCHEMAS,
    document_fields,
)

# torch.Generator.manual_seed takes a 64-bit value; n>1 adds the sample index to it.
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1 - 1024
# OpenAI's own limit on n.
MAX_N = 128


# Fields where an explicit null means something other than the default (vLLM: no limit).
_NULL_IS_MEANINGFUL = frozenset({"max_tokens"})


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Many clients send every optional field, unset ones as null ("n": null); OpenAI
        # reads null as "use the default", so do the same instead of failing validation.
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items()
                    if not (v is None and k in fields and k not in _NULL_IS_MEANINGFUL)}
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None
    # vLLM's: usage (this choice's prompt and completion tokens so far) in every chunk.
    continuous_usage_stats: bool | None = False
    include_obfuscation: bool | None = None  # OpenAI's padding against side channels; no-op here

    @property
    def wants_final_usage(self) -> bool:
        # vLLM defaults include_usage to true inside stream_options, so a client that sends
        # only continuous_usage_stats gets both there; OpenAI's default (false) holds otherwise.
        return self.include_usage if self.include_usage is not None else bool(self.continuous_usage_stats)

    @property
    def wants_continuous_usage(self) -> bool:
        return self.wants_final_usage and bool(self.continuous_usage_stats)


class SamplingFields(OpenAIBaseModel):
    """Sampling fields shared by completions and chat (OpenAI's, then vLLM's extras).

    None means "not given": the checkpoint's generation_config.json default, else OpenAI's.
    """

    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(default=None, ge=_SEED_MIN, le=_SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted; tokenmill keeps no per-user state
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra=document_fields(STRUCTURED_FIELD_SCHEMAS))
    prompt: _Text | Annotated[list[_Text], Field(min_length=1)] | _TokenIds | Annotated[list[_TokenIds], Field(min_length=1)]
    max_tokens: int | None = 16  # OpenAI's and vLLM's default for completions
    logprobs: int | None = None
    echo: bool | None = False
    add_special_tokens: bool = True  # vLLM extra: prepend BOS as the tokenizer does

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt_shape(cls, v: Any) -> Any:
        # One message for every wrong shape, instead of one per member of the union.
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str) or (isinstance(v, list) and (
                all(isinstance(x, str) for x in v) or is_ids(v) or all(is_ids(x) for x in v))):
            if v in ("", []) or (isinstance(v, list) and any(x in ("", []) for x in v)):
                raise ValueError("must not be empty (nor hold an empty prompt)")
            return v
        raise ValueError("must be a string, a list of strings, a list of token ids, or a list of "
                         "token-id lists")


# The schema states what serving_chat.py accepts (its 400s name the rest); the validation
# stays there, for OpenAI-style messages.
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}


class ChatMessage(OpenAIBaseModel):
    # Only the assistant may omit its content (a turn of tool calls).
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"role": {"const": "assistant"}}},
        {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}},
    ]})
    role: str = Field(json_schema_extra={"enum": ["system", "developer", "user", "assistant", "tool"]})
    content: str | list[dict[str, Any]] | None = Field(
        default=None, json_schema_extra={"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART},
                                                   {"type": "null"}]})
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls (OpenAI's objects)
    tool_call_id: str | None = None  # the call a tool turn answers


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra=document_fields({**STRUCTURED_FIELD_SCHEMAS, **TOOL_FIELD_SCHEMAS}))
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # vLLM extras for the chat template
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(OpenAIBaseModel):
    """vLLM's /tokenize: either `prompt` or chat `messages`."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array", "minItems": 1}}},
    ]})
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


# ---- responses ----------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @computed_field
    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ResponseBase(BaseModel):
    """The envelope every response and stream chunk shares. Subclasses narrow `object` and
    `choices`; pydantic keeps a redefined field in its first position, so the JSON keys stay
    in OpenAI's order: id, object, created, model, choices, usage."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: UsageInfo | None = None


class CompletionLogProbs(BaseModel):
    """The legacy completions logprobs object; index i of each list is token i."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # vLLM extra: the stop string or token id that fired


class CompletionResponse(ResponseBase):
    """A whole response, and (with one choice and no usage) each streamed chunk."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of the arguments object


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _DeltaModel(BaseModel):
    """A streamed delta: OpenAI's carry only what changed, so unset fields are left out."""

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionCallDelta(_DeltaModel):
    name: str | None = None  # in the call's first delta
    arguments: str | None = None  # the next piece of the arguments' JSON text


class ToolCallDelta(_DeltaModel):
    index: int  # which call of the message: the id, type and name come in its first delta
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseBase):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(_DeltaModel):
    """{"role": ...} first, then {"content": ...} or {"tool_calls": [...]}."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(ResponseBase):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenmill"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
    name: str
    # The engine's settings (no filesystem paths); only for a caller with the API key.
    config: dict[str, Any] | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo
