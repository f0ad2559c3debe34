"""Score windows against any OpenAI-compatible server that returns prompt logprobs.

Each window is one `/v1/completions` request with the window's token ids as the prompt,
`echo: true`, `logprobs: N` and `max_tokens: 0`: the response lists, for every prompt token,
its log-probability given the tokens before it and the N most likely alternatives
(lm-evaluation-harness scores loglikelihood tasks the same way). NLL and PPL are exact;
KL divergence can only use the alternatives listed (see distributions.kl_against_listed).

OpenAI's legacy `top_logprobs` are keyed by token text. Texts are mapped back to ids with
the client's tokenizer; a text several tokens share (e.g. lone UTF-8 bytes shown as U+FFFD)
cannot be, and its mass counts as "everything else". Keys of the form "token_id:123" (vLLM's
`return_tokens_as_token_ids`, via --extra-body) are read as ids.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from tokenmill.bench.client import _headers, fetch_first_model, fetch_server_info, split_base_url
from tokenmill.bench.quality.distributions import ListedRows
from tokenmill.bench.quality.local import ChunkDone
from tokenmill.bench.quality.protocol import Windows
from tokenmill.bench.quality.scoring import Accumulator

DEFAULT_NUM_LOGPROBS = 20  # vLLM's and tokenmill's default --max-logprobs
_AMBIGUOUS = -1


@dataclass(frozen=True)
class ServerTarget:
    base_url: str  # with or without /v1
    model: str | None = None  # None: the first id of GET /v1/models
    num_logprobs: int = DEFAULT_NUM_LOGPROBS  # alternatives per position (`logprobs`)
    max_concurrency: int = 4  # windows in flight
    request_timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)


def token_text_index(tokenizer: Any) -> dict[str, int]:
    """Token text (as logprobs show it) -> id; texts several ids share map to -1."""
    index: dict[str, int] = {}
    for token_id in range(tokenizer.vocab_size):
        text = tokenizer.decode_token(token_id)
        index[text] = _AMBIGUOUS if text in index else token_id
    return index


def parse_window(logprobs: dict[str, Any], window: np.ndarray, first: int,
                 text_index: dict[str, int], target_texts: list[str]) -> ListedRows:
    """A completions `logprobs` object -> the window's scored positions.

    Args:
        logprobs: choices[0].logprobs of an echo response to this window.
        window: [ctx_size] the token ids sent.
        first: first scored position (entry first + 1 scores token first + 1).
        text_index: from token_text_index.
        target_texts: the text of each scored position's target token, whose id is known
            even when its text is ambiguous.
    """
    ctx = len(window)
    token_lps = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    if len(token_lps) < ctx or len(tops) < ctx:
        raise RuntimeError(f"the server returned logprobs for {len(token_lps)} tokens, expected the "
                           f"{ctx} prompt tokens: does it support echo with logprobs on /v1/completions?")
    num_rows = ctx - 1 - first
    width = max(len(tops[e] or {}) for e in range(first + 1, ctx))
    targets = np.empty(num_rows, dtype=np.float32)
    ids = np.full((num_rows, width), -1, dtype=np.int64)
    values = np.full((num_rows, width), -np.inf, dtype=np.float32)
    for j, entry in enumerate(range(first + 1, ctx)):
        if token_lps[entry] is None or not isinstance(tops[entry], dict):
            raise RuntimeError(f"no logprobs for prompt token {entry}")
        targets[j] = token_lps[entry]
        listed = sorted(tops[entry].items(), key=lambda kv: -kv[1])
        seen: set[int] = set()
        for k, (key, value) in enumerate(listed):
            if key == target_texts[j]:
                token_id = int(window[entry])
            elif key.startswith("token_id:"):
                token_id = int(key.split(":", 1)[1])
            else:
                token_id = text_index.get(key, _AMBIGUOUS)
            if token_id in seen:  # listed once already: keep the first (larger) value
                token_id = _AMBIGUOUS
            seen.add(token_id)
            ids[j, k] = token_id
            values[j, k] = value
    top_ids = ids[:, 0].copy()  # the most likely listed token (-1 if its text is ambiguous)
    values[ids < 0] = -np.inf  # a token we cannot name belongs to "everything else"
    return ListedRows(targets, ids, values, top_ids)


async def _score(target: ServerTarget, windows: Windows, acc: Accumulator, tokenizer: Any,
                 on_chunk: ChunkDone) -> dict[str, Any]:
    root, api_base = split_base_url(target.base_url)
    text_index = token_text_index(tokenizer)
    first = windows.protocol.first_scored_position
    limits = httpx.Limits(max_connections=target.max_concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=target.request_timeout_s) as client:
        model = target.model or await fetch_first_model(client, api_base)
        info = await fetch_server_info(client, root)
        gate = asyncio.Semaphore(target.max_concurrency)

        async def one(i: int) -> None:
            window = windows.token_ids[i]
            body = {"model": model, "prompt": window.tolist(), "max_tokens": 0, "echo": True,
                    "logprobs": target.num_logprobs, **target.extra_body}
            async with gate:
                resp = await client.post(f"{api_base}/completions", json=body, headers=_headers())
            if resp.status_code != 200:
                raise RuntimeError(f"{api_base}/completions answered {resp.status_code}: {resp.text[:300]}")
            choice = resp.json()["choices"][0]
            texts = [tokenizer.decode_token(int(t)) for t in window[first + 1:]]
            if acc.add_listed(i, parse_window(choice.get("logprobs") or {}, window, first, text_index, texts)):
                on_chunk(i)

        await asyncio.gather(*(one(i) for i in range(windows.num_chunks)))
    return {"name": (info or {}).get("name", "openai-compatible"), "base_url": root, "model": model,
            **({"version": info.get("version"), "config": info.get("config")} if info else {})}


def score_with_server(target: ServerTarget, windows: Windows, acc: Accumulator, tokenizer: Any,
                      on_chunk: ChunkDone) -> dict[str, Any]:
    """Score every window on the server.

    Args:
        tokenizer: the served model's tokenizer (tokenmill Tokenizer): it made the windows
            and maps the alternatives' texts back to ids.

    Returns:
        What the server said about itself (name, model, and /version's config if any).
    """
    if target.num_logprobs < 1:
        raise ValueError("--logprobs must be at least 1: the most likely token is needed")
    return asyncio.run(_score(target, windows, acc, tokenizer, on_chunk))
