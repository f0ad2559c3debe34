"""`bench serve` as a function: one measured run against an endpoint, ready to store.

Wires the layers: server discovery -> workload -> load generator -> metrics -> RunRecord.
sweep.py and the CLI call `run_serve`; nothing here parses flags or prints.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from tokenmill.bench.client import (
    Clock,
    EndpointSpec,
    fetch_first_model,
    fetch_server_info,
    http_client,
    negotiate_fields,
    split_base_url,
)
from tokenmill.bench.hardware import hardware_fingerprint, software_fingerprint
from tokenmill.bench.metrics import DEFAULT_PERCENTILES, request_itls_s, request_tpot_s, summarize
from tokenmill.bench.runner import LoadResult, run_load
from tokenmill.bench.schema import Endpoint, LoadSpec, RunRecord, RunSummary
from tokenmill.bench.store import Store
from tokenmill.bench.tokenizer import TokenizerLike, load_tokenizer
from tokenmill.bench.workloads import WorkloadSpec, iter_requests


@dataclass(frozen=True)
class ServeSpec:
    """Everything one `bench serve` run needs."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model the server lists
    endpoint: Endpoint = "completions"
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    load: LoadSpec = field(default_factory=LoadSpec)
    tokenizer_path: str | None = None  # None: the default model's (bench/tokenizer.py)
    ignore_eos: bool = True
    openai_strict: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    temperature: float | None = None
    request_timeout_s: float = 600.0
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    slos_ms: dict[str, float] = field(default_factory=dict)
    label: str = ""
    series: str = ""
    hardware_sku: str | None = None  # None: derived from this machine
    instance_type: str = ""
    show_progress: bool = True


@dataclass
class ServeOutcome:
    record: RunRecord  # saved when a store was given (record.id is then set)
    summary: RunSummary
    load_result: LoadResult


async def run_serve_async(
    spec: ServeSpec,
    store: Store | None = None,
    client: httpx.AsyncClient | None = None,
    tokenizer: TokenizerLike | None = None,
    stop: asyncio.Event | None = None,
    clock: Clock = time.perf_counter,
) -> ServeOutcome:
    """Measure one run.

    Args:
        spec: the run.
        store: save the run there when given.
        client: an HTTP client to use (tests inject transports); default: a new one.
        tokenizer: overrides spec.tokenizer_path (tests pass small tokenizers).
        stop: set to stop early (Ctrl-C does it too).
        clock: seconds; tests pass a virtual clock.

    Returns:
        ServeOutcome with the record, its summary and the raw load result.
    """
    root, api_base = split_base_url(spec.base_url)
    tok = tokenizer if tokenizer is not None else load_tokenizer(spec.tokenizer_path)
    own_client = client is None
    client = client or http_client(spec.load.max_concurrency, spec.request_timeout_s)
    try:
        server = await fetch_server_info(client, root)
        model = spec.model or await fetch_first_model(client, api_base)
        endpoint = EndpointSpec(api_base, model, spec.endpoint, spec.ignore_eos, spec.openai_strict,
                                extra_body=dict(spec.extra_body), temperature=spec.temperature,
                                request_timeout_s=spec.request_timeout_s)
        workload = spec.workload
        if tok is None and workload.dataset_name != "file":
            raise ValueError("no tokenizer: pass --tokenizer DIR (the demo model has none yet)")
        warmups = iter_requests(workload, tok, stream=1)
        endpoint, notes = await negotiate_fields(client, endpoint, next(warmups))
        result = await run_load(
            endpoint,
            iter_requests(workload, tok, stream=0),
            warmups,
            spec.load,
            count_tokens=(lambda text: len(tok.encode(text))) if tok is not None else None,
            show_progress=spec.show_progress,
            client=client,
            stop=stop,
            clock=clock,
        )
    finally:
        if own_client:
            await client.aclose()
    summary = summarize(result.samples, result.duration_s, spec.percentiles, spec.slos_ms)
    record = RunRecord(
        kind="serve",
        model=model,
        workload={
            "base_url": spec.base_url,
            "endpoint": spec.endpoint,
            "workload": workload.to_dict(),
            "load": spec.load.to_dict(),
            "ignore_eos": endpoint.ignore_eos,
            "openai_strict": spec.openai_strict,
            "continuous_usage": endpoint.continuous_usage,
            "notes": notes,
            "extra_body": spec.extra_body,
            "temperature": spec.temperature,
            "tokenizer": getattr(tok, "path", None),
            "percentiles": list(spec.percentiles),
        },
        summary={**summary.to_dict(), "num_warmup_errors": result.num_warmup_errors,
                 **({"spec_decode": result.spec_decode} if result.spec_decode else {})},
        hardware=hardware_fingerprint(spec.hardware_sku),
        software=software_fingerprint(),
        server=server,
        label=spec.label,
        series=spec.series,
        instance_type=spec.instance_type,
        interrupted=result.interrupted,
        samples=result.samples,
    )
    if store is not None:
        store.save(record)
    return ServeOutcome(record, summary, result)


def run_serve(spec: ServeSpec, store: Store | None = None) -> ServeOutcome:
    """Synchronous wrapper of run_serve_async (one event loop per run)."""
    return asyncio.run(run_serve_async(spec, store))


def with_load(spec: ServeSpec, **changes: Any) -> ServeSpec:
    """A copy of spec with some LoadSpec fields changed (sweeps vary the rate)."""
    return replace(spec, load=replace(spec.load, **changes))


def vllm_style_result(record: RunRecord) -> dict[str, Any]:
    """The run in the key names of `vllm bench serve --save-result`, so scripts carry over."""
    s = record.summary
    out: dict[str, Any] = {
        "date": record.created_at, "run_id": record.id, "model_id": record.model,
        "request_rate": record.workload["load"]["request_rate"],
        "burstiness": record.workload["load"]["burstiness"],
        "max_concurrency": record.workload["load"]["max_concurrency"],
        "duration": s["duration_s"], "completed": s["num_completed"], "failed": s["num_failed"],
        "incomplete": s["num_incomplete"], "total_input_tokens": s["total_input_tokens"],
        "total_output_tokens": s["total_output_tokens"], "request_throughput": s["request_throughput"],
        "request_goodput": s["goodput"], "output_throughput": s["output_throughput"],
        "total_token_throughput": s["total_token_throughput"],
    }
    for metric in ("ttft", "tpot", "itl", "e2el"):
        stats = s[metric]
        out[f"mean_{metric}_ms"] = stats["mean_ms"]
        out[f"median_{metric}_ms"] = stats["median_ms"]
        out[f"std_{metric}_ms"] = stats["std_ms"]
        for key, value in stats["percentiles_ms"].items():
            out[f"{key}_{metric}_ms"] = value
    ok = [x for x in record.samples if x.status == "ok"]
    out["input_lens"] = [x.prompt_tokens for x in ok]
    out["output_lens"] = [x.output_tokens for x in ok]
    out["ttfts"] = [x.ttft_s for x in ok]
    out["tpots"] = [request_tpot_s(x) for x in ok]
    out["itls"] = [request_itls_s(x) for x in ok]
    out["errors"] = [x.error for x in record.samples if x.status != "ok"]
    return out
