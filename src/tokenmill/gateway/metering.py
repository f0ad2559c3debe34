"""From a key and a request to the limiter's terms, and from its decision to OpenAI's 429s
and x-ratelimit-* headers."""

from __future__ import annotations

from tokenmill.gateway.accounting import Estimate
from tokenmill.gateway.config import ModelPolicy
from tokenmill.gateway.keys import KeyRecord
from tokenmill.gateway.limits import Budget, Decision, Reservation, Scope, budget_period, ceil_s
from tokenmill.server.errors import APIError


def reservation_for(request_id: str, key: KeyRecord | None, model: str, policy: ModelPolicy, est: Estimate,
                    now: float) -> Reservation:
    """The scopes that limit this request (only those with a limit) and the key's budget."""
    scopes = []
    if key is not None:
        lim = key.limits
        if lim.rpm_limit is not None or lim.tpm_limit is not None or lim.max_parallel_requests is not None:
            scopes.append(Scope(f"key:{key.key_id}", lim.rpm_limit, lim.tpm_limit, lim.max_parallel_requests))
        rpm, tpm = lim.model_rpm_limit.get(model), lim.model_tpm_limit.get(model)
        if rpm is not None or tpm is not None:
            scopes.append(Scope(f"key:{key.key_id}:model:{model}", rpm, tpm))
    if policy.rpm is not None or policy.tpm is not None or policy.max_parallel_requests is not None:
        scopes.append(Scope(f"model:{model}", policy.rpm, policy.tpm, policy.max_parallel_requests))
    budget = None
    if key is not None and (key.limits.max_budget is not None or key.limits.max_budget_tokens is not None):
        budget = key_budget(key, now)
    usd = policy.cost_usd(est.prompt_tokens, est.completion_tokens)
    return Reservation(request_id, tuple(scopes), budget, est.total, usd)


def key_budget(key: KeyRecord, now: float) -> Budget:
    period, reset_at = budget_period(key.limits.budget_duration, now)
    return Budget(f"{key.key_id}:{period}", key.limits.max_budget_tokens, key.limits.max_budget, reset_at)


def _duration(seconds: float | None) -> str:
    """OpenAI's reset format: 1s, 6m0s, 1h2m3s (ms under a second)."""
    if seconds is None:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    s = ceil_s(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{s}s"


def rate_limit_headers(decision: Decision | None) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the tightest limits (none when nothing is limited)."""
    if decision is None:
        return {}
    out = {}
    if decision.limit_requests is not None:
        out["x-ratelimit-limit-requests"] = str(decision.limit_requests)
        out["x-ratelimit-remaining-requests"] = str(decision.remaining_requests)
        out["x-ratelimit-reset-requests"] = _duration(decision.reset_requests_s)
    if decision.limit_tokens is not None:
        out["x-ratelimit-limit-tokens"] = str(decision.limit_tokens)
        out["x-ratelimit-remaining-tokens"] = str(decision.remaining_tokens)
        out["x-ratelimit-reset-tokens"] = _duration(decision.reset_tokens_s)
    return out


_WHAT = {"requests": "requests per min (RPM)", "tokens": "tokens per min (TPM)",
         "parallel": "concurrent requests"}


def rate_limit_error(decision: Decision, model: str) -> APIError:
    """The 429 for a refused request, worded and typed as OpenAI's."""
    headers = {}
    reset = _duration(decision.retry_after_s)
    if decision.limit == "requests":
        headers.update({"x-ratelimit-limit-requests": f"{decision.limit_value:g}",
                        "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": reset})
    elif decision.limit == "tokens":
        headers.update({"x-ratelimit-limit-tokens": f"{decision.limit_value:g}",
                        "x-ratelimit-remaining-tokens": f"{max(0, decision.limit_value - decision.used):g}",
                        "x-ratelimit-reset-tokens": reset})
    if decision.retry_after_s is not None:
        headers["retry-after"] = str(ceil_s(decision.retry_after_s))
        headers["retry-after-ms"] = str(max(1, round(decision.retry_after_s * 1000)))
    if decision.limit in ("budget_tokens", "budget_usd"):
        unit = "tokens" if decision.limit == "budget_tokens" else "USD"
        return APIError(429, f"You exceeded your budget: {decision.used:g} of {decision.limit_value:g} {unit} "
                        f"used or reserved in this period ({decision.scope_id.split(':', 1)[1]}).",
                        type="insufficient_quota", code="insufficient_quota", headers=headers)
    if decision.retry_after_s is None:
        message = (f"Request too large for {model} on {_WHAT[decision.limit]}: Limit {decision.limit_value:g}; "
                   "its worst case (prompt + max_tokens) alone is over it. Lower max_tokens.")
    else:
        message = (f"Rate limit reached for {model} on {_WHAT[decision.limit]} ({decision.scope_id.split(':')[0]}): "
                   f"Limit {decision.limit_value:g}, Used {decision.used:g}. "
                   f"Please try again in {reset}.")
    return APIError(429, message, type="tokens" if decision.limit == "tokens" else "requests",
                    code="rate_limit_exceeded", headers=headers)
