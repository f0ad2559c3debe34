"""Prometheus metrics with vLLM's names and meanings under the `tokenmill:` prefix.

Request histograms are fed by AsyncLLM.on_output (called on the event loop with each
delivered output and its RequestTimes). Scheduler gauges and the engine's cumulative
counters are read from `engine.stats` at scrape time, so they cost nothing between
scrapes. HTTP counts come from the middleware, process metrics from prometheus_client's
own collectors. Each app has its own CollectorRegistry: several servers in one process
(tests) do not collide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tokenmill.outputs import RequestOutput

if TYPE_CHECKING:  # annotations only: the bucket constants import without the engine (torch)
    from tokenmill.engine.async_llm import AsyncLLM, RequestTimes

# vLLM's buckets, so histogram_quantile queries from its dashboards mean the same here.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
FINISH_REASONS = ("stop", "length", "abort")
# vLLM's buckets for tokens per engine step.
ITERATION_TOKENS_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
ADMISSION_REJECTION_REASONS = ("capacity", "too_large", "shutting_down")
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def buckets_1_2_5(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets)."""
    out, mantissas, exponent = [], (1, 2, 5), 0
    while True:
        for m in mantissas:
            value = m * 10**exponent
            if value > limit:
                return out
            out.append(value)
        exponent += 1


@dataclass
class _Tracked:
    """Per-request progress between outputs (event loop only)."""

    num_prompt_tokens: int
    tokens_per_sample: dict[int, int] = field(default_factory=dict)  # sample index -> tokens
    finish_reasons: dict[int, str] = field(default_factory=dict)
    num_token_times_seen: int = 0
    last_token_time: float | None = None
    ttft_observed: bool = False


class _EngineStatsCollector:
    """Scheduler gauges and cumulative engine counters, read when Prometheus scrapes."""

    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.engine = engine
        self.labels = [model_name]

    def collect(self):
        s = self.engine.stats
        for name, doc, value in (
            ("num_requests_running", "Number of requests in model execution batches.", s.num_running),
            ("num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting),
            ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage),
        ):
            g = GaugeMetricFamily(f"tokenmill:{name}", doc, labels=["model_name"])
            g.add_metric(self.labels, value)
            yield g
        spec = s.spec_decode
        counters = [
            ("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             s.prefix_cache_queries),
            ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             s.prefix_cache_hits),
            ("num_preemptions", "Cumulative number of preemption from the engine.", s.num_preemptions),
        ]
        if spec is not None:
            counters += [
                ("spec_decode_num_drafts", "Number of spec decoding drafts.", spec.num_drafts),
                ("spec_decode_num_draft_tokens", "Number of draft tokens.", spec.num_draft_tokens),
                ("spec_decode_num_accepted_tokens", "Number of accepted tokens.", spec.num_accepted_tokens),
            ]
        for name, doc, value in counters:
            c = CounterMetricFamily(f"tokenmill:{name}", doc, labels=["model_name"])
            c.add_metric(self.labels, value)
            yield c
        if spec is None:
            return
        c = CounterMetricFamily("tokenmill:spec_decode_num_accepted_tokens_per_pos",
                                "Accepted tokens per draft position.", labels=["model_name", "position"])
        for position, value in enumerate(spec.accepted_per_pos):
            c.add_metric(self.labels + [str(position)], value)
        yield c


class ServerMetrics:
    """Owns the app's registry and the per-request tracking behind the histograms."""

    def __init__(self, engine: AsyncLLM, model_name: str, max_model_len: int) -> None:
        # vLLM turns off the *_created series too; they double the exposition for no use.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(engine, model_name))
        # process_* (resident memory, CPU seconds, open fds), python_info, python_gc_*: what
        # prometheus_client's default registry exports, as vLLM's /metrics does.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self._live: dict[str, _Tracked] = {}
        # The engine step whose outputs are being delivered: its time and tokens so far.
        self._step_time: float | None = None
        self._step_tokens = 0
        labels, reg = ["model_name"], self.registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"tokenmill:{name}", doc, labels, registry=reg).labels(model_name)

        def histogram(name: str, doc: str, buckets: list) -> Histogram:
            return Histogram(f"tokenmill:{name}", doc, labels, buckets=buckets, registry=reg).labels(model_name)

        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        success = Counter("tokenmill:request_success", "Count of successfully processed requests.",
                          labels + ["finished_reason"], registry=reg)
        self.request_success = {r: success.labels(model_name, r) for r in FINISH_REASONS}

        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)

        def phase_time(name: str, phase: str) -> Histogram:
            return histogram(name, f"Histogram of time spent in {phase} phase for request.",
                             REQUEST_LATENCY_BUCKETS)

        # A request's phases, with vLLM's help texts: queue (WAITING), then inference (RUNNING),
        # which is prefill + decode.
        self.queue_time = phase_time("request_queue_time_seconds", "WAITING")
        self.inference_time = phase_time("request_inference_time_seconds", "RUNNING")
        self.prefill_time = phase_time("request_prefill_time_seconds", "PREFILL")
        self.decode_time = phase_time("request_decode_time_seconds", "DECODE")

        token_buckets = buckets_1_2_5(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed.",
                                               token_buckets)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Number of generation tokens processed.", token_buckets)
        self.request_params_n = histogram("request_params_n", "Histogram of the n request parameter.",
                                          [1, 2, 5, 10, 20])
        self.request_params_max_tokens = histogram("request_params_max_tokens",
                                                   "Histogram of the max_tokens request parameter.",
                                                   token_buckets)

        # vLLM's: prompt tokens of requests that reached their first output in a step plus
        # the tokens generated in it, observed once per step.
        self.iteration_tokens = histogram("iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                          ITERATION_TOKENS_BUCKETS)
        rejections = Counter("tokenmill:admission_rejections", "Requests refused at admission, by reason.",
                             labels + ["reason"], registry=reg)
        self.admission_rejections = {r: rejections.labels(model_name, r) for r in ADMISSION_REJECTION_REASONS}
        # vLLM's instrumentator names; the status is the exact code (499: the client left first).
        # Flow control: a stream's write waits while its client reads slower than the server
        # writes (the socket and transport buffers are full). Near 0 with healthy clients.
        self.streams_waiting_on_client = Gauge(
            "tokenmill:num_streams_waiting_on_client",
            "Streaming responses whose next write waits for the client to read.", labels, registry=reg,
        ).labels(model_name)
        self.http_requests = Counter("http_requests", "Total number of requests by method, status and handler.",
                                     ["handler", "method", "status"], registry=reg)
        cache = engine.config.cache
        cache_info = {"block_size": cache.block_size, "cache_dtype": str(engine.config.dtype).removeprefix("torch."),
                      "enable_prefix_caching": cache.enable_prefix_caching,
                      "num_gpu_blocks": engine.core.num_kv_blocks,  # vLLM's name, whatever the device
                      "kv_cache_capacity_tokens": engine.core.kv_capacity_tokens}
        Gauge("tokenmill:cache_config_info", "Information of the LLMEngine CacheConfig",
              labels + list(cache_info), registry=reg).labels(
                  model_name, *(str(v) for v in cache_info.values())).set(1)

    def render(self) -> bytes:
        self._end_step()
        return prometheus_client.generate_latest(self.registry)

    def record_http(self, handler: str, method: str, status: int) -> None:
        # Clients choose the method: any other name would be a new series each.
        method = method if method in _HTTP_METHODS else "other"
        self.http_requests.labels(handler, method, str(status)).inc()

    def record_rejection(self, reason: str) -> None:
        self.admission_rejections[reason].inc()

    def record_params(self, n: int, max_tokens: int) -> None:
        self.request_params_n.observe(n)
        self.request_params_max_tokens.observe(max_tokens)

    def on_output(self, out: RequestOutput, times: RequestTimes) -> None:
        """AsyncLLM observer: one delivered (delta) output of a request."""
        # Every output of one engine step carries that step's time (the OutputProcessor
        # stamps a delivery once): a new time means the previous step is complete.
        step_time = times.token_times[-1] if times.token_times else None
        if step_time != self._step_time:
            self._end_step()
            self._step_time = step_time
        st = self._live.get(out.request_id)
        if st is None:
            # The first output comes once the prompt has been prefilled.
            st = self._live[out.request_id] = _Tracked(len(out.prompt_token_ids))
            self.prompt_tokens.inc(st.num_prompt_tokens)
            self._step_tokens += st.num_prompt_tokens
        num_new = 0
        for o in out.outputs:
            num_new += len(o.token_ids)
            st.tokens_per_sample[o.index] = st.tokens_per_sample.get(o.index, 0) + len(o.token_ids)
            if o.finish_reason is not None:
                st.finish_reasons[o.index] = o.finish_reason
        if num_new:
            self.generation_tokens.inc(num_new)
            self._step_tokens += num_new
        if times.first_token is not None and not st.ttft_observed:
            st.ttft_observed = True
            self.ttft.observe(times.first_token - times.arrival)
        # token_times has one entry per sample per step; n>1 siblings share a step's time.
        for t in times.token_times[st.num_token_times_seen:]:
            if st.last_token_time is not None and t > st.last_token_time:
                self.itl.observe(t - st.last_token_time)
            st.last_token_time = t if st.last_token_time is None else max(t, st.last_token_time)
        st.num_token_times_seen = len(times.token_times)
        if out.finished:
            self._finish(out.request_id, st, times)

    def _end_step(self) -> None:
        if self._step_tokens:
            self.iteration_tokens.observe(self._step_tokens)
        self._step_tokens = 0

    def _finish(self, request_id: str, st: _Tracked, times: RequestTimes) -> None:
        del self._live[request_id]
        for reason in st.finish_reasons.values():
            self.request_success[reason].inc()
        self.e2e.observe(times.e2e_s)
        self.request_prompt_tokens.observe(st.num_prompt_tokens)
        self.request_generation_tokens.observe(sum(st.tokens_per_sample.values()))
        for histogram, value_s in ((self.queue_time, times.queue_s), (self.inference_time, times.inference_s),
                                   (self.prefill_time, times.prefill_s)):
            if value_s is not None:
                histogram.observe(value_s)
        decode_s = times.decode_s
        if decode_s is not None:
            self.decode_time.observe(decode_s)
            longest = max(st.tokens_per_sample.values(), default=0)
            if longest > 1:
                self.tpot.observe(decode_s / (longest - 1))

    def record_abort(self, request_id: str, n: int) -> None:
        """A request ended before finishing (client gone, cancelled, drained): count its
        unfinished samples as finished_reason="abort" and forget it."""
        st = self._live.pop(request_id, None)
        num_done = len(st.finish_reasons) if st is not None else 0
        if n - num_done > 0:
            self.request_success["abort"].inc(n - num_done)
