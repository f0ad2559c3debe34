"""Where incidents go: the terminal, a JSON-lines log, and a webhook in Alertmanager's
webhook format (so any receiver written for Alertmanager, a chat bridge or a pager, takes
tokenmill's incidents as they are)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from typing import IO

import aiohttp

from tokenmill.observability.watch.watcher import Event, Incident

logger = logging.getLogger("tokenmill.watch")

SEVERITY = {"backend_down": "page", "slo_burn": "page", "error_burst": "page"}  # else "ticket"


def terminal_lines(event: Event) -> list[str]:
    i = event.incident
    at_s = {"opened": i.reported_at_s, "updated": i.updated_at_s, "resolved": i.resolved_at_s}[event.what]
    stamp = dt.datetime.fromtimestamp(at_s).strftime("%H:%M:%S")
    if event.what == "resolved":
        return [f"{stamp} RESOLVED {i.id} {i.kind} (lasted {i.resolved_at_s - i.started_at_s:.0f} s)"]
    if event.what == "updated":
        return [f"{stamp} UPDATED {i.id} {i.summary}", f"    action: {i.action}"]
    lines = [f"{stamp} INCIDENT {i.id} {i.summary}",
             f"    started {i.reported_at_s - i.started_at_s:.0f} s before this report"
             + (f"; TTFT error budget burning at {i.slo_burn_rate:g}x" if i.slo_burn_rate else "")]
    lines += [f"    - {e.line()}" for e in i.evidence]
    lines.append(f"    action: {i.action}")
    return lines


def write_json(fh: IO[str], event: Event) -> None:
    fh.write(json.dumps({"event": event.what, **event.incident.to_json()}) + "\n")
    fh.flush()


def _rfc3339(time_s: float) -> str:
    return dt.datetime.fromtimestamp(time_s, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def alertmanager_payload(event: Event, receiver: str = "tokenmill-watch") -> dict:
    """One incident as Alertmanager's webhook message (version 4) with one alert."""
    i: Incident = event.incident
    status = "resolved" if event.what == "resolved" else "firing"
    labels = {"alertname": "Tokenmill" + "".join(w.title() for w in i.kind.split("_")), "kind": i.kind,
              "cause": i.cause, "severity": SEVERITY.get(i.kind, "ticket"), "incident": i.id}
    annotations = {"summary": i.summary, "description": "; ".join(e.line() for e in i.evidence), "action": i.action}
    alert = {"status": status, "labels": labels, "annotations": annotations, "startsAt": _rfc3339(i.started_at_s),
             "endsAt": _rfc3339(i.resolved_at_s) if i.resolved_at_s else "0001-01-01T00:00:00Z",
             "generatorURL": "", "fingerprint": hashlib.sha256(i.id.encode()).hexdigest()[:16]}
    return {"version": "4", "groupKey": f"{{}}:{{incident=\"{i.id}\"}}", "truncatedAlerts": 0, "status": status,
            "receiver": receiver, "groupLabels": {"incident": i.id}, "commonLabels": labels,
            "commonAnnotations": annotations, "externalURL": "", "alerts": [alert]}


async def post_webhook(session: aiohttp.ClientSession, url: str, event: Event) -> None:
    """Best effort: a receiver that is down must not stop the watcher (the log keeps it)."""
    try:
        async with session.post(url, json=alertmanager_payload(event),
                                timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status >= 300:
                logger.warning("webhook %s answered %d for incident %s", url, r.status, event.incident.id)
    except (aiohttp.ClientError, TimeoutError) as e:
        logger.warning("webhook %s unreachable for incident %s: %r", url, event.incident.id, e)
