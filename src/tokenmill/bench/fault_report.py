"""Scoring a fault run against `tokenmill watch`'s incidents, and the Markdown report.

Pure: incidents (JSON objects of the watcher's incident log), the fault's times and the
steady load's samples in; numbers and Markdown out.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the CLI imports this module for the fault names
    from tokenmill.bench.fault_signals import Movement
    from tokenmill.bench.schema import RequestSample

FAULTS = ("cpu_hog", "long_prompts", "slow_readers", "small_kv", "backend_killed")
CLEAN = "clean"
# The cause `tokenmill watch` should name for each fault.
EXPECTED_CAUSES = {
    "cpu_hog": "cpu_contention",
    "long_prompts": "long_prompt_flood",
    "slow_readers": "slow_clients",
    "small_kv": "kv_cache_pressure",
    "backend_killed": "backend_down",
}


def read_incidents(path: str | Path) -> list[dict[str, Any]]:
    """The incidents opened in the watcher's log (JSON lines; "resolved" events, which repeat an
    incident when it ends, and a torn last line of a killed watcher are skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with_content = line.strip()
        if not with_content:
            continue
        try:
            obj = json.loads(with_content)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("event", "opened") == "opened":
            out.append(obj)
    return out


@dataclass(frozen=True)
class PhaseStats:
    """What the steady load's clients saw in one phase (requests by send time)."""

    phase: str  # warm-up | fault | after
    num_requests: int
    num_errors: int
    mean_ttft_ms: float | None
    mean_tpot_ms: float | None  # mean over requests of (e2e - ttft) / (output tokens - 1)
    first_error: str = ""  # what the first failed request said


def phase_stats(samples: Sequence[RequestSample], load_start_s: float, injected_at_s: float | None,
                removed_at_s: float | None, end_at_s: float) -> list[PhaseStats]:
    """Split the steady load's samples by when they were sent (samples' start_s counts from
    `load_start_s`, unix time); a clean run has one phase."""
    bounds = phases_of(load_start_s, injected_at_s, removed_at_s, end_at_s)
    out = []
    for name, lo, hi in bounds:
        in_phase = [s for s in samples if lo <= load_start_s + s.start_s < hi and s.status != "incomplete"]
        ok = [s for s in in_phase if s.status == "ok"]
        ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
        tpots = [(s.e2e_s - s.ttft_s) / (s.output_tokens - 1) for s in ok
                if s.output_tokens > 1 and s.e2e_s is not None and s.ttft_s is not None]
        errors = [s.error for s in in_phase if s.status == "error"]
        out.append(PhaseStats(name, len(in_phase), len(in_phase) - len(ok),
                              statistics.fmean(ttfts) * 1000 if ttfts else None,
                              statistics.fmean(tpots) * 1000 if tpots else None, errors[0][:160] if errors else ""))
    return out


def foreign_cpu_cores(host_cpu: Sequence[tuple[float, float, float]], start_s: float,
                      end_s: float) -> float | None:
    """Cores that processes other than the harness's own used between two unix times, from
    (time, host busy CPU s, own tree CPU s) samples; None with fewer than two samples."""
    inside = [x for x in host_cpu if start_s <= x[0] <= end_s]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    (t0, host0, own0), (t1, host1, own1) = inside[0], inside[-1]
    return max(0.0, ((host1 - host0) - (own1 - own0)) / (t1 - t0))


def foreign_cpu_peak_cores(host_cpu: Sequence[tuple[float, float, float]], window_s: float = 10.0) -> float | None:
    """The most cores other processes used in any window_s stretch: a short burst (a test
    suite starting for 20 s) hides in a whole phase's average."""
    peak = None
    for i, (t0, _, _) in enumerate(host_cpu):
        ends = [x for x in host_cpu[i + 1:] if x[0] - t0 <= window_s]
        if ends and ends[-1][0] - t0 >= window_s / 2:
            used = foreign_cpu_cores([host_cpu[i], ends[-1]], t0, ends[-1][0])
            if used is not None and (peak is None or used > peak):
                peak = used
    return peak


def phases_of(started_at_s: float, injected_at_s: float | None, removed_at_s: float | None,
              ended_at_s: float) -> list[tuple[str, float, float]]:
    """(name, start, end) of a run's phases: warm-up, fault, after; or steady (a clean run)."""
    if injected_at_s is None or removed_at_s is None:
        return [("steady", started_at_s, ended_at_s)]
    return [("warm-up", started_at_s, injected_at_s), ("fault", injected_at_s, removed_at_s),
            ("after", removed_at_s, ended_at_s)]


# Above this many cores used by other processes (over a phase; over any 10 s), a run's signals
# may show them, not the fault.
FOREIGN_CPU_WARN_CORES = 0.15
FOREIGN_CPU_PEAK_WARN_CORES = 0.4


@dataclass
class FaultOutcome:
    """One run: a fault (or the clean baseline) and what the watcher said about it."""

    fault: str  # one of FAULTS, or CLEAN
    description: str  # how the fault was made
    started_at_s: float  # unix time the steady load started
    ended_at_s: float
    injected_at_s: float | None = None  # None: clean run
    removed_at_s: float | None = None
    watch_ran: bool = False
    incidents: list[dict[str, Any]] = field(default_factory=list)
    movements: list[Movement] = field(default_factory=list)
    phases: list[PhaseStats] = field(default_factory=list)
    recording: str | None = None
    notes: list[str] = field(default_factory=list)
    foreign_cpu: dict[str, float | None] = field(default_factory=dict)  # phase -> cores other processes used
    foreign_cpu_peak: float | None = None  # the most in any 10 s

    @property
    def is_disturbed(self) -> bool:
        """Other work on the machine took enough CPU to move the signals by itself."""
        return (any(v is not None and v > FOREIGN_CPU_WARN_CORES for v in self.foreign_cpu.values())
                or (self.foreign_cpu_peak or 0.0) > FOREIGN_CPU_PEAK_WARN_CORES)

    @property
    def expected_cause(self) -> str | None:
        return EXPECTED_CAUSES.get(self.fault)

    @property
    def false_alarms(self) -> list[dict[str, Any]]:
        """Incidents reported before the injection (in a clean run: all of them)."""
        if self.injected_at_s is None:
            return list(self.incidents)
        return [i for i in self.incidents if _reported(i) < self.injected_at_s]

    @property
    def first_report(self) -> dict[str, Any] | None:
        if self.injected_at_s is None:
            return None
        after = [i for i in self.incidents if _reported(i) >= self.injected_at_s]
        return min(after, key=_reported, default=None)

    @property
    def detection_s(self) -> float | None:
        first = self.first_report
        return None if first is None or self.injected_at_s is None else _reported(first) - self.injected_at_s

    @property
    def is_correct(self) -> bool:
        first = self.first_report
        return first is not None and first.get("cause") == self.expected_cause

    def sidecar(self) -> dict[str, Any]:
        """This run's entry of faults.json, the watcher tests' ground truth."""
        return {"injected_at_s": _round(self.injected_at_s), "removed_at_s": _round(self.removed_at_s),
                "expected_cause": self.expected_cause, "started_at_s": _round(self.started_at_s),
                "ended_at_s": _round(self.ended_at_s), "description": self.description}


def _reported(incident: dict[str, Any]) -> float:
    value = incident.get("reported_at_s", incident.get("started_at_s"))
    return float(value) if isinstance(value, (int, float)) else float("inf")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(outcomes: Sequence[FaultOutcome], title: str = "tokenmill watch against injected faults") -> str:
    """The summary table, then per run the signals that moved and what the clients saw."""
    lines = [f"# {title}", "",
             "| fault | expected cause | first incident after injection (s) | cause named | correct "
             "| false alarms | incidents | run (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        first = o.first_report
        named = "-" if first is None else str(first.get("cause", "?"))
        if not o.watch_ran:
            named, correct = "(watch not run)", "-"
        elif o.injected_at_s is None:
            correct = "yes" if not o.incidents else "no"
        else:
            correct = "yes" if o.is_correct else "no"
        lines.append(f"| {o.fault} | {o.expected_cause or '(none)'} | {_num(o.detection_s)} | {named} | {correct} "
                     f"| {len(o.false_alarms)} | {len(o.incidents)} | {o.ended_at_s - o.started_at_s:.0f} |")
    for o in outcomes:
        lines += ["", f"## {o.fault}", "", o.description, ""]
        if o.injected_at_s is not None and o.removed_at_s is not None:
            lines.append(f"Injected {o.injected_at_s - o.started_at_s:.1f} s after the load started, removed "
                         f"{o.removed_at_s - o.injected_at_s:.1f} s later.")
        lines += [f"- {n}" for n in o.notes]
        if o.foreign_cpu:
            used = ", ".join(f"{k} {_num(v, '{:.2f}')}" for k, v in o.foreign_cpu.items())
            flag = " **(disturbed: rerun on an idle machine)**" if o.is_disturbed else ""
            lines.append(f"- Other processes on the machine used (cores): {used}; at most "
                         f"{_num(o.foreign_cpu_peak, '{:.2f}')} in 10 s{flag}")
        moved = [m for m in o.movements if m.is_moved]
        if moved:
            lines += ["", "| signal | before (mean ± std) | during fault (mean) | peak | change | onset (s) |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {m.signal} | {m.before_mean:.4g} ± {m.before_std:.2g} | {m.during_mean:.4g} "
                      f"| {m.during_peak:.4g} | {m.change} | {_num(m.onset_s)} |" for m in moved]
        if o.phases:
            lines += ["", "| clients (steady load) | requests | errors | mean TTFT (ms) | mean TPOT (ms) |",
                      "| --- | --- | --- | --- | --- |"]
            lines += [f"| {p.phase} | {p.num_requests} | {p.num_errors} | {_num(p.mean_ttft_ms)} "
                      f"| {_num(p.mean_tpot_ms)} |" for p in o.phases]
            lines += [f"- first error ({p.phase}): `{p.first_error}`" for p in o.phases if p.first_error]
        if o.incidents:
            lines += ["", "Incidents:", ""]
            for i in o.incidents:
                when = _reported(i) - (o.injected_at_s if o.injected_at_s is not None else o.started_at_s)
                lines.append(f"- {when:+.1f} s: {i.get('kind', '?')} / {i.get('cause', '?')}: {i.get('summary', '')}")
    return "\n".join(lines) + "\n"
