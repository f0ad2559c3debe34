"""Online change-point detection for one signal: normal behaviour learned as it runs, and a
one-sided CUSUM on the deviations from it, gated by a practical size.

Normal is an exponentially weighted mean and mean absolute deviation (MAD), learned while
the signal is not in a change. Each sample's deviation in the bad direction is standardised
by the MAD (floored: a signal that never moves must not alarm on its first jitter), clipped
(one wild window cannot raise an alarm alone) and summed CUSUM-style; an alarm needs the sum
over `threshold` *and* a deviation worth acting on (`SignalRule.min_rel_change` of normal
and `min_abs_change` in the signal's units). The change point reported is where the sum last
left zero (the classical CUSUM estimate), so incidents are dated to when the signal moved,
not when it became certain.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_Z = 4.0  # clip per-sample evidence: CUSUM then needs several windows in a row


@dataclass(frozen=True)
class SignalRule:
    name: str
    direction: int  # +1: a rise is bad; -1: a fall is bad
    min_rel_change: float  # smallest change worth reporting, as a share of normal
    min_abs_change: float  # ... and in the signal's own units (floor for signals near zero)


@dataclass(frozen=True)
class DetectorConfig:
    warmup_samples: int = 30  # no alarm before this many samples have taught normal
    learn_rate: float = 0.02  # EW weight of a new sample in normal (~50 samples' memory)
    slack: float = 1.5  # CUSUM k: deviations under this many MADs do not accumulate
    # CUSUM h: 5 reads at full strength. At 8, a clean recording's single stall of a few
    # hundred ms (it lifts a 10 s window's means for 10 reads) opened an incident.
    threshold: float = 12.0
    clear_samples: int = 10  # samples back within half the practical size that end a change
    accept_after_samples: int = 600  # a change this long is the new normal (re-learned)


@dataclass(frozen=True)
class Change:
    """A signal's change, as it starts or ends."""

    signal: str
    started: bool  # True: began; False: ended
    moved_at_s: float  # the change point (start) or the time it ended
    normal: float  # the learned normal before the change
    value: float  # the signal now


class ChangeDetector:
    def __init__(self, rule: SignalRule, config: DetectorConfig | None = None) -> None:
        self.rule = rule
        self.config = config or DetectorConfig()
        self.num_samples = 0
        self.normal = 0.0
        self.mad = 0.0
        self.cusum = 0.0
        self.active = False
        self.moved_at_s: float | None = None  # where the CUSUM last left zero
        self._num_calm = 0
        self._num_active = 0
        self.last_value: float | None = None

    def practical_size(self) -> float:
        return max(self.rule.min_abs_change, self.rule.min_rel_change * abs(self.normal))

    def update(self, time_s: float, value: float | None) -> Change | None:
        """Feed one sample (None: not measurable now, skipped). Returns a change that starts
        or ends with this sample."""
        if value is None:
            return None
        self.last_value = value
        cfg = self.config
        if self.num_samples < cfg.warmup_samples:
            self._learn(value, 1.0 / (self.num_samples + 1))
            self.num_samples += 1
            return None
        self.num_samples += 1
        size = self.practical_size()
        deviation = self.rule.direction * (value - self.normal)
        # A change worth reporting spans at least MAX_Z MADs, however quiet the signal was.
        scale = max(1.25 * self.mad, size / MAX_Z, 1e-12)
        z = min(deviation / scale, MAX_Z)
        if self.cusum == 0.0:
            self.moved_at_s = time_s
        self.cusum = max(0.0, self.cusum + z - cfg.slack)
        if self.cusum == 0.0:
            self.moved_at_s = None
        if not self.active:
            if self.cusum > cfg.threshold and deviation >= size:
                self.active, self._num_calm, self._num_active = True, 0, 0
                return Change(self.rule.name, True, self.moved_at_s or time_s, self.normal, value)
            if self.cusum < cfg.threshold / 2:  # learn only what looks normal
                self._learn(value, cfg.learn_rate)
            return None
        self._num_active += 1
        self._num_calm = self._num_calm + 1 if deviation < size / 2 else 0
        if self._num_calm >= cfg.clear_samples:
            return self._end(time_s, value)
        if self._num_active >= cfg.accept_after_samples:  # a lasting shift: learn it as normal
            self.normal, self.mad = value, abs(value) * 0.05
            return self._end(time_s, value)
        return None

    def _end(self, time_s: float, value: float) -> Change:
        normal = self.normal
        self.active, self.cusum, self.moved_at_s = False, 0.0, None
        return Change(self.rule.name, False, time_s, normal, value)

    def _learn(self, value: float, weight: float) -> None:
        self.mad += weight * (abs(value - self.normal) - self.mad) if self.num_samples else 0.0
        self.normal += weight * (value - self.normal)
