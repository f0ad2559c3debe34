"""What one request may make the server do: body bytes, prompt characters, JSON shape.

Every bound is derived from the model's context, so an operator sets at most one number
(`--max-request-body-bytes`) and a client cannot make the server parse, hold or tokenize
more than a request that could actually be served needs. Checked in order of cost: the
body's bytes while it is read (middleware.py), the JSON's shape right after parsing
(`check_json`), a prompt's characters before it is tokenized (`check_prompt_chars`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from tokenmill.server.errors import APIError, bad_request
from tokenmill.tokenizer import Tokenizer

# A prompt that fills the context, sent as JSON, takes far less than this per token: ~4-5
# bytes of English text, at most 7 as a token id ("151643,"), 6 per character for escaped
# non-ASCII text. The floor leaves room for batches of prompts on short-context models.
BODY_BYTES_PER_TOKEN = 64
MIN_BODY_BYTES = 1 << 20
# Real requests nest 5 levels (body > messages > message > content > part); 64 leaves room
# for chat_template_kwargs and metadata, and keeps every later recursion (pydantic, jinja)
# far from Python's limit.
MAX_JSON_DEPTH = 64
# JSON integers beyond int64 only ever reach a tensor or a C library as an overflow.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def default_max_body_bytes(max_model_len: int) -> int:
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_model_len)


def max_chars_per_token(tokenizer: Tokenizer) -> int:
    """The longest token's text in the vocabulary (in its stored form, which is never shorter
    than the text it stands for: byte-level "Ġthe", sentencepiece "▁the", "<0x0A>")."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return max((len(piece) for piece in vocab), default=1) or 1


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int
    # No text longer than this can tokenize to max_model_len tokens or fewer, whatever it holds.
    max_prompt_chars: int
    max_json_items: int  # per array or object: the longest token-id list, or the most prompts
    max_json_depth: int = MAX_JSON_DEPTH

    @classmethod
    def for_model(cls, tokenizer: Tokenizer | None, max_model_len: int, max_seqs: int,
                  max_body_bytes: int | None = None) -> RequestLimits:
        """Args:
            tokenizer: None when the server takes token ids only (then no text is tokenized).
            max_seqs: the most sequences the server holds at once (running + waiting).
            max_body_bytes: the operator's limit; None sizes it from max_model_len.
        """
        return cls(
            max_body_bytes=max_body_bytes or default_max_body_bytes(max_model_len),
            max_prompt_chars=max_model_len * max_chars_per_token(tokenizer) if tokenizer else 0,
            max_json_items=max(max_model_len, max_seqs),
        )

    def parse_json(self, body: bytes) -> Any:
        """The body as JSON; 400 for anything the handlers should never see: invalid JSON,
        NaN/Infinity, nesting or arrays past the limits, integers past int64, non-finite
        numbers, lone UTF-16 surrogates (not valid Unicode; the tokenizer rejects them)."""
        try:
            data = json.loads(body, parse_constant=_refuse_constant)
        except RecursionError:
            raise self._too_deep(None) from None
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise bad_request(f"The request body is not valid JSON: {e}.") from None
        self.check_json(data)
        return data

    def check_json(self, data: Any) -> None:
        # Iterative, so depth costs no Python stack; a path is spelled out only for an error.
        stack: list[tuple[Any, tuple | None, int]] = [(data, None, 0)]
        while stack:
            value, path, depth = stack.pop()
            if isinstance(value, str):
                if not value.isascii() and not _is_valid_unicode(value):
                    raise bad_request(f"Invalid value for '{_param(path)}': the string holds a lone "
                                      "UTF-16 surrogate, which is not valid Unicode.", param=_param(path))
            elif isinstance(value, bool) or value is None:
                continue
            elif isinstance(value, int):
                if not INT64_MIN <= value <= INT64_MAX:
                    raise bad_request(f"Invalid value for '{_param(path)}': integers must fit in 64 bits.",
                                      param=_param(path))
            elif isinstance(value, float):
                if not math.isfinite(value):
                    raise bad_request(f"Invalid value for '{_param(path)}': numbers must be finite.",
                                      param=_param(path))
            else:  # list or dict
                if depth >= self.max_json_depth:
                    raise self._too_deep(path)
                if len(value) > self.max_json_items:
                    raise bad_request(f"'{_param(path) or 'body'}' has {len(value)} items; this server takes "
                                      f"at most {self.max_json_items}.", param=_param(path))
                if isinstance(value, dict):
                    for key, item in value.items():
                        if not key.isascii() and not _is_valid_unicode(key):
                            raise bad_request(f"A key in '{_param(path) or 'body'}' holds a lone UTF-16 "
                                              "surrogate, which is not valid Unicode.", param=_param(path))
                        stack.append((item, (path, key), depth + 1))
                elif not _is_int64_list(value):  # token ids: checked in one pass above
                    stack.extend((item, (path, i), depth + 1) for i, item in enumerate(value))

    def check_prompt_chars(self, text: str, param: str) -> None:
        """400 before tokenizing a text too long to fit the context in any tokenization."""
        if len(text) > self.max_prompt_chars:
            raise bad_request(
                f"The {param} has {len(text)} characters; no text longer than {self.max_prompt_chars} "
                f"characters fits this model's context, whatever it says. Please reduce the length "
                f"of the {param}.", param=param, code="context_length_exceeded")

    def _too_deep(self, path: tuple | None) -> APIError:
        return bad_request(f"The request body nests deeper than {self.max_json_depth} levels.",
                           param=_param(path))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int64_list(items: list) -> bool:
    if not all(type(x) is int for x in items):
        return False
    return not items or (INT64_MIN <= min(items) and max(items) <= INT64_MAX)


def _param(path: tuple | None) -> str | None:
    """A path as OpenAI names a parameter: messages[0].content[1].text."""
    parts: list[Any] = []
    while path is not None:
        path, key = path
        parts.append(key)
    out = ""
    for key in reversed(parts):
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out or None
