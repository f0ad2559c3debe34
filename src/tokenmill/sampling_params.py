"""SamplingParams: how to pick tokens for one request, with the names vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.structured.params import StructuredOutputsParams

# A temperature below this is treated as greedy (argmax), as in vLLM.
_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """Per-request sampling settings (field names and defaults follow vLLM).

    Invalid values raise ValueError naming the parameter, so the server can turn them
    into a 400 with `param` set.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives besides the sampled token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Output constrained by a grammar (tokenmill.structured; a dict is read as its fields).
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine from the tokenizer/generation config, not by users.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        if self.is_greedy:
            # Greedy ignores these; normalising keeps the sampler's fast path simple.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def _validate(self) -> None:
        def bad(param: str, msg: str) -> ValueError:
            err = ValueError(f"{param} {msg}")
            err.param = param  # type: ignore[attr-defined]
            return err

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", f"must be at least 1, got {self.n}.")
        # Written so that NaN fails too (every comparison with NaN is False).
        if not 0.0 <= self.temperature < float("inf"):
            raise bad("temperature", f"must be non-negative and finite, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", f"must be 0 or -1 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}.")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", f"must be greater than 0, got {self.repetition_penalty}.")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise bad("max_tokens", f"must be at least 0, got {self.max_tokens}.")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", f"must be at least 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be at most max_tokens={self.max_tokens}, got {self.min_tokens}.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", f"must be an integer, got {self.seed!r}.")
        if self.logprobs is not None and self.logprobs < 0:
            raise bad("logprobs", f"must be non-negative, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise bad("prompt_logprobs", f"must be non-negative, got {self.prompt_logprobs}.")
        if any(not isinstance(s, str) or s == "" for s in self.stop):  # type: ignore[union-attr]
            raise bad("stop", "must contain only non-empty strings.")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):  # type: ignore[union-attr]
            raise bad("stop_token_ids", "must contain only non-negative integers.")

    def clone_for_child(self, index: int) -> SamplingParams:
        """Params for sample `index` of an n>1 request: n=1 and, if seeded, seed+index (as vLLM)."""
        import copy

        child = copy.copy(self)
        child.n = 1
        child.stop = list(self.stop)  # type: ignore[arg-type]
        child.stop_token_ids = list(self.stop_token_ids)  # type: ignore[arg-type]
        child.all_stop_token_ids = set(self.all_stop_token_ids)
        if self.seed is not None:
            child.seed = self.seed + index
        if index > 0:
            # The prompt is scored once, by sample 0; the others may then reuse its
            # blocks through the prefix cache (prompt logprobs disable cache hits).
            child.prompt_logprobs = None
        return child
