"""/metrics: vLLM's names under tokenmill:, values that move with traffic, and a client
that hangs up (streaming or not) has its request aborted and its KV blocks freed."""

from __future__ import annotations

import logging

import httpx
import pytest
from server_harness import MODEL_NAME, metric, running_server, wait_until

# A longer context than the default tiny model, so a request can outlive the disconnect.
LONG_CONTEXT = 2048
LONG = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 2000, "ignore_eos": True}

EXPECTED = [
    "tokenmill:num_requests_running", "tokenmill:num_requests_waiting", "tokenmill:kv_cache_usage_perc",
    "tokenmill:prefix_cache_queries_total", "tokenmill:prefix_cache_hits_total",
    "tokenmill:num_preemptions_total", "tokenmill:prompt_tokens_total", "tokenmill:generation_tokens_total",
    "tokenmill:time_to_first_token_seconds_count", "tokenmill:inter_token_latency_seconds_count",
    "tokenmill:request_time_per_output_token_seconds_count", "tokenmill:e2e_request_latency_seconds_count",
    "tokenmill:request_queue_time_seconds_count", "tokenmill:request_inference_time_seconds_count",
    "tokenmill:request_prefill_time_seconds_count", "tokenmill:request_decode_time_seconds_count",
    "tokenmill:request_prompt_tokens_count", "tokenmill:request_generation_tokens_count",
    "tokenmill:request_params_n_count", "tokenmill:request_params_max_tokens_count",
    "tokenmill:iteration_tokens_total_count",
]


@pytest.fixture(scope="module")
def server(checkpoint_factory):
    """Overrides conftest's: this module's model has the longer context."""
    model = checkpoint_factory("llama", max_position_embeddings=LONG_CONTEXT)
    with running_server(model) as s:
        yield s


def scrape(http: httpx.Client) -> str:
    resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return resp.text


def test_names_labels_and_values_after_traffic(http):
    # 40 tokens: two full KV blocks of 16 that the second request finds cached.
    body = {"model": MODEL_NAME, "prompt": list(range(3, 43)), "max_tokens": 5, "ignore_eos": True}
    for _ in range(2):  # the second one hits the prefix cache
        assert http.post("/v1/completions", json=body).status_code == 200
    text = scrape(http)
    for name in EXPECTED:
        metric(text, name, model_name=MODEL_NAME)
    assert metric(text, "tokenmill:request_success_total", finished_reason="length") == 2
    assert metric(text, "tokenmill:generation_tokens_total") == 10
    assert metric(text, "tokenmill:time_to_first_token_seconds_count") == 2
    assert metric(text, "tokenmill:inter_token_latency_seconds_count") == 8  # 4 gaps per request
    assert metric(text, "tokenmill:request_time_per_output_token_seconds_count") == 2
    assert metric(text, "tokenmill:request_generation_tokens_sum") == 10
    assert metric(text, "tokenmill:prefix_cache_hits_total") > 0
    assert metric(text, "tokenmill:num_requests_running") == 0
    assert 0 <= metric(text, "tokenmill:kv_cache_usage_perc") <= 1
    # One observation per engine step: the prefill step (40 prompt tokens + the first new
    # token), then 4 decode steps of 1, per request (vLLM counts the prompt when it is done).
    assert metric(text, "tokenmill:iteration_tokens_total_count") == 10
    assert metric(text, "tokenmill:iteration_tokens_total_sum") == 2 * (40 + 5)
    assert metric(text, "tokenmill:iteration_tokens_total_bucket", le="1.0") == 8


def test_operator_metrics(server, http):
    http.post("/v1/completions", json={**LONG, "max_tokens": 1})
    http.post("/v1/completions", json={**LONG, "temperature": -1})
    http.get("/v1/nothing")
    http.request("BREW", "/v1/completions")  # a method name of the client's choosing
    text = scrape(http)
    assert metric(text, "http_requests_total", handler="/v1/completions", method="POST", status="200") >= 1
    assert metric(text, "http_requests_total", handler="/v1/completions", method="POST", status="400") == 1
    assert metric(text, "http_requests_total", handler="none", method="GET", status="404") == 1
    assert metric(text, "http_requests_total", handler="/v1/completions", method="other", status="405") == 1
    for reason in ("capacity", "too_large", "shutting_down"):
        assert metric(text, "tokenmill:admission_rejections_total", model_name=MODEL_NAME, reason=reason) == 0
    assert metric(text, "process_resident_memory_bytes") > 10**7
    assert metric(text, "process_cpu_seconds_total") > 0
    assert metric(text, "tokenmill:cache_config_info", model_name=MODEL_NAME, block_size="16",
                  enable_prefix_caching="True", num_gpu_blocks="256", cache_dtype="float32") == 1


def _idle_after_abort(http: httpx.Client, num_aborts: int) -> str | None:
    text = scrape(http)
    done = (metric(text, "tokenmill:request_success_total", finished_reason="abort") == num_aborts
            and metric(text, "tokenmill:num_requests_running") == 0
            and metric(text, "tokenmill:kv_cache_usage_perc") == 0)
    return text if done else None


def test_disconnect_mid_stream_frees_blocks(server, http):
    with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert next(lines) == ""
        assert next(lines).startswith("data: ")
        assert metric(scrape(http), "tokenmill:kv_cache_usage_perc") > 0
    # Hung up; the engine aborts the request and frees its blocks.
    text = wait_until(lambda: _idle_after_abort(http, 1))
    assert metric(text, "tokenmill:generation_tokens_total") < 1000
    assert server.state.engine.num_unfinished == 0
    assert server.state.admission.num_inflight_seqs == 0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_disconnect_while_waiting_for_a_full_response(server, http):
    access, records = logging.getLogger("uvicorn.access"), _Records()
    access.addHandler(records)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", timeout=0.5,
                       json={"model": MODEL_NAME, "max_tokens": 2000, "ignore_eos": True,
                             "messages": [{"role": "user", "content": "Hi"}]})
        text = wait_until(lambda: _idle_after_abort(http, 2))
    finally:
        access.removeHandler(records)
        access.setLevel(level)
    # uvicorn writes no access line for a client that left; the server writes it, as 499.
    assert any('"POST /v1/chat/completions HTTP/1.1" 499' in line for line in records.lines), records.lines
    assert metric(text, "http_requests_total", handler="/v1/chat/completions", status="499") == 1
    assert server.state.engine.num_unfinished == 0
    assert server.state.admission.num_inflight_seqs == 0
    assert http.post("/v1/completions", json={**LONG, "max_tokens": 3}).status_code == 200
