"""One streaming request to an OpenAI-compatible endpoint, timed chunk by chunk.

Works with any server that streams Server-Sent Events the OpenAI way (tokenmill, vLLM,
SGLang, TGI, llama.cpp). Token accounting, in order of trust:
1. `usage` in every chunk (`stream_options.continuous_usage_stats`, vLLM/tokenmill): exact
   tokens per chunk;
2. the final `usage` block: exact total; per-chunk counts are 1 each when the total equals
   the number of chunks, else estimated by re-tokenizing each chunk's text;
3. no usage: the total is the re-tokenized text (or the chunk count without a tokenizer).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from tokenmill.bench.schema import Endpoint, RequestSample, RequestSpec
from tokenmill.bench.spec_counts import SpecDecodeCounts

Clock = Callable[[], float]


@dataclass(frozen=True)
class EndpointSpec:
    """Where and how to send requests."""

    api_base: str  # ends in /v1
    model: str
    endpoint: Endpoint = "completions"
    ignore_eos: bool = True  # fixed output lengths; servers that know the field honour it
    openai_strict: bool = False  # send only fields of the OpenAI API (drops vLLM extras)
    continuous_usage: bool = True  # ask for usage in every chunk (vLLM's continuous_usage_stats)
    extra_body: dict[str, Any] = field(default_factory=dict)
    temperature: float | None = None  # None: the server's default
    request_timeout_s: float = 600.0

    @property
    def url(self) -> str:
        return f"{self.api_base}/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"


def http_client(max_concurrency: int | None, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client with a connection per request in flight (no pool queueing in timings)."""
    limits = httpx.Limits(max_connections=max_concurrency or 1000, max_keepalive_connections=None)
    return httpx.AsyncClient(limits=limits, timeout=timeout_s)


def split_base_url(base_url: str) -> tuple[str, str]:
    """(server root, API base ending in /v1) from a URL given with or without /v1."""
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    return root, root + "/v1"


def build_payload(spec: EndpointSpec, req: RequestSpec) -> dict[str, Any]:
    """The JSON body for one request (stream on, usage requested)."""
    body: dict[str, Any] = {"model": spec.model, "stream": True}
    if spec.endpoint == "chat":
        prompt = req.prompt
        is_messages = isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)
        body["messages"] = prompt if is_messages else [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = req.prompt
    if req.output_len is not None:
        body["max_tokens"] = req.output_len  # every server knows it, chat included
    if spec.temperature is not None:
        body["temperature"] = spec.temperature
    body["stream_options"] = {"include_usage": True}
    if not spec.openai_strict:
        if spec.continuous_usage:
            body["stream_options"]["continuous_usage_stats"] = True
        if spec.ignore_eos:
            body["ignore_eos"] = True
    body.update(spec.extra_body)
    return body


def _headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _chunk_text(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        delta = choice["delta"] or {}
        # Reasoning models stream their thinking in a separate field; it is output too.
        return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    return choice.get("text") or ""


async def send_request(
    client: httpx.AsyncClient,
    spec: EndpointSpec,
    req: RequestSpec,
    sample: RequestSample,
    count_tokens: Callable[[str], int] | None = None,
    clock: Clock = time.perf_counter,
) -> RequestSample:
    """Send one streaming request and fill `sample` as chunks arrive.

    Args:
        client: shared HTTP client (connection pool).
        spec: endpoint settings.
        req: the prompt.
        sample: filled in place, so a caller that cancels this coroutine keeps what arrived
            (on cancellation the status is "incomplete" and CancelledError propagates).
        count_tokens: re-tokenizer for servers that report no usage; None counts chunks.
        clock: seconds; tests pass a virtual clock for exact timings.

    Returns:
        The same sample, with status "ok" or "error".
    """
    texts: list[str] = []  # text of each token chunk
    cumulative: list[int] = []  # completion_tokens at each token chunk (continuous usage only)
    usage: dict[str, Any] = {}
    is_finished = False
    is_continuous: bool | None = None  # decided by the first chunk that has choices
    t0 = clock()
    try:
        async with client.stream("POST", spec.url, json=build_payload(spec, req), headers=_headers(),
                                 timeout=spec.request_timeout_s) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                sample.status, sample.error = "error", f"HTTP {resp.status_code}: {body[:500]}"
                return sample
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, ": ping" comments, "event:" lines
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    is_finished = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    sample.status, sample.error = "error", json.dumps(obj["error"])[:500]
                    return sample
                now_s = clock() - t0
                choices = obj.get("choices") or []
                chunk_usage = obj.get("usage") or {}
                if chunk_usage:
                    usage = chunk_usage
                if not choices:
                    continue  # the usage-only trailer
                is_finished = is_finished or bool(choices[0].get("finish_reason"))
                text = _chunk_text(choices[0])
                done = chunk_usage.get("completion_tokens")
                if is_continuous is None:
                    is_continuous = done is not None
                # With per-chunk usage trust the count; else a token chunk is one with text.
                if is_continuous:
                    if done is None or done <= (cumulative[-1] if cumulative else 0):
                        continue
                    cumulative.append(done)
                elif not text:
                    continue
                sample.chunk_times_s.append(now_s)
                texts.append(text)
    except asyncio.CancelledError:
        sample.status, sample.error = "incomplete", "cancelled before the stream finished"
        raise
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        sample.status, sample.error = "error", f"{type(exc).__name__}: {exc}"[:500]
        return sample
    if not is_finished:
        sample.status, sample.error = "error", "stream ended without [DONE] or finish_reason"
    elif not sample.chunk_times_s:
        sample.status, sample.error = "error", "no output token received"
    else:
        sample.status = "ok"
    _account_tokens(sample, req, texts, cumulative, usage, count_tokens)
    return sample


def _account_tokens(sample: RequestSample, req: RequestSpec, texts: list[str], cumulative: list[int],
                    usage: dict[str, Any], count_tokens: Callable[[str], int] | None) -> None:
    """Fill the token counts of a finished stream.

    cumulative: completion_tokens at each token chunk when the server sent usage in every
    chunk, else empty.
    """
    sample.prompt_tokens = int(usage.get("prompt_tokens") or req.prompt_len)
    if usage.get("completion_tokens") is not None:
        sample.output_tokens, sample.token_count_source = int(usage["completion_tokens"]), "usage"
    elif count_tokens is not None:
        sample.output_tokens, sample.token_count_source = count_tokens("".join(texts)), "tokenizer"
    else:
        sample.output_tokens, sample.token_count_source = len(texts), "chunks"
    if cumulative:
        sample.chunk_tokens = [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)]
    elif sample.output_tokens == len(texts) or count_tokens is None:
        sample.chunk_tokens = [1] * len(texts)
    else:
        sample.chunk_tokens = [max(1, count_tokens(t)) for t in texts]


async def negotiate_fields(
    client: httpx.AsyncClient, spec: EndpointSpec, req: RequestSpec
) -> tuple[EndpointSpec, list[str]]:
    """Drop the non-OpenAI extras a server rejects, so one command works against any server.

    Sends a 2-token probe (not measured; it also fails fast when the server is unreachable);
    on HTTP 400 naming continuous_usage_stats or ignore_eos, that field is dropped and the
    probe repeated.

    Args:
        client: HTTP client.
        spec: endpoint settings as asked.
        req: a prompt to probe with.

    Returns:
        (the spec to use, notes saying what was dropped and what it costs).

    Raises:
        RuntimeError: the server cannot be reached.
    """
    notes: list[str] = []
    for _ in range(3):
        try:
            resp = await client.post(spec.url, json=build_payload(spec, replace(req, output_len=2)),
                                     headers=_headers(), timeout=spec.request_timeout_s)
        except httpx.TransportError as exc:
            raise RuntimeError(f"cannot reach {spec.url}: {type(exc).__name__} {exc}") from exc
        if resp.status_code != 400 or spec.openai_strict:
            break
        if spec.continuous_usage and "continuous_usage_stats" in resp.text:
            spec = replace(spec, continuous_usage=False)
            notes.append("server rejects stream_options.continuous_usage_stats: tokens per chunk come "
                         "from the final usage (exact total) and re-tokenization")
        elif spec.ignore_eos and "ignore_eos" in resp.text:
            spec = replace(spec, ignore_eos=False)
            notes.append("server rejects ignore_eos: output lengths may be shorter than asked")
        else:
            break
    return spec, notes


async def fetch_server_info(client: httpx.AsyncClient, root_url: str) -> dict[str, Any] | None:
    """What GET {root}/version says (tokenmill: name, version, engine config); None if nothing."""
    try:
        resp = await client.get(f"{root_url}/version", timeout=5.0)
        if resp.status_code == 200:
            info = resp.json()
            return info if isinstance(info, dict) else {"version": info}
    except (httpx.HTTPError, ValueError):
        pass
    return None


async def fetch_spec_decode_counts(client: httpx.AsyncClient, root_url: str,
                                   model: str | None) -> SpecDecodeCounts | None:
    """The speculative decoding counters of GET {root}/metrics (tokenmill: or vllm: names);
    None when the server has no /metrics or no such counters (no error: most servers)."""
    try:
        resp = await client.get(f"{root_url}/metrics", headers=_headers(), timeout=10.0)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return SpecDecodeCounts.from_prometheus(resp.text, model)


async def fetch_first_model(client: httpx.AsyncClient, api_base: str) -> str:
    """The first model id of GET {api_base}/models (vLLM's default for --model)."""
    try:
        resp = await client.get(f"{api_base}/models", headers=_headers(), timeout=10.0)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise RuntimeError(f"could not list models at {api_base}/models ({exc}); pass --model") from exc
