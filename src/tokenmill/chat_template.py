"""Chat templates: rendered the way Hugging Face transformers renders them."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox


def pick_chat_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {name, template}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        # No "default": the first named template is the best guess a user would make.
        return next(iter(named.values()), None)
    raise ValueError(f"chat_template must be a string or a list of templates, got {type(value).__name__}")


@lru_cache(maxsize=32)
def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers renders them in.

    Templates from the Hub are untrusted code, hence the immutable sandbox; trim_blocks and
    lstrip_blocks change the whitespace of the output, so they must match transformers.
    """

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # jinja's own tojson escapes <, > and & for HTML, which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def content_text(content: Any) -> str:
    """A message's content as one string: text parts newline-joined (as vLLM does for
    templates that expect string content); ValueError on any other kind of part."""
    if not isinstance(content, list):
        return content or ""
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"only text content parts are supported, got {kind!r}")
        texts.append(part.get("text", ""))
    return "\n".join(texts)


def _normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    """Drop None fields (templates test for presence) and flatten list content to a string."""
    out = {k: v for k, v in message.items() if v is not None}
    if isinstance(out.get("content"), list):
        out["content"] = content_text(out["content"])
    return out


def render_chat_template(
    source: str, messages: list[dict[str, Any]], add_generation_prompt: bool, variables: dict[str, Any]
) -> str:
    """Render `messages` with the template `source`; ValueError on a template error."""
    try:
        return _compile_chat_template(source).render(
            messages=[_normalize_message(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from e
