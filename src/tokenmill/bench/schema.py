"""Typed records passed between the bench layers: workload -> client -> metrics -> store.

Times are seconds (`*_s`) from `time.perf_counter()`-style clocks unless a name says `_ms`;
token counts are `num_*`/`*_tokens`. These dataclasses carry data only: the arithmetic
lives in metrics.py and the persistence in store.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Endpoint = Literal["completions", "chat"]
# ok: stream finished normally; error: HTTP/stream error; incomplete: cut short by Ctrl-C,
# the run's deadline or the client timeout before the stream finished.
RequestStatus = Literal["ok", "error", "incomplete"]
RunKind = Literal["serve", "throughput", "capacity", "quality"]  # quality: `tokenmill eval`


@dataclass(frozen=True)
class RequestSpec:
    """One prompt of a workload, ready to send."""

    index: int  # position in the workload; stable across runs with the same seed
    prompt: str | list[int] | list[dict[str, Any]]  # text, token ids, or chat messages
    prompt_len: int  # tokens by the client's tokenizer (the server's usage overrides it)
    output_len: int | None  # max_tokens to ask for; None: the server's default


@dataclass
class RequestSample:
    """What one request measured, on the client's clock.

    Token-bearing chunks only: a chunk with no generated text (a role-only chat delta, a
    usage-only trailer) is not a token arrival. `chunk_tokens[i]` tokens arrived at
    `chunk_times_s[i]` (seconds after the request was sent).
    """

    index: int
    start_s: float  # send time, seconds after the run started
    status: RequestStatus = "incomplete"
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    # "usage": the server's usage block; "tokenizer": re-tokenized text; "chunks": one
    # token per chunk (no usage and no tokenizer).
    token_count_source: str = "chunks"
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def e2e_s(self) -> float | None:
        # As vLLM: the request ends when its last token arrives (the [DONE] line is noise).
        return self.chunk_times_s[-1] if self.chunk_times_s else None


@dataclass(frozen=True)
class LoadSpec:
    """How requests are offered to the server."""

    request_rate: float = float("inf")  # requests/s; inf: all at once (closed loop)
    burstiness: float = 1.0  # gamma shape; 1.0 is Poisson
    max_concurrency: int | None = None  # in-flight cap; with rate inf this is a closed loop
    num_prompts: int | None = 100  # stop after this many requests (None: duration only)
    duration_s: float | None = None  # stop issuing after this many seconds
    num_warmups: int = 1  # sent first, closed loop, not measured
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf allowed), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.num_prompts is None and self.duration_s is None:
            raise ValueError("a run must be bounded: give num_prompts or duration_s")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.num_warmups < 0:
            raise ValueError(f"num_warmups must be >= 0, got {self.num_warmups}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # JSON has no infinity; "inf" round-trips through float().
        d["request_rate"] = "inf" if self.request_rate == float("inf") else self.request_rate
        return d


@dataclass(frozen=True)
class LatencyStats:
    """Distribution summary of one latency metric, in milliseconds."""

    count: int
    mean_ms: float
    median_ms: float
    std_ms: float  # population std (ddof=0), as vLLM
    min_ms: float
    max_ms: float
    percentiles_ms: dict[str, float]  # "p90" -> value; linear interpolation (numpy default)


@dataclass(frozen=True)
class RunSummary:
    """Run-level metrics; failed and incomplete requests are counted, never averaged in."""

    duration_s: float
    num_completed: int
    num_failed: int
    num_incomplete: int
    total_input_tokens: int  # completed requests only
    total_output_tokens: int  # completed requests only
    request_throughput: float  # completed requests/s
    output_throughput: float  # output tokens/s
    total_token_throughput: float  # (input + output) tokens/s
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    slos_ms: dict[str, float] = field(default_factory=dict)  # metric -> bound; empty: none
    goodput: float | None = None  # requests/s meeting every SLO
    slo_attainment: float | None = None  # fraction of ALL requests meeting every SLO

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunRecord:
    """One stored run: identity, context and results (samples may be empty)."""

    kind: RunKind
    model: str
    workload: dict[str, Any]  # workload + load spec + endpoint, as given
    summary: dict[str, Any]  # RunSummary.to_dict() for serve runs; kind-specific otherwise
    hardware: dict[str, Any]
    software: dict[str, Any]
    server: dict[str, Any] | None = None  # what /version said, if anything
    label: str = ""
    series: str = ""  # groups the points of one sweep or capacity search
    instance_type: str = ""  # price-table key given by the user, if any
    interrupted: bool = False
    samples: list[RequestSample] = field(default_factory=list)
    id: int | None = None  # assigned by the store
    created_at: str = ""  # ISO 8601 UTC, assigned by the store

    @property
    def hardware_sku(self) -> str:
        return str(self.hardware.get("sku", "unknown"))
