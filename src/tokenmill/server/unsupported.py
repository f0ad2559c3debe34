"""Request fields tokenmill reads nowhere, and what to do about each.

Unknown fields are accepted and logged, as vLLM does, so clients that send vendor-specific
harmless fields keep working. Fields that OpenAI or vLLM define for features tokenmill does
not have (logit_bias, beam search...) are listed in UNSUPPORTED_* and
answered with 400: silently ignoring them would return output the client did not ask for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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
    "guided_decoding_backend": (_empty, "a choice of guided decoding backend (llguidance is the one)"),
    "lora_request": (_empty, "LoRA adapters"),
    "prompt_embeds": (_empty, "prompt embeddings"),
}

UNSUPPORTED_COMPLETION: Unsupported = {
    **_COMMON_UNSUPPORTED,
    "suffix": (_empty, "suffix (fill-in-the-middle)"),
    "tools": (_empty, "tools on completions (tool calling is on /v1/chat/completions)"),
    "tool_choice": (_none_choice, "tool_choice on completions (tool calling is on /v1/chat/completions)"),
}

UNSUPPORTED_CHAT: Unsupported = {
    **_COMMON_UNSUPPORTED,
    "functions": (_empty, "functions (the legacy function calling; send tools)"),
    "function_call": (_none_choice, "function_call (the legacy function calling; send tool_choice)"),
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
    {"metadata", "store", "service_tier", "safety_identifier",
     "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"}
)
