"""What tokenmill's Grafana dashboards show: six dashboards over the server's and the
gateway's Prometheus metrics (vLLM's names under `tokenmill:`), built with Grafana's SDK.

Each panel's PromQL reads the raw metrics, not recording rules, so a dashboard works on any
Prometheus that scrapes `/metrics`. The SLO tiles are computed from `SLOS`
(observability/slo.py), the same definitions the alert rules come from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.models.dashboard import Dashboard as BuiltDashboard

from tokenmill.observability.dashboard_kit import (
    MODEL,
    Query,
    graph,
    increase,
    mean,
    new_dashboard,
    number_panels,
    percentiles,
    rate,
    series,
    tile,
)
from tokenmill.observability.slo import LatencySLO

# What must run besides a plain `tokenmill serve` for a dashboard's panels to have data.
NEEDS_GATEWAY = "gateway"
NEEDS_SPEC_DECODE = "speculative decoding"

_ENGINE_MODELS = "label_values(tokenmill:num_requests_running, model_name)"
_GATEWAY_MODELS = "label_values(tokenmill:gateway_requests_total, model)"
_GW_MODEL = 'model=~"$model_name"'  # the gateway labels the model a client asked for `model`
# API routes only: /metrics and /health polls would swamp the error ratio. http_requests_total
# carries no model label (it counts refusals before a model is known).
_API = 'handler=~"/v1/.+"'
_ERRORS = 'status=~"[45].."'


@dataclass(frozen=True)
class DashboardDef:
    filename: str  # under deploy/grafana/
    needs: str | None  # NEEDS_*: what else must run for its panels to have data
    build: Callable[[Sequence[LatencySLO]], Dashboard]


# ---- shared panels: one definition each, on every dashboard that shows them ------------------

def _running_waiting() -> list[Query]:
    return [Query(f"sum({series('tokenmill:num_requests_running', MODEL)})", "running"),
            Query(f"sum({series('tokenmill:num_requests_waiting', MODEL)})", "waiting")]


def _queue_panel(width: int = 12):
    return graph("Requests running and waiting", "Requests in the engine's batch (running) and queued for "
                 "it (waiting), all replicas of the selected models.", "short", _running_waiting(), width=width)


def _preemptions_panel(width: int = 12):
    return graph("Preemptions", "Requests evicted from the batch per second because KV cache blocks ran out "
                 "(recomputed later). Sustained preemption means the KV cache is too small for the load.",
                 "ops", [Query(f"sum({rate('tokenmill:num_preemptions_total', MODEL)})", "preemptions")],
                 width=width)


# ---- dashboards ----------------------------------------------------------------------------

def _slo_tiles(slo: LatencySLO) -> list:
    """Share of observations at or under the threshold over the dashboard's range, and how much
    of the error budget (1 - objective) that leaves: 100% = no bad observations, 0% = spent."""
    within = f'le="{slo.le}"'  # the threshold's bucket: observations at or under it
    good = f"sum({increase(slo.histogram + '_bucket', f'{MODEL}, {within}')})"
    total = f"sum({increase(slo.histogram + '_count', MODEL)})"
    sli = f"{good} / {total}"
    objective, budget = f"{slo.objective * 100:.4g}%", f"{slo.error_budget * 100:.4g}%"
    return [
        tile(f"{slo.title} ≤ {slo.threshold_s:g} s", f"Share of {slo.histogram} observations at or under "
             f"{slo.threshold_s:g} s over the dashboard's time range. Objective: {objective}.", "percentunit",
             Query(sli, instant=True), [(None, "red"), (slo.objective, "green")], decimals=2),
        tile(f"{slo.title}: error budget left", f"Share of the error budget ({budget} of observations over "
             f"{slo.threshold_s:g} s) not spent over the dashboard's time range. Below 0: the objective "
             f"({objective}) is missed.", "percentunit", Query(f"1 - (1 - {sli}) / {slo.error_budget:.6g}",
                                                                 instant=True),
             [(None, "red"), (0.0, "orange"), (0.25, "green")], decimals=1),
    ]


def overview(slos: Sequence[LatencySLO]) -> Dashboard:
    d = new_dashboard("tokenmill-overview", "tokenmill / Overview", "Service level, traffic, errors and "
                      "throughput of tokenmill servers.", ["overview"], _ENGINE_MODELS)
    d = d.with_row(Row("Service level objectives (over the dashboard's time range)"))
    for slo in slos:
        for panel in _slo_tiles(slo):
            d = d.with_panel(panel)
    return (d.with_row(Row("Traffic"))
            .with_panel(graph("Requests finished", "Requests finished per second, by finish reason (stop, "
                              "length, abort).", "reqps", [Query(
                                  f"sum by (finished_reason) ({rate('tokenmill:request_success_total', MODEL)})",
                                  "{{finished_reason}}")]))
            .with_panel(graph("API error ratio", "Share of /v1 API requests answered with each 4xx/5xx "
                              "status (499: the client left first). Counts all tokenmill servers scraped, "
                              "whatever the model.", "percentunit", [Query(
                                  f"sum by (status) ({rate('http_requests_total', f'{_API}, {_ERRORS}')})"
                                  f" / ignoring(status) group_left sum({rate('http_requests_total', _API)})",
                                  "{{status}}")]))
            .with_panel(graph("Tokens per second", "Prompt tokens prefilled and tokens generated per second.",
                              "short", [Query(f"sum({rate('tokenmill:prompt_tokens_total', MODEL)})", "prompt"),
                                        Query(f"sum({rate('tokenmill:generation_tokens_total', MODEL)})",
                                              "generation")]))
            .with_panel(_queue_panel()))


# (title, histogram, what one observation is)
_LATENCIES = (
    ("Time to first token", "tokenmill:time_to_first_token_seconds", "arrival to the first token, per request"),
    ("Inter-token latency", "tokenmill:inter_token_latency_seconds", "time between two tokens of a request"),
    ("Time per output token", "tokenmill:request_time_per_output_token_seconds",
     "decode time / (output tokens - 1), per request"),
    ("End-to-end request latency", "tokenmill:e2e_request_latency_seconds", "arrival to the last token"),
    ("Queue time", "tokenmill:request_queue_time_seconds", "arrival to first scheduled (waiting)"),
    ("Prefill time", "tokenmill:request_prefill_time_seconds", "first scheduled to the first token"),
    ("Decode time", "tokenmill:request_decode_time_seconds", "first token to the last token"),
    ("Inference time", "tokenmill:request_inference_time_seconds", "first scheduled to the last token"),
)


def latency(slos: Sequence[LatencySLO]) -> Dashboard:
    d = new_dashboard("tokenmill-latency", "tokenmill / Latency", "Percentiles (p50, p90, p99) of the "
                      "request latency histograms.", ["latency"], _ENGINE_MODELS)
    thresholds = {slo.histogram: slo for slo in slos}
    for title, histogram, what in _LATENCIES:
        slo = thresholds.get(histogram)
        note = f" Dashed line: the {slo.name} SLO threshold ({slo.threshold_s:g} s)." if slo else ""
        d = d.with_panel(graph(title, f"p50/p90/p99 of {histogram} ({what}) over the rate window.{note}", "s",
                               percentiles(histogram), line_at=slo.threshold_s if slo else None))
    return d


def cache(slos: Sequence[LatencySLO]) -> Dashboard:
    hit_rate = (f"sum({rate('tokenmill:prefix_cache_hits_total', MODEL)}) / "
                f"sum({rate('tokenmill:prefix_cache_queries_total', MODEL)})")
    return (new_dashboard("tokenmill-cache", "tokenmill / KV cache", "KV cache usage, prefix cache hits and "
                          "preemptions.", ["cache"], _ENGINE_MODELS)
            .with_panel(graph("KV cache usage", "Share of the KV cache's blocks in use, per server.",
                              "percentunit", [Query(series("tokenmill:kv_cache_usage_perc", MODEL),
                                                    "{{instance}} {{model_name}}")], max_val=1))
            .with_panel(graph("Prefix cache hit rate", "Prompt tokens found in the prefix cache / prompt "
                              "tokens looked up, over the rate window.", "percentunit",
                              [Query(hit_rate, "hit rate")], max_val=1))
            .with_panel(_preemptions_panel(width=24)))


def scheduler(slos: Sequence[LatencySLO]) -> Dashboard:
    iteration = "tokenmill:iteration_tokens_total"
    return (new_dashboard("tokenmill-scheduler", "tokenmill / Scheduler", "Batch occupancy, tokens per engine "
                          "step, preemptions and admission refusals.", ["scheduler"], _ENGINE_MODELS)
            .with_panel(_queue_panel())
            .with_panel(graph("Tokens per engine step", "Tokens computed in one engine step (prompt tokens "
                              "reaching their first output plus generated tokens): percentiles and mean.",
                              "short", [*percentiles(iteration), Query(mean(iteration, MODEL), "mean")]))
            .with_panel(_preemptions_panel())
            .with_panel(graph("Admission rejections", "Requests refused before reaching the engine, per "
                              "second, by reason (capacity: queue full; too_large; shutting_down).", "reqps",
                              [Query(f"sum by (reason) ({rate('tokenmill:admission_rejections_total', MODEL)})",
                                     "{{reason}}")])))


def spec_decode(slos: Sequence[LatencySLO]) -> Dashboard:
    def per_s(counter: str) -> str:
        return f"sum({rate(f'tokenmill:spec_decode_{counter}_total', MODEL)})"

    accepted, proposed, drafts = per_s("num_accepted_tokens"), per_s("num_draft_tokens"), per_s("num_drafts")
    per_pos = f"sum by (position) ({rate('tokenmill:spec_decode_num_accepted_tokens_per_pos_total', MODEL)})"
    return (new_dashboard("tokenmill-spec-decode", "tokenmill / Speculative decoding", "How many proposed "
                          "tokens the target model accepts. Empty unless the server runs with "
                          "--speculative-config.", ["speculative-decoding"], _ENGINE_MODELS)
            .with_panel(graph("Draft acceptance rate", "Accepted draft tokens / proposed draft tokens.",
                              "percentunit", [Query(f"{accepted} / {proposed}", "acceptance rate")], max_val=1))
            .with_panel(graph("Mean acceptance length", "Tokens produced per verification step: 1 (the "
                              "target's own token) + accepted draft tokens per draft, as vLLM reports it.",
                              "short", [Query(f"1 + {accepted} / {drafts}", "mean acceptance length")]))
            .with_panel(graph("Acceptance rate by draft position", "Share of drafts whose token at each "
                              "position was accepted (position 0 first).", "percentunit",
                              [Query(f"{per_pos} / ignoring(position) group_left {drafts}", "position {{position}}")],
                              max_val=1))
            .with_panel(graph("Draft tokens per second", "Draft tokens proposed and accepted per second.",
                              "short", [Query(proposed, "proposed"), Query(accepted, "accepted")])))


def gateway(slos: Sequence[LatencySLO]) -> Dashboard:
    def per_s(counter: str, by: str, selector: str = _GW_MODEL) -> str:
        return f"sum by ({by}) ({rate(f'tokenmill:gateway_{counter}', selector)})"

    return (new_dashboard("tokenmill-gateway", "tokenmill / Gateway", "The gateway in front of the servers: "
                          "traffic by status, its own latency, backends, limits and spend.", ["gateway"],
                          _GATEWAY_MODELS)
            .with_panel(graph("Requests by status", "Requests per second through the gateway, by the HTTP "
                              "status it answered.", "reqps", [Query(per_s("requests_total", "status"),
                                                                    "{{status}}")]))
            .with_panel(graph("Gateway added latency", "Time a request spends in the gateway itself (before "
                              "going upstream, and between the upstream's response and the client's): "
                              "percentiles over all requests.", "s",
                              percentiles("tokenmill:gateway_added_latency_seconds", "")))
            .with_panel(graph("Request latency through the gateway", "End-to-end request time as the "
                              "gateway sees it: percentiles.", "s",
                              percentiles("tokenmill:gateway_request_latency_seconds", _GW_MODEL)))
            .with_panel(graph("Backend health", "1: the backend's last health check passed, 0: it failed.",
                              "short", [Query("tokenmill:gateway_backend_healthy", "{{backend}}")], max_val=1))
            .with_panel(graph("Backend requests in flight", "Requests outstanding at each backend.", "short",
                              [Query("tokenmill:gateway_backend_outstanding_requests", "{{backend}}")]))
            .with_panel(graph("Backend circuit state", "Circuit breaker: 0 closed (in use), 1 half-open "
                              "(probing), 2 open (skipped).", "short",
                              [Query("tokenmill:gateway_backend_circuit_state", "{{backend}}")], max_val=2))
            .with_panel(graph("Rate-limited requests", "Requests refused with 429 per second, by the limit "
                              "hit (requests, tokens, parallel, budget_tokens, budget_usd).", "reqps",
                              [Query(per_s("rate_limited_requests_total", "limit"), "{{limit}}")]))
            .with_panel(graph("Tokens by key", "Tokens settled per second, by key and kind.", "short",
                              [Query(per_s("tokens_total", "key, kind"), "{{key}} {{kind}}")]))
            .with_panel(graph("Spend by key", "Dollars spent per hour at the configured model prices, by key.",
                              "currencyUSD", [Query(f"3600 * {per_s('spend_usd_total', 'key')}", "{{key}}")]))
            .with_panel(graph("Budget left by key", "Dollar budget left this period, for keys with a budget.",
                              "currencyUSD", [Query("min by (key) (tokenmill:gateway_remaining_budget_usd)",
                                                    "{{key}}")])))


DASHBOARDS = (
    DashboardDef("tokenmill-overview.json", None, overview),
    DashboardDef("tokenmill-latency.json", None, latency),
    DashboardDef("tokenmill-cache.json", None, cache),
    DashboardDef("tokenmill-scheduler.json", None, scheduler),
    DashboardDef("tokenmill-spec-decode.json", NEEDS_SPEC_DECODE, spec_decode),
    DashboardDef("tokenmill-gateway.json", NEEDS_GATEWAY, gateway),
)


def build_all(slos: Sequence[LatencySLO]) -> dict[str, BuiltDashboard]:
    return {d.filename: number_panels(d.build(slos).build()) for d in DASHBOARDS}
