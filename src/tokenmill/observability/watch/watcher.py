"""The watcher: snapshots in, incidents out.

Every snapshot becomes the window's signals (signals.py); every signal feeds its change
detector (detector.py). The first symptom that changes starts a short confirmation period
(`confirm_s`), in which the other signals that move with it are gathered; then the incident
is reported with its diagnosis (diagnosis.py) and the evidence in the order the signals
moved. An incident ends once no signal has been in a change for `resolve_s`. A scrape
endpoint or gateway backend that stops answering is reported at once, with no learning.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from tokenmill.observability.metrics_source import Snapshot
from tokenmill.observability.slo import TTFT_SLO
from tokenmill.observability.watch.detector import Change, ChangeDetector, DetectorConfig
from tokenmill.observability.watch.diagnosis import (
    DECISIVE_CAUSES,
    PRECEDENCE,
    RULES,
    SYMPTOMS,
    diagnose,
)
from tokenmill.observability.watch.signals import DESCRIPTIONS, SignalDeriver, Signals

# SLO burn: the window's miss ratio against the error budget, as the fast-burn page of the
# multi-window rules (14.4x: 2% of a 30-day budget in an hour), on the watcher's own windows.
FAST_BURN = 14.4
BURN_SAMPLES = 5


@dataclass(frozen=True)
class Evidence:
    signal: str
    description: str
    normal: float
    value: float
    moved_at_s: float

    def line(self) -> str:
        at = time.strftime("%H:%M:%S", time.localtime(self.moved_at_s))
        return f"{self.description}: {self.normal:.4g} -> {self.value:.4g} (moved at {at})"


@dataclass
class Incident:
    id: str
    kind: str
    cause: str
    started_at_s: float  # the earliest change point among its signals
    reported_at_s: float
    action: str
    evidence: list[Evidence] = field(default_factory=list)
    slo_burn_rate: float | None = None  # the TTFT budget's burn rate when reported, if burning
    updated_at_s: float | None = None  # when decisive evidence last changed its cause
    resolved_at_s: float | None = None

    @property
    def summary(self) -> str:
        first = ", then ".join(e.description for e in self.evidence[:3]) or "signals"
        return f"{self.kind.replace('_', ' ')}: likely {self.cause.replace('_', ' ')} ({first} moved first)"

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "cause": self.cause, "started_at_s": round(self.started_at_s, 3),
                "reported_at_s": round(self.reported_at_s, 3), "summary": self.summary, "action": self.action,
                "slo_burn_rate": self.slo_burn_rate,
                "evidence": [{"signal": e.signal, "description": e.description, "normal": e.normal,
                              "value": e.value, "moved_at_s": round(e.moved_at_s, 3)} for e in self.evidence],
                "updated_at_s": None if self.updated_at_s is None else round(self.updated_at_s, 3),
                "resolved_at_s": None if self.resolved_at_s is None else round(self.resolved_at_s, 3)}


@dataclass(frozen=True)
class WatchConfig:
    window_s: float = 10.0  # signals are rates and means over this window
    confirm_s: float = 3.0  # gather co-moving signals this long before reporting
    resolve_s: float = 30.0  # an incident ends after this long with no signal in a change
    detector: DetectorConfig = DetectorConfig()


@dataclass(frozen=True)
class Event:
    incident: Incident
    what: str  # "opened" | "updated" (a decisive cause replaced the first one) | "resolved"

    @property
    def opened(self) -> bool:
        return self.what == "opened"


class Watcher:
    def __init__(self, config: WatchConfig | None = None) -> None:
        self.config = config or WatchConfig()
        self._deriver = SignalDeriver(self.config.window_s)
        self._detectors = {r.name: ChangeDetector(r, self.config.detector) for r in RULES}
        self._changes: dict[str, Change] = {}  # signal -> its ongoing change
        self._known_down: set[str] = set()  # endpoints/backends already reported down
        self._pending_since_s: float | None = None  # first symptom, awaiting confirmation
        self._open: Incident | None = None
        self._calm_since_s: float | None = None
        self._ids = itertools.count(1)
        self._burn_streak = 0
        self.last_signals: Signals | None = None

    @property
    def learned(self) -> bool:
        """Some signal has seen its warm-up (signals without traffic never teach anything)."""
        return max(d.num_samples for d in self._detectors.values()) >= self.config.detector.warmup_samples

    def observe(self, snapshot: Snapshot) -> list[Event]:
        signals = self._deriver.add(snapshot)
        if signals is None:
            return []
        self.last_signals = signals
        t = signals.time_s
        for name, detector in self._detectors.items():
            change = detector.update(t, signals.values.get(name))
            if change is not None:
                if change.started:
                    self._changes[name] = change
                else:
                    self._changes.pop(name, None)
        self._follow_slo_burn(t)
        down = set(signals.down_instances) | {f"backend {b}" for b in signals.unhealthy_backends}
        new_down = down - self._known_down
        self._known_down = down
        events: list[Event] = []
        if self._open is None:
            symptoms = [c for n, c in self._changes.items() if n in SYMPTOMS]
            if new_down:
                events.append(self._report(t, new_down))
            elif symptoms:
                if self._pending_since_s is None:
                    self._pending_since_s = t
                if t - self._pending_since_s >= self.config.confirm_s:
                    events.append(self._report(t, set()))
            else:
                self._pending_since_s = None
        else:
            self._extend(self._open)
            revised = self._revise(self._open, new_down)
            if revised is not None:
                events.append(revised)
            if self._changes or down:
                self._calm_since_s = None
            elif self._calm_since_s is None:
                self._calm_since_s = t
            elif t - self._calm_since_s >= self.config.resolve_s:
                self._open.resolved_at_s = t
                events.append(Event(self._open, "resolved"))
                self._open, self._pending_since_s, self._calm_since_s = None, None, None
        return events

    def _report(self, t: float, new_down: set[str]) -> Event:
        ordered = sorted(self._changes.values(), key=lambda c: (c.moved_at_s, PRECEDENCE.get(c.signal, 99)))
        headline = next((c.signal for c in ordered if c.signal in SYMPTOMS), None)
        d = diagnose({c.signal: c.moved_at_s for c in ordered}, new_down, headline)
        incident = Incident(id=f"tm-{next(self._ids)}", kind=d.kind, cause=d.cause,
                            # a backend going down dates its own incident, whatever moved before
                            started_at_s=t if new_down or not ordered else ordered[0].moved_at_s, reported_at_s=t,
                            action=d.action, slo_burn_rate=self._burn_rate())
        for name in sorted(new_down):
            incident.evidence.append(Evidence("up", f"{name} stopped answering", 1.0, 0.0, t))
        self._extend(incident)
        self._open, self._pending_since_s, self._calm_since_s = incident, None, None
        return Event(incident, "opened")

    def _revise(self, incident: Incident, new_down: set[str]) -> Event | None:
        """Decisive evidence that arrives after the report (a backend going down, preemptions,
        longer prompts, clients not reading) replaces a first guess such as a traffic surge."""
        if incident.cause in DECISIVE_CAUSES:
            return None
        d = diagnose({c.signal: c.moved_at_s for c in self._changes.values()}, new_down, None)
        if d.cause not in DECISIVE_CAUSES:
            return None
        incident.cause, incident.action, incident.updated_at_s = d.cause, d.action, self.last_signals.time_s
        if d.kind == "backend_down":
            incident.kind = d.kind
        return Event(incident, "updated")

    def _extend(self, incident: Incident) -> None:
        """Add signals that moved since the incident began, keeping the order they moved in."""
        seen = {e.signal for e in incident.evidence}
        for c in sorted(self._changes.values(), key=lambda c: (c.moved_at_s, PRECEDENCE.get(c.signal, 99))):
            if c.signal not in seen:
                incident.evidence.append(Evidence(c.signal, DESCRIPTIONS[c.signal], c.normal, c.value, c.moved_at_s))

    def _follow_slo_burn(self, t: float) -> None:
        """A burn of the TTFT budget at the fast-burn rate for `BURN_SAMPLES` windows in a row
        is a symptom of its own: latency can be bad from the start, with nothing to learn."""
        burning = self.learned and self._burn_rate() is not None  # a start-up's first requests are slow
        self._burn_streak = self._burn_streak + 1 if burning else 0
        if self._burn_streak >= BURN_SAMPLES and "ttft_slo_burn" not in self._changes:
            self._changes["ttft_slo_burn"] = Change("ttft_slo_burn", True, t, FAST_BURN, self._burn_rate())
        elif not burning:
            self._changes.pop("ttft_slo_burn", None)

    def _burn_rate(self) -> float | None:
        miss = self.last_signals.values.get("ttft_slo_miss_ratio") if self.last_signals else None
        if miss is None:
            return None
        burn = miss / TTFT_SLO.error_budget
        return round(burn, 2) if burn >= FAST_BURN else None
