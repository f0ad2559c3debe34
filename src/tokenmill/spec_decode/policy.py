"""How many tokens to propose for a request this step, from its recent acceptance.

A proposed token is worth its chance of being kept. Under the usual model (each proposed
token is accepted with probability a, given the ones before it were), the j-th proposal
adds a**j expected tokens to the step, and costs a slot in the verification pass, plus
one forward pass of the draft model when there is one. So a request gets proposals while
a**j is above the cost of one, relative to a step of the target:

- ngram proposals cost only their verification: each extra row of a one-stream step of
  the default model costs ~0.1 of the step (its decode layers: 10.7 ms for 1 row, 14.7 ms
  for 5, on a 2-core AVX2 CPU; docs/speculative_decoding.md);
- a draft model's proposal costs a draft forward pass, whose time relative to the
  target's step the engine measures as it runs (`observe_step_times`).

Above `disable_by_batch_size` running requests no one speculates: a step of many decodes
is no longer bound by reading the weights, and extra tokens cost their full share.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config import SpeculativeConfig

# Cost of verifying one proposed token, as a fraction of a target step, at batch sizes
# below the crossover (measured for the default model, see the module docstring).
VERIFY_COST = 0.1
# Acceptance assumed before a request has any history (a fresh request is given a chance).
PRIOR_ACCEPTANCE = 0.7
# Weight of the newest step in the acceptance estimate.
ACCEPTANCE_DECAY = 0.3
# A request whose proposals stopped paying gets one proposal every this many steps, so a
# change in its text (e.g. it starts quoting its prompt) is noticed.
PROBE_EVERY_STEPS = 8


@dataclass
class AcceptanceEstimate:
    """One request's recent acceptance: exponential averages of proposals kept and
    rejected (at most one rejection per step: verification stops at the first)."""

    accepted: float = PRIOR_ACCEPTANCE
    rejected: float = 1.0 - PRIOR_ACCEPTANCE
    steps_without: int = 0  # consecutive steps this request was given no proposal

    @property
    def rate(self) -> float:
        """Estimated chance that a proposal is accepted given the ones before it were."""
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, num_proposed: int, num_accepted: int) -> None:
        d = ACCEPTANCE_DECAY
        self.accepted = (1 - d) * self.accepted + d * num_accepted
        self.rejected = (1 - d) * self.rejected + d * (1 if num_accepted < num_proposed else 0)


class SpecPolicy:
    """Decides each request's proposal length; owns the measured draft cost."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.draft_cost = 0.0 if config.method == "ngram" else 0.3  # until measured

    def observe_step_times(self, draft_s: float, target_s: float) -> None:
        """One step's draft forward passes per proposed token, relative to the target's step."""
        if target_s > 0:
            self.draft_cost = 0.8 * self.draft_cost + 0.2 * min(draft_s / target_s, 1.0)

    def num_proposals(self, estimate: AcceptanceEstimate, room: int, num_running: int) -> int:
        """Proposals for one request this step.

        Args:
            estimate: the request's acceptance so far.
            room: the most it may get (output left minus the token the step always
                yields, context left, num_speculative_tokens).
            num_running: requests running now.
        """
        cfg = self.config
        limit = cfg.disable_by_batch_size
        k = min(cfg.num_speculative_tokens, room)
        if k <= 0 or (limit is not None and num_running > limit):
            return 0
        if not cfg.adaptive:
            return k
        cost = VERIFY_COST + self.draft_cost
        rate, chance, num = estimate.rate, 1.0, 0
        while num < k and (chance := chance * rate) > cost:
            num += 1
        if num == 0:
            estimate.steps_without += 1
            if estimate.steps_without >= PROBE_EVERY_STEPS:
                estimate.steps_without, num = 0, 1
        else:
            estimate.steps_without = 0
        return num
