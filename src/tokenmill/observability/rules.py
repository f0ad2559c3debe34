"""Prometheus recording and alerting rules for tokenmill, generated from the SLOs in slo.py.

`tokenmill rules --output deploy/prometheus/tokenmill-rules.yml` writes them; the committed
file is this module's output and a test keeps it so. Symptoms that users feel now page
(error budget burning fast, 5xx answers, a gateway with no backend left); causes that
predict trouble open a ticket (a queue that keeps growing, a full KV cache, preemptions,
load shedding), following the SRE workbook's "page on symptoms".

Burn-rate alerts are the workbook's multi-window, multi-burn-rate ones: an alert fires when
both a long window (the budget really is being spent) and a short window (it still is, so
the alert resets soon after a fix) burn faster than the rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tokenmill.observability.slo import ITL_SLO, SLOS, TTFT_SLO, LatencySLO

DEFAULT_OUTPUT = "deploy/prometheus/tokenmill-rules.yml"
SLO_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")  # every window a burn-rate alert reads
# The workbook's burn rates spend a 30-day budget: 14.4x for 1 h spends 2 % of it.
SLO_PERIOD_HOURS = 30 * 24


@dataclass(frozen=True)
class BurnRateWindow:
    severity: str  # "page" | "ticket"
    long_window: str  # a duration of SLO_WINDOWS
    short_window: str  # a twelfth of long_window (the workbook's ratio), also in SLO_WINDOWS
    burn_rate: float  # multiple of the error ratio that spends the budget in exactly the period

    @property
    def budget_spent_perc(self) -> float:
        """Share of the period's budget spent (in percent) by the time this fires."""
        return 100.0 * self.burn_rate * _hours(self.long_window) / SLO_PERIOD_HOURS


BURN_RATE_WINDOWS = (
    BurnRateWindow("page", "1h", "5m", 14.4),
    BurnRateWindow("page", "6h", "30m", 6.0),
    BurnRateWindow("ticket", "1d", "2h", 3.0),
    BurnRateWindow("ticket", "3d", "6h", 1.0),
)

# Thresholds of the other alerts: what an operator would be woken or ticketed for.
HTTP_ERROR_RATIO_PAGE = 0.05  # 5xx share of answers, over 5 min, held for 5 min
SHED_RATIO_TICKET = 0.01  # share of requests refused for capacity (503), held for 15 min
QUEUE_GROWTH_PER_MIN_TICKET = 1.0  # waiting requests added per minute, over 15 min, held for 5 min
KV_CACHE_USAGE_TICKET = 0.95  # fraction of KV blocks held by requests, held for 10 min
PREEMPTIONS_PER_REQUEST_TICKET = 0.2  # preemptions per finished request, over 5 min, held for 10 min
# Machines, not users, call these: a probe's 503 while a replica drains is by design, and
# scrapes would dilute the share of errors users see.
_PROBE_HANDLERS = '"/metrics|/health"'

_PCT = "{{ $value | humanizePercentage }}"
_VALUE = '{{ printf "%.2f" $value }}'  # humanize would write 0.6 as "600m"
_MODEL = "{{ $labels.model_name }}"
_INSTANCE = "{{ $labels.instance }}"


def _hours(window: str) -> float:
    units_h = {"m": 1 / 60, "h": 1.0, "d": 24.0}
    return float(window[:-1]) * units_h[window[-1]]


def _num(x: float) -> str:
    """A threshold as PromQL reads it, without float noise (1 - 0.99 is 0.010000000000000009)."""
    return f"{x:.6g}"


def _record(name: str, expr: str) -> dict:
    return {"record": name, "expr": expr}


def _alert(name: str, expr: str, severity: str, summary: str, description: str, runbook: str,
           for_: str | None = None, labels: dict | None = None) -> dict:
    rule: dict = {"alert": name, "expr": expr}
    if for_ is not None:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **(labels or {})}
    rule["annotations"] = {"summary": summary, "description": description, "runbook": runbook}
    return rule


def error_ratio_record(slo: LatencySLO, window: str) -> str:
    return f"tokenmill:slo_{slo.name}:error_ratio_rate{window}"


def _slo_group(slo: LatencySLO) -> dict:
    h = slo.histogram
    records = [_record(error_ratio_record(slo, w),
                       f'1 - sum by (model_name) (rate({h}_bucket{{le="{slo.le}"}}[{w}]))\n'
                       f"  / sum by (model_name) (rate({h}_count[{w}]))")
               for w in SLO_WINDOWS]  # no traffic: 0/0 is NaN, which never fires
    budget = slo.error_budget
    runbook = {
        "ttft": "Check tokenmill:num_requests_waiting (queueing: add replicas or lower the offered load), "
                "prompt lengths (tokenmill:request_prompt_tokens), --max-num-batched-tokens (the prefill "
                "chunk per step), KV cache usage and preemptions, and deploys or model changes since the "
                "burn began.",
        "itl": "Check the batch size (tokenmill:num_requests_running against --max-num-seqs), long prefills "
               "sharing steps with decodes (--max-num-batched-tokens), preemptions, CPU/GPU saturation "
               "and noisy neighbours on the host, and deploys since the burn began.",
    }.get(slo.name, "Check load, queueing, preemptions and recent deploys.")
    alerts = [
        _alert(f"Tokenmill{slo.name.upper()}ErrorBudgetBurn",
               f"{error_ratio_record(slo, b.long_window)} > ({_num(b.burn_rate)} * {_num(budget)})\n"
               f"and {error_ratio_record(slo, b.short_window)} > ({_num(b.burn_rate)} * {_num(budget)})",
               b.severity,
               f"{slo.title} SLO of {_MODEL}: error budget burning {_num(b.burn_rate)}x over {b.long_window}",
               f"{_PCT} of {slo.title.lower()} observations of {_MODEL} were over {_num(slo.threshold_s)} s "
               f"in the last {b.long_window} (and still over {_num(b.burn_rate)}x the budget in the last "
               f"{b.short_window}); the objective allows {_num(100 * budget)}%. At this rate "
               f"{_num(b.budget_spent_perc)}% of a 30-day error budget is spent in {b.long_window}.",
               runbook, labels={"slo": slo.name, "long_window": b.long_window, "short_window": b.short_window})
        for b in BURN_RATE_WINDOWS
    ]
    return {"name": f"tokenmill-slo-{slo.name}", "rules": records + alerts}


def _server_group() -> dict:
    http = "http_requests_total"
    finished = "sum by (model_name) (rate(tokenmill:request_success_total[5m]))"
    shed = 'sum by (model_name) (rate(tokenmill:admission_rejections_total{reason="capacity"}[5m]))'
    records = [
        _record("tokenmill:request_success:rate5m", finished),
        _record("tokenmill:prompt_tokens:rate5m", "sum by (model_name) (rate(tokenmill:prompt_tokens_total[5m]))"),
        _record("tokenmill:generation_tokens:rate5m",
                "sum by (model_name) (rate(tokenmill:generation_tokens_total[5m]))"),
        _record("tokenmill:http_requests:rate5m",
                f"sum by (job, handler, status) (rate({http}{{handler!~{_PROBE_HANDLERS}}}[5m]))"),
        _record("tokenmill:http_errors:ratio_rate5m",
                f'sum by (job) (rate({http}{{handler!~{_PROBE_HANDLERS}, status=~"5.."}}[5m]))\n'
                f"  / sum by (job) (rate({http}{{handler!~{_PROBE_HANDLERS}}}[5m]))"),
        # Admitted requests are counted when they finish (aborts included).
        _record("tokenmill:admission_rejections:ratio_rate5m", f"{shed}\n  / ({shed} + {finished})"),
        _record("tokenmill:num_preemptions:per_request_rate5m",
                f"sum by (model_name) (rate(tokenmill:num_preemptions_total[5m]))\n  / {finished}"),
        _record("tokenmill:prefix_cache_hits:ratio_rate5m",
                "sum by (model_name) (rate(tokenmill:prefix_cache_hits_total[5m]))\n"
                "  / sum by (model_name) (rate(tokenmill:prefix_cache_queries_total[5m]))"),
    ]
    alerts = [
        _alert("TokenmillHighErrorRate",
               f"tokenmill:http_errors:ratio_rate5m > {_num(HTTP_ERROR_RATIO_PAGE)}", "page",
               "tokenmill job {{ $labels.job }} answers 5xx to " + _PCT + " of requests",
               f"{_PCT} of API requests to {{{{ $labels.job }}}} (health checks and scrapes excluded) "
               f"were answered 5xx over 5 min, more than {_num(100 * HTTP_ERROR_RATIO_PAGE)}% for 5 min.",
               "See which status and handler on tokenmill:http_requests:rate5m: 503 engine_overloaded is "
               "load shedding (TokenmillLoadShedding, add capacity); 503 engine_dead means the engine "
               "thread died (server log, restart the replica); 500s are bugs (server log, request ids).",
               for_="5m"),
        _alert("TokenmillLoadShedding",
               f"tokenmill:admission_rejections:ratio_rate5m > {_num(SHED_RATIO_TICKET)}", "ticket",
               f"{_MODEL} refuses {_PCT} of requests for lack of capacity",
               f"{_PCT} of requests to {_MODEL} were refused with 503 engine_overloaded (running + "
               f"waiting sequences at capacity) over 5 min, more than {_num(100 * SHED_RATIO_TICKET)}% "
               f"for 15 min.",
               "The offered load exceeds what the replicas hold: add replicas, or raise --max-num-seqs "
               "(if KV cache usage allows) or --max-waiting-requests (at the cost of queueing time); "
               "check clients honour Retry-After.",
               for_="15m"),
        _alert("TokenmillQueueGrowing",
               f"deriv(tokenmill:num_requests_waiting[15m]) * 60 > {_num(QUEUE_GROWTH_PER_MIN_TICKET)}",
               "ticket",
               f"Waiting requests of {_MODEL} on {_INSTANCE} keep growing",
               f"The queue of {_MODEL} on {_INSTANCE} grew by {_VALUE} requests per minute over the "
               f"last 15 min: requests arrive faster than the engine finishes them, and time to first "
               f"token grows with the queue.",
               "Compare the arrival rate with tokenmill:request_success:rate5m, check the batch is full "
               "(tokenmill:num_requests_running against --max-num-seqs) and not preempting; add replicas "
               "or spread load (gateway routing).",
               for_="5m"),
        _alert("TokenmillKVCacheSaturated",
               f"tokenmill:kv_cache_usage_perc > {_num(KV_CACHE_USAGE_TICKET)}", "ticket",
               f"KV cache of {_MODEL} on {_INSTANCE} is {_PCT} full",
               f"Requests hold {_PCT} of the KV cache blocks of {_MODEL} on {_INSTANCE}, over "
               f"{_num(100 * KV_CACHE_USAGE_TICKET)}% for 10 min: new requests wait for blocks and "
               f"running ones get preempted.",
               "Check preemptions (tokenmill:num_preemptions_total) and sequence lengths; give the cache "
               "more memory (--kv-cache-memory, --kv-cache-memory-fraction), lower --max-num-seqs or "
               "--max-model-len, or add replicas.",
               for_="10m"),
        _alert("TokenmillPreemptionStorm",
               f"tokenmill:num_preemptions:per_request_rate5m > {_num(PREEMPTIONS_PER_REQUEST_TICKET)}",
               "ticket",
               f"{_MODEL} preempts {_VALUE} times per finished request",
               f"The engine of {_MODEL} preempted requests {_VALUE} times per finished request over 5 min "
               f"(more than {_num(PREEMPTIONS_PER_REQUEST_TICKET)} for 10 min): KV blocks run out, and "
               f"each preemption recomputes its request's prefill.",
               "Look at tokenmill:kv_cache_usage_perc (saturated?) and the generation lengths; lower "
               "--max-num-seqs so the batch fits the cache, give the cache more memory, or add replicas.",
               for_="10m"),
    ]
    return {"name": "tokenmill-server", "rules": records + alerts}


def _gateway_group() -> dict:
    """Rules over the gateway's metrics; they match nothing where no gateway is scraped."""
    req = "tokenmill:gateway_requests_total"
    healthy = "tokenmill:gateway_backend_healthy"
    records = [
        _record("tokenmill:gateway_errors:ratio_rate5m",
                f'sum by (job) (rate({req}{{status=~"5.."}}[5m]))\n  / sum by (job) (rate({req}[5m]))'),
    ]
    alerts = [
        _alert("TokenmillGatewayBackendDown", f"{healthy} == 0", "ticket",
               "Gateway {{ $labels.instance }}: backend {{ $labels.backend }} is down",
               "Backend {{ $labels.backend }} failed the health checks of gateway {{ $labels.instance }} "
               "for 2 min; the gateway sends its traffic to the other backends.",
               "Check the backend's /health and logs (engine_dead? draining?), its pod or host, and the "
               "network between gateway and backend; tokenmill:gateway_retries_total shows why calls failed.",
               for_="2m"),
        _alert("TokenmillGatewayNoHealthyBackend", f"max without (backend) ({healthy}) == 0", "page",
               "Gateway {{ $labels.instance }} has no healthy backend",
               "Every backend of gateway {{ $labels.instance }} failed its health checks for 1 min: "
               "all requests through it fail.",
               "Check the backends (TokenmillGatewayBackendDown alerts, their /health and logs) and the "
               "gateway's backend list in its --config; a deploy that replaced every replica at once?",
               for_="1m"),
        _alert("TokenmillGatewayHighErrorRate",
               f"tokenmill:gateway_errors:ratio_rate5m > {_num(HTTP_ERROR_RATIO_PAGE)}", "page",
               "Gateway job {{ $labels.job }} answers 5xx to " + _PCT + " of requests",
               f"{_PCT} of requests through {{{{ $labels.job }}}} were answered 5xx over 5 min, more "
               f"than {_num(100 * HTTP_ERROR_RATIO_PAGE)}% for 5 min.",
               "See tokenmill:gateway_requests_total by backend and status: one backend (its health, "
               "circuit state) or all of them (capacity: 503s, TokenmillLoadShedding), and the gateway's log.",
               for_="5m"),
    ]
    return {"name": "tokenmill-gateway", "rules": records + alerts}


def rule_groups(slos: tuple[LatencySLO, ...] = SLOS) -> dict:
    """The rule file's content: one group per SLO (its alerts read records evaluated just
    before them in the same group), the server's and the gateway's."""
    return {"groups": [*(_slo_group(s) for s in slos), _server_group(), _gateway_group()]}


class _Dumper(yaml.SafeDumper):
    """Multi-line PromQL as `|` blocks, so the file reads like hand-written rules."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def rules_yaml(slos: tuple[LatencySLO, ...] = SLOS, command: str = f"tokenmill rules --output {DEFAULT_OUTPUT}") -> str:
    """The rule file's text; `command` is the one named in its header as its writer."""
    header = (f"# Generated by `{command}` (tokenmill.observability.rules): do not edit, regenerate.\n"
              + "".join(f"# SLO {s.name}: {_num(100 * s.objective)}% of {s.title.lower()} observations "
                        f"<= {_num(s.threshold_s)} s\n" for s in slos))
    return header + yaml.dump(rule_groups(slos), Dumper=_Dumper, sort_keys=False, width=1_000_000)


def add_rules_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rules", help="Write Prometheus recording and alerting rules (SLO burn rates, errors, saturation).",
        description="Write tokenmill's Prometheus rules: SLI recording rules, multi-window multi-burn-rate "
                    "alerts on the time-to-first-token and inter-token-latency SLOs, and alerts on 5xx "
                    "answers, load shedding, queue growth, KV cache saturation, preemptions and gateway "
                    "backends. Load the file with rule_files in prometheus.yml (docs/observability.md).",
        epilog=f"example: tokenmill rules --output {DEFAULT_OUTPUT} --ttft-threshold-s 2.5 --objective 0.995")
    p.add_argument("--output", default="-", metavar="FILE", help="Where to write the rules; - is stdout. (default: -)")
    p.add_argument("--ttft-threshold-s", type=float, default=None, metavar="S",
                   help=f"TTFT SLO threshold, a bucket bound of {TTFT_SLO.histogram}. "
                        f"(default: {_num(TTFT_SLO.threshold_s)})")
    p.add_argument("--itl-threshold-s", type=float, default=None, metavar="S",
                   help=f"ITL SLO threshold, a bucket bound of {ITL_SLO.histogram}. "
                        f"(default: {_num(ITL_SLO.threshold_s)})")
    p.add_argument("--objective", type=float, default=None,
                   help="Share of observations within the threshold, for both SLOs, e.g. 0.995. "
                        f"(default: {_num(TTFT_SLO.objective)})")
    p.set_defaults(func=cmd_rules)


def slos_from_args(args: argparse.Namespace) -> tuple[LatencySLO, ...]:
    """The SLOs with the command line's overrides; ValueError (from LatencySLO) when invalid."""
    thresholds_s = {"ttft": args.ttft_threshold_s, "itl": args.itl_threshold_s}
    out = []
    for slo in SLOS:
        changes = {}
        if thresholds_s.get(slo.name) is not None:
            changes["threshold_s"] = thresholds_s[slo.name]
        if args.objective is not None:
            changes["objective"] = args.objective
        out.append(dataclasses.replace(slo, **changes))
    return tuple(out)


def cmd_rules(args: argparse.Namespace) -> int:
    try:
        slos = slos_from_args(args)
    except ValueError as e:
        print(f"tokenmill rules: {e}", file=sys.stderr)
        return 2
    flags = [("--output", args.output if args.output != "-" else None),
             ("--ttft-threshold-s", args.ttft_threshold_s), ("--itl-threshold-s", args.itl_threshold_s),
             ("--objective", args.objective)]
    command = " ".join(["tokenmill rules", *(f"{flag} {value}" for flag, value in flags if value is not None)])
    text = rules_yaml(slos, command)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return 0

