"""Speculative decoding counters: vLLM's `spec_decode_*` metrics, read from a server's
/metrics (tokenmill: or vllm: prefix) or from the offline engine's SpecDecodeStats. Both
are cumulative, so a run reports the difference between a reading before and one after its
measured requests. Derived as vLLM does: mean acceptance length = 1 + accepted / drafts (the
target's own token counts, so 1.0 means nothing was ever accepted); acceptance rate =
accepted / draft tokens; per-position acceptance rate = accepted at position i / drafts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

METRIC_PREFIXES = ("tokenmill", "vllm")
_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


@dataclass(frozen=True)
class SpecDecodeCounts:
    """Speculative decoding counters: cumulative readings, or the difference of two."""

    num_drafts: int = 0  # verifications: (request, step) pairs that had proposals
    num_draft_tokens: int = 0  # tokens proposed
    num_accepted_tokens: int = 0  # proposals kept
    accepted_per_pos: tuple[int, ...] = ()  # [num_speculative_tokens] proposals kept at each position

    @staticmethod
    def from_prometheus(text: str, model: str | None = None) -> SpecDecodeCounts | None:
        """Read the counters from a Prometheus exposition (a server's GET /metrics).

        Args:
            text: the exposition.
            model: keep the series whose model_name label is this one when there are any
                (a server may serve several models); otherwise all series are summed.

        Returns:
            The counters, or None when the server exposes none (speculation off, or a server
            without them: llama.cpp, SGLang) or the text does not parse.
        """
        values: dict[str, dict[tuple[str, str], float]] = {}  # metric -> (model, position) -> value
        try:
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    prefix, _, name = s.name.partition(":")
                    if prefix in METRIC_PREFIXES and name.startswith("spec_decode_") and name.endswith("_total"):
                        key = (s.labels.get("model_name", ""), s.labels.get("position", ""))
                        series = values.setdefault(name[len("spec_decode_"):-len("_total")], {})
                        # Summed over any other label: a Ray Serve endpoint has one series per replica.
                        series[key] = series.get(key, 0.0) + s.value
        except (ValueError, TypeError):
            return None
        if "num_drafts" not in values:
            return None

        def total(metric: str, position: str = "") -> int:
            series = values.get(metric, {})
            mine = [v for (m, p), v in series.items() if p == position and m == model]
            return int(sum(mine if mine else [v for (_, p), v in series.items() if p == position]))

        positions = sorted({int(p) for _, p in values.get("num_accepted_tokens_per_pos", {}) if p.isdigit()})
        per_pos = tuple(total("num_accepted_tokens_per_pos", str(p)) for p in range(max(positions, default=-1) + 1))
        return SpecDecodeCounts(*(total(c) for c in _COUNTERS), per_pos)

    @staticmethod
    def from_engine(stats: Any) -> SpecDecodeCounts | None:
        """From the engine's SchedulerStats (None when speculation is off)."""
        s = stats.spec_decode
        if s is None:
            return None
        return SpecDecodeCounts(s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens, tuple(s.accepted_per_pos))

    def since(self, before: SpecDecodeCounts) -> SpecDecodeCounts | None:
        """What was counted between `before` and this reading; None if a counter went down
        (the server restarted in between)."""
        width = max(len(self.accepted_per_pos), len(before.accepted_per_pos))
        pad = lambda xs: [*xs, *[0] * (width - len(xs))]  # noqa: E731
        diff = [getattr(self, c) - getattr(before, c) for c in _COUNTERS]
        per_pos = [a - b for a, b in zip(pad(self.accepted_per_pos), pad(before.accepted_per_pos))]
        if min([*diff, *per_pos], default=0) < 0:
            return None
        return SpecDecodeCounts(*diff, tuple(per_pos))

    def __add__(self, other: SpecDecodeCounts) -> SpecDecodeCounts:
        width = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        per_pos = [sum(xs[i] for xs in (self.accepted_per_pos, other.accepted_per_pos) if i < len(xs))
                   for i in range(width)]
        return SpecDecodeCounts(*(getattr(self, c) + getattr(other, c) for c in _COUNTERS), tuple(per_pos))

    @property
    def mean_acceptance_length(self) -> float | None:
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def per_position_acceptance_rate(self) -> list[float]:
        return [a / self.num_drafts for a in self.accepted_per_pos] if self.num_drafts else []

    def to_summary(self) -> dict[str, Any]:
        """The stored form (a serve run's summary["spec_decode"]): counters and derived rates."""
        return {**asdict(self), "accepted_per_pos": list(self.accepted_per_pos),
                "mean_acceptance_length": self.mean_acceptance_length, "acceptance_rate": self.acceptance_rate,
                "per_position_acceptance_rate": self.per_position_acceptance_rate}


def spec_decode_delta(before: SpecDecodeCounts | None, after: SpecDecodeCounts | None) -> dict[str, Any] | None:
    """summary["spec_decode"] of a run from readings around it; None: nothing to show."""
    if before is None or after is None:
        return None
    delta = after.since(before)
    return delta.to_summary() if delta is not None else None


# ---- bench spec -------------------------------------------------------------------------

