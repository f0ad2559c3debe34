"""From the signals that moved to an incident: what kind of trouble (the symptom people
feel), its likely cause (from which signals moved, together and first), and what to do.

The rules are ordered from the most specific evidence to the least: a backend that stopped
answering explains everything downstream of it; preemptions name the KV cache; longer
prompts name the traffic; slower steps with the same batch and the same prompts name the
machine (something else takes the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.observability.watch.detector import SignalRule

# The signals watched for changes, with the direction that hurts and the smallest change
# worth an incident. Latency floors are a few ms: below that, scheduling noise on a busy
# host; the relative sizes are the usual "50% slower" of an on-call page.
RULES = (
    SignalRule("ttft_s", +1, 0.5, 0.05),
    SignalRule("itl_s", +1, 0.3, 0.005),
    SignalRule("e2e_s", +1, 0.5, 0.1),
    SignalRule("queue_s", +1, 1.0, 0.05),
    SignalRule("prompt_tokens_per_request", +1, 0.5, 16),
    SignalRule("prompt_tokens_per_s", +1, 0.5, 50),
    SignalRule("tokens_per_s_per_running", -1, 0.5, 1.0),  # noisy at low load (few running)
    SignalRule("arrivals_per_s", +1, 0.5, 0.5),  # a surge of traffic
    SignalRule("aborts_per_s", +1, 1.0, 0.2),
    SignalRule("running", +1, 0.5, 2),
    SignalRule("waiting", +1, 1.0, 2),
    SignalRule("kv_cache_usage", +1, 0.3, 0.15),
    SignalRule("preemptions_per_s", +1, 1.0, 0.1),
    SignalRule("prefix_cache_hit_ratio", -1, 0.3, 0.1),
    SignalRule("errors_per_s", +1, 1.0, 0.1),
    SignalRule("rejections_per_s", +1, 1.0, 0.1),
    SignalRule("server_cpu", +1, 0.3, 0.2),  # more work; a CPU hog beside it does not raise it
    SignalRule("responses_not_yet_sent", +1, 1.0, 3),
    SignalRule("streams_waiting_on_client", +1, 1.0, 2),
)

# Symptom signals open incidents; the others are only evidence for a cause. In this order
# of precedence when several move in the same window (the most specific names the incident).
SYMPTOMS = {
    "errors_per_s": "error_burst", "rejections_per_s": "error_burst",
    "preemptions_per_s": "preemption_storm",
    "ttft_slo_burn": "slo_burn",
    # Not e2e: it follows the output lengths clients ask for (evidence, not a symptom).
    "ttft_s": "latency_regression", "itl_s": "latency_regression",
    "waiting": "queue_buildup", "queue_s": "queue_buildup",
    "tokens_per_s_per_running": "throughput_drop",
    "prefix_cache_hit_ratio": "cache_thrash", "kv_cache_usage": "cache_thrash",
    "responses_not_yet_sent": "stalled_streams", "streams_waiting_on_client": "stalled_streams",
    "aborts_per_s": "client_disconnects",
}
PRECEDENCE = {name: i for i, name in enumerate(SYMPTOMS)}

ACTIONS = {
    "backend_down": "Check the backend's process and host (logs, OOM killer, node events); the gateway "
                    "routes around it meanwhile. Restore or replace it before the others saturate.",
    "kv_cache_pressure": "The KV cache is too small for this load: raise --kv-cache-memory, lower "
                         "--max-num-seqs or --max-model-len, or add a replica.",
    "long_prompt_flood": "Prompts got much longer: find the client (logs by request id), cap prompt length "
                         "at the gateway, or give long-context traffic its own replicas.",
    "slow_clients": "Clients read slowly, stall or hang up while the server is not slow: check the "
                    "clients, their timeouts and the proxy's buffering (logs: status 499 by request id).",
    "cpu_contention": "Each engine step got slower with the same batch and prompts: something else uses "
                      "this machine's CPU (check top/cgroup throttling, noisy neighbours, thread settings).",
    "server_errors": "The server answers 5xx: read its error logs for the failing request ids.",
    "traffic_surge": "More work than normal (requests, or longer ones): scale out or rate-limit at the gateway.",
    "unknown": "No single cause stands out: see the evidence, in the order the signals moved.",
}


# Evidence that settles a cause: an open incident first diagnosed otherwise takes it on.
DECISIVE_CAUSES = ("backend_down", "kv_cache_pressure", "long_prompt_flood", "slow_clients")


@dataclass(frozen=True)
class Diagnosis:
    kind: str
    cause: str
    action: str


def diagnose(moved: dict[str, float], new_down: set[str], headline: str | None) -> Diagnosis:
    """`moved`: signal -> when it moved (every signal in a change now); `new_down`: endpoints or
    backends that stopped answering; `headline`: the first symptom signal that moved."""
    kind = SYMPTOMS.get(headline or "", "latency_regression")

    def has(*names: str) -> bool:
        return any(n in moved for n in names)

    if new_down:
        cause, kind = "backend_down", "backend_down"
    elif has("preemptions_per_s"):
        cause = "kv_cache_pressure"
    elif has("prompt_tokens_per_request"):
        cause = "long_prompt_flood"
    elif has("streams_waiting_on_client", "responses_not_yet_sent") or (
            has("aborts_per_s") and not has("ttft_s", "itl_s", "e2e_s")):  # they leave a server that is not slow
        cause = "slow_clients"
    elif has("errors_per_s"):
        cause = "server_errors"
    elif has("arrivals_per_s", "server_cpu"):  # more requests, or more work per request
        cause = "traffic_surge"
    elif has("itl_s", "tokens_per_s_per_running"):  # slower steps, same traffic, same CPU used
        cause = "cpu_contention"
    else:
        cause = "unknown"
    return Diagnosis(kind, cause, ACTIONS[cause])
