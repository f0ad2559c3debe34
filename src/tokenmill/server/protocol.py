"""OpenAI request and response schemas (pydantic), with vLLM's extra sampling fields.

Unknown request fields are accepted and logged, as vLLM does, so clients that send
vendor-specific harmless fields keep working. Fields that OpenAI or vLLM define for
features tokenmill does not have (tools, JSON mode, logit_bias, guided decoding...)
are listed in UNSUPPORTED_* and answered with 400: silently ignoring them would return
output the client did not ask for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

# torch.Generator.manual_seed takes a 64-bit value; n>1 adds the sample index to it.
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1 - 1024


# Fields where an explicit null means something other than the default (vLLM: no limit).
_NULL_IS_MEANINGFUL = frozenset({"max_tokens"})


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")

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
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # OpenAI's padding against side channels; no-op here


class SamplingFields(OpenAIBaseModel):
    """Sampling fields shared by completions and chat (OpenAI's, then vLLM's extras).

    None means "not given": the checkpoint's generation_config.json default, else OpenAI's.
    """

    model: str | None = None
    n: int = 1
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


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
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
            return v
        raise ValueError("must be a string, a list of strings, a list of token ids, or a list of "
                         "token-id lists")


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # vLLM extras for the chat template
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(OpenAIBaseModel):
    """vLLM's /tokenize: either `prompt` or chat `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


# ---- unsupported features ----------------------------------------------------------------

def _empty(v: Any) -> bool:
    return v is None or v is False or v == [] or v == {}


def _none_choice(v: Any) -> bool:
    return _empty(v) or v == "none"


# field -> (is the value harmless?, what the client asked for). Checked on model_extra.
Unsupported = dict[str, tuple[Callable[[Any], bool], str]]

_COMMON_UNSUPPORTED: Unsupported = {
    "logit_bias": (_empty, "logit_bias"),
    "best_of": (lambda v: v is None or v == 1, "best_of"),
    "use_beam_search": (_empty, "beam search"),
    "logits_processors": (_empty, "logits processors"),
    "allowed_token_ids": (_empty, "allowed_token_ids"),
    "bad_words": (_empty, "bad_words"),
    "prompt_logprobs": (_empty, "prompt_logprobs (use echo with logprobs on /v1/completions)"),
    "truncate_prompt_tokens": (_empty, "prompt truncation"),
    "structured_outputs": (_empty, "structured output"),
    "guided_json": (_empty, "guided decoding"),
    "guided_regex": (_empty, "guided decoding"),
    "guided_choice": (_empty, "guided decoding"),
    "guided_grammar": (_empty, "guided decoding"),
    "guided_decoding_backend": (_empty, "guided decoding"),
    "response_format": (lambda v: _empty(v) or (isinstance(v, dict) and v.get("type") == "text"),
                        "response_format other than text (JSON mode, JSON schema)"),
    "lora_request": (_empty, "LoRA adapters"),
    "prompt_embeds": (_empty, "prompt embeddings"),
}

UNSUPPORTED_COMPLETION: Unsupported = {
    **_COMMON_UNSUPPORTED,
    "suffix": (_empty, "suffix (fill-in-the-middle)"),
}

UNSUPPORTED_CHAT: Unsupported = {
    **_COMMON_UNSUPPORTED,
    "tools": (_empty, "tools (tool calling)"),
    "tool_choice": (_none_choice, "tool_choice (tool calling)"),
    "functions": (_empty, "functions (function calling)"),
    "function_call": (_none_choice, "function_call (function calling)"),
    "audio": (_empty, "audio output"),
    "modalities": (lambda v: _empty(v) or v == ["text"], "modalities other than text"),
    "prediction": (_empty, "predicted outputs"),
    "reasoning_effort": (_empty, "reasoning_effort"),
    "verbosity": (_empty, "verbosity"),
    "web_search_options": (_empty, "web search"),
    "moderation": (_empty, "moderation"),
    "echo": (_empty, "echo on chat (use /v1/completions)"),
    "continue_final_message": (_empty, "continue_final_message"),
    "chat_template": (_empty, "a per-request chat_template"),
    "documents": (_empty, "documents"),
}

# Fields OpenAI defines that change nothing about the output here: accepted silently.
IGNORED_FIELDS = frozenset(
    {"metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
     "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"}
)


# ---- responses ----------------------------------------------------------------------------

class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


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
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None  # vLLM extra: the stop string or token id that fired


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: {"role": ...} first, then {"content": ...}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


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
