"""`tokenmill bench faults`: inject known faults into a live tokenmill and measure how fast
`tokenmill watch` reports them, and whether it names the right cause.

Per fault: start the servers (one `tokenmill serve`; two behind a `tokenmill gateway` for
backend_killed; a too-small KV cache for small_kv), put a steady open-loop load on them (the
bench lab's generator, Poisson arrivals, well under saturation), start the recorder and
`tokenmill watch` on their /metrics, let the watcher learn for the warm-up, inject the fault
at a recorded time, remove it after --fault-s, watch the recovery for --after-s, then score the
incident log. `clean` runs the steady load alone: anything reported is a false alarm.

The recordings (one snapshot of the kept series per second) and faults.json, the injection
and removal times, are the watcher tests' data (tests/observability/data/).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from tokenmill.bench.client import EndpointSpec, fetch_first_model
from tokenmill.bench.fault_injectors import (
    LOAD_REQUEST_TIMEOUT_S,
    BackendKill,
    CpuHog,
    ExtraLoad,
    Fault,
    FaultLoads,
    SlowReaders,
    offer_load,
)
from tokenmill.bench.fault_report import (
    CLEAN,
    FAULTS,
    FaultOutcome,
    foreign_cpu_cores,
    foreign_cpu_peak_cores,
    phase_stats,
    phases_of,
    read_incidents,
)
from tokenmill.bench.fault_signals import movements
from tokenmill.bench.fault_stack import (
    Deployment,
    Recorder,
    Watcher,
    deployed,
    tokenmill_gateway,
    tokenmill_server,
)
from tokenmill.bench.tokenizer import load_tokenizer
from tokenmill.observability.metrics_source import read_recording

Say = Callable[[str], None]
GATEWAY_HEALTH_INTERVAL_S = 2.0
PROGRESS_EVERY_S = 15.0


@dataclass(frozen=True)
class FaultsSpec:
    model: str  # checkpoint folder or GGUF file
    tokenizer: str  # matching the model: makes the random prompts
    loads: FaultLoads
    warmup_s: float = 90.0  # steady load before the injection: the watcher's learning time
    fault_s: float = 45.0
    after_s: float = 30.0
    clean_s: float = 300.0
    interval_s: float = 1.0  # recorder's and watcher's scrape interval
    record_dir: Path | None = None  # <fault>.jsonl.gz + faults.json; None: only in the work dir
    keep_disturbed: bool = False  # copy a run disturbed by other processes to record_dir all the same
    plot_dir: Path | None = None
    use_watch: bool = True
    watch_args: tuple[str, ...] = ()
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tokenmill-faults-")))


def deployment_for(fault: str, spec: FaultsSpec) -> Deployment:
    if fault == "backend_killed":
        threads = max(1, (os.cpu_count() or 2) // 2)
        backends = [tokenmill_server(f"backend-{i}", spec.model, spec.workdir, num_threads=threads) for i in (1, 2)]
        gateway = tokenmill_gateway(backends, spec.workdir, GATEWAY_HEALTH_INTERVAL_S)
        return Deployment(target=gateway, servers=backends, gateway=gateway)
    args: list[str] = []
    if fault == "small_kv":
        args = ["--kv-cache-memory", str(small_kv_bytes(spec.model, spec.loads)),
                "--max-model-len", str(spec.loads.small_kv_max_model_len)]
    server = tokenmill_server("server", spec.model, spec.workdir, args)
    return Deployment(target=server, servers=[server])


def small_kv_bytes(model: str, loads: FaultLoads) -> int:
    """The --kv-cache-memory that buys `loads.small_kv_tokens` tokens of this model's KV."""
    from tokenmill.config import create_engine_config
    from tokenmill.model.runner import kv_bytes_per_block

    config = create_engine_config(model, max_model_len=loads.small_kv_max_model_len)
    return -(-loads.small_kv_tokens // config.cache.block_size) * kv_bytes_per_block(config)


def make_fault(fault: str, dep: Deployment, endpoint: EndpointSpec, tokenizer, spec: FaultsSpec,
               stop: asyncio.Event) -> Fault:
    loads = spec.loads
    if fault == "cpu_hog":
        return CpuHog(loads.cpu_hog_processes)
    if fault == "long_prompts":
        s = loads.long_prompts
        return ExtraLoad(endpoint, tokenizer, s, spec.fault_s, stop,
                         f"{s.request_rate:g} req/s of ~{s.input_len}-token prompts ({s.output_len} output tokens) "
                         "on top of the steady load")
    if fault == "small_kv":
        s = loads.kv_squeeze
        return ExtraLoad(endpoint, tokenizer, s, spec.fault_s, stop,
                         f"server KV cache of {loads.small_kv_tokens} tokens; fault: {s.request_rate:g} req/s of "
                         f"~{s.input_len}+{s.output_len}-token requests on top of the steady load")
    if fault == "slow_readers":
        return SlowReaders(endpoint, tokenizer, "127.0.0.1", dep.target.port, loads.slow_readers)
    if fault == "backend_killed":
        return BackendKill(dep.servers[0])
    raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")


async def _sleep_until(deadline_s: float, stop: asyncio.Event, on_tick: Callable[[], None]) -> None:
    """Sleep until unix time `deadline_s` or until stopped, calling on_tick every few seconds."""
    while not stop.is_set() and (left := deadline_s - time.time()) > 0:
        try:
            await asyncio.wait_for(stop.wait(), min(left, PROGRESS_EVERY_S))
        except asyncio.TimeoutError:
            on_tick()


class _IncidentTail:
    """Prints the watcher's incidents as they appear."""

    def __init__(self, path: Path, fault: str, say: Say) -> None:
        self.path, self.fault, self.say, self.num_seen = path, fault, say, 0
        self.injected_at_s: float | None = None

    def __call__(self) -> None:
        incidents = read_incidents(self.path)
        for i in incidents[self.num_seen:]:
            at = float(i.get("reported_at_s") or time.time())
            when = f"{at - self.injected_at_s:+.1f} s after injection" if self.injected_at_s else "before injection"
            self.say(f"{self.fault}: watch reported {i.get('kind')} / cause {i.get('cause')} ({when})")
        self.num_seen = len(incidents)


async def run_fault(fault: str, dep: Deployment, spec: FaultsSpec, recording: Path, say: Say) -> FaultOutcome:
    """The phases of one run on a started deployment."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    tokenizer = load_tokenizer(spec.tokenizer)
    async with httpx.AsyncClient() as client:
        model = await fetch_first_model(client, dep.target.url + "/v1")
    endpoint = EndpointSpec(dep.target.url + "/v1", model, request_timeout_s=LOAD_REQUEST_TIMEOUT_S)
    recorder = Recorder(dep.metrics_urls, recording, spec.interval_s)
    recorder_stop = asyncio.Event()
    recorder_task = asyncio.create_task(recorder.run(recorder_stop))
    incident_log = spec.workdir / f"{fault}.incidents.jsonl"
    incident_log.unlink(missing_ok=True)
    watcher = (Watcher(dep.metrics_urls, incident_log, spec.workdir / f"{fault}.watch.log", spec.interval_s,
                       spec.watch_args) if spec.use_watch else None)
    tail = _IncidentTail(incident_log, fault, say)
    is_clean = fault == CLEAN
    run_s = spec.clean_s if is_clean else spec.warmup_s + spec.fault_s + spec.after_s
    started = time.time()
    # A few seconds past the end, so the load is still on when recording stops. No warm-up
    # request: the samples' send times then count from `started` (to a few ms).
    load_task = asyncio.create_task(offer_load(endpoint, tokenizer, spec.loads.steady, run_s + 5, stop))
    outcome = FaultOutcome(fault, "steady load only", started, started, watch_ran=watcher is not None)
    say(f"{fault}: steady load {spec.loads.steady.request_rate:g} req/s for {run_s:.0f} s")
    injector: Fault | None = None
    try:
        if is_clean:
            await _sleep_until(started + run_s, stop, tail)
        else:
            await _sleep_until(started + spec.warmup_s, stop, tail)
            injector = make_fault(fault, dep, endpoint, tokenizer, spec, stop)
            outcome.description = injector.description
            outcome.injected_at_s = tail.injected_at_s = time.time()
            await injector.inject()
            say(f"{fault}: injected: {injector.description}")
            await _sleep_until(outcome.injected_at_s + spec.fault_s, stop, tail)
            outcome.removed_at_s = time.time()
            await injector.remove()
            say(f"{fault}: removed; recovery for {spec.after_s:.0f} s")
            await _sleep_until(outcome.removed_at_s + spec.after_s, stop, tail)
        if stop.is_set():
            outcome.notes.append("interrupted before the end")
    finally:
        outcome.ended_at_s = time.time()
        recorder_stop.set()
        await recorder_task
        if watcher is not None:
            code = await asyncio.to_thread(watcher.stop)
            if code not in (0, 130, -signal.SIGINT):
                outcome.notes.append(f"tokenmill watch exited with {code} (log: {watcher.log_path})")
        stop.set()
        result = await load_task
        if injector is not None:
            if outcome.removed_at_s is None:  # interrupted during the fault
                await injector.remove()
            if note := await injector.close():
                outcome.notes.append(note)
    tail()
    outcome.incidents = read_incidents(incident_log)
    outcome.foreign_cpu = {name: foreign_cpu_cores(recorder.host_cpu, lo, hi) for name, lo, hi in
                           phases_of(started, outcome.injected_at_s, outcome.removed_at_s, outcome.ended_at_s)}
    outcome.foreign_cpu_peak = foreign_cpu_peak_cores(recorder.host_cpu)
    (spec.workdir / f"{fault}.host_cpu.json").write_text(json.dumps(recorder.host_cpu))
    if outcome.is_disturbed:
        say(f"{fault}: other processes used the CPU during the run ({outcome.foreign_cpu}, at most "
            f"{outcome.foreign_cpu_peak:.2f} cores in 10 s): its signals may show them")
    outcome.phases = phase_stats(result.samples, started, outcome.injected_at_s, outcome.removed_at_s,
                                 outcome.ended_at_s)
    if outcome.injected_at_s is not None and outcome.removed_at_s is not None:
        outcome.movements = movements(recorder.snapshots, outcome.injected_at_s, outcome.removed_at_s)
    outcome.recording = str(recording)
    return outcome


def run_one(fault: str, spec: FaultsSpec, say: Say) -> FaultOutcome:
    """Deploy, run, tear down; then the plot, and the recording with its faults.json entry to
    the record dir, unless other work on the machine disturbed the run (test data must show
    the fault, not a neighbour: such a run stays in the work dir)."""
    recording = spec.workdir / f"{fault}.jsonl.gz"
    with deployed(deployment_for(fault, spec), say) as dep:
        outcome = asyncio.run(run_fault(fault, dep, spec, recording, say))
    if spec.plot_dir is not None:
        from tokenmill.bench.fault_plot import plot_outcome

        spec.plot_dir.mkdir(parents=True, exist_ok=True)
        say(f"{fault}: plot {plot_outcome(outcome, read_recording(recording), spec.plot_dir / f'{fault}.png')}")
    if spec.record_dir is not None:
        if outcome.is_disturbed and not spec.keep_disturbed:
            outcome.notes.append(f"not copied to {spec.record_dir}: disturbed (--keep-disturbed copies it anyway)")
            say(f"{fault}: recording left in {recording}, not copied to {spec.record_dir}: disturbed run")
        else:
            spec.record_dir.mkdir(parents=True, exist_ok=True)
            outcome.recording = str(shutil.copy(recording, spec.record_dir / recording.name))
            if fault != CLEAN:
                update_sidecar(spec.record_dir / "faults.json", fault, outcome)
    return outcome


def update_sidecar(path: Path, fault: str, outcome: FaultOutcome) -> None:
    """Merge this fault's times into faults.json (other faults' entries are kept)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[fault] = outcome.sidecar()
    path.write_text(json.dumps(dict(sorted(data.items())), indent=2) + "\n")


def run_faults(faults: list[str], spec: FaultsSpec, say: Say) -> list[FaultOutcome]:
    outcomes = []
    for fault in faults:
        t0 = time.monotonic()
        outcomes.append(run_one(fault, spec, say))
        say(f"{fault}: done in {time.monotonic() - t0:.0f} s")
    return outcomes


def with_rate(loads: FaultLoads, request_rate: float | None) -> FaultLoads:
    return loads if request_rate is None else replace(loads, steady=replace(loads.steady, request_rate=request_rate))


def stderr_say(message: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
