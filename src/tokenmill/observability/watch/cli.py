"""`tokenmill watch`: follow live metrics and report incidents as they start."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time

import aiohttp

from tokenmill.observability.metrics_source import (
    EndpointSource,
    PrometheusSource,
    iter_recording,
    open_recording,
    write_snapshot,
)
from tokenmill.observability.watch.detector import DetectorConfig
from tokenmill.observability.watch.sinks import post_webhook, terminal_lines, write_json
from tokenmill.observability.watch.watcher import Event, WatchConfig, Watcher

DESCRIPTION = """\
Watch a running tokenmill (one server, several replicas, a gateway) and report incidents as
they start: latency regressions, SLO burn, throughput drops, queue build-up, cache thrash,
preemption storms, error bursts, backends going down. Each signal's normal behaviour is
learned as it runs (no thresholds to set); each incident names its likely cause, the
evidence (which signals moved, in the order they moved) and an action. Incidents go to the
terminal, to --incident-log (JSON lines) and to --webhook (Alertmanager's webhook format).

  tokenmill watch --metrics-url http://127.0.0.1:8000/metrics
  tokenmill watch --prometheus-url http://127.0.0.1:9090 --webhook http://127.0.0.1:5001/hook
  tokenmill watch --replay recorded.jsonl.gz     # a recording made with --record
"""


def add_watch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="Follow live metrics and report incidents with their likely cause.",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--metrics-url", action="append", metavar="URL",
                     help="A /metrics endpoint to scrape (repeat for replicas, backends, the gateway).")
    src.add_argument("--prometheus-url", metavar="URL",
                     help="A Prometheus server that scrapes tokenmill: read every target through its HTTP API.")
    src.add_argument("--replay", metavar="FILE", help="Replay a recording (from --record) instead of live metrics.")
    p.add_argument("--interval-s", type=float, default=1.0, help="Seconds between reads. (default: 1)")
    p.add_argument("--window-s", type=float, default=10.0,
                   help="Rates and means are taken over this window. (default: 10)")
    p.add_argument("--warmup-samples", type=int, default=30,
                   help="Reads that teach normal behaviour before any incident. (default: 30)")
    p.add_argument("--incident-log", metavar="PATH", help="Append incidents (opened, resolved) as JSON lines.")
    p.add_argument("--webhook", action="append", default=[], metavar="URL",
                   help="POST each incident in Alertmanager's webhook format (repeatable).")
    p.add_argument("--record", metavar="PATH", help="Also write every read to PATH (JSON lines; .gz to compress).")
    p.add_argument("--duration-s", type=float, default=None, help="Stop after this long. (default: until Ctrl-C)")
    p.add_argument("--quiet", action="store_true", help="No terminal output besides incidents.")
    p.set_defaults(func=run_watch)


def run_watch(args: argparse.Namespace) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    config = WatchConfig(window_s=args.window_s, detector=DetectorConfig(warmup_samples=args.warmup_samples))
    watcher = Watcher(config)
    log = open(args.incident_log, "a") if args.incident_log else None
    try:
        if args.replay:
            return _replay(args, watcher, log)
        return asyncio.run(_live(args, watcher, log))
    finally:
        if log is not None:
            log.close()


def _emit(events: list[Event], log) -> None:
    for event in events:
        for line in terminal_lines(event):
            print(line, flush=True)
        if log is not None:
            write_json(log, event)


def _replay(args: argparse.Namespace, watcher: Watcher, log) -> int:
    """A recording read as fast as it goes: the same incidents, logs and webhooks as live."""

    async def replay() -> int:
        num = 0
        async with aiohttp.ClientSession() as session:
            for snapshot in iter_recording(args.replay):
                events = watcher.observe(snapshot)
                _emit(events, log)
                await _post(session, args.webhook, events)
                num += 1
        return num

    num = asyncio.run(replay())
    if not args.quiet:
        print(f"replayed {num} snapshots from {args.replay}", file=sys.stderr)
    return 0


async def _post(session: aiohttp.ClientSession, urls: list[str], events: list[Event]) -> None:
    for event in events:
        for url in urls:
            await post_webhook(session, url, event)


async def _live(args: argparse.Namespace, watcher: Watcher, log) -> int:
    source = PrometheusSource(args.prometheus_url) if args.prometheus_url else EndpointSource(args.metrics_url)
    what = args.prometheus_url or ", ".join(args.metrics_url)
    if not args.quiet:
        learn_s = (args.warmup_samples * args.interval_s) + args.window_s
        print(f"watching {what} every {args.interval_s:g} s; learning normal behaviour for ~{learn_s:.0f} s",
              file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    record = open_recording(args.record, "a") if args.record else None
    deadline = None if args.duration_s is None else time.monotonic() + args.duration_s
    learned = False
    try:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                started = time.monotonic()
                try:
                    snapshot = await source.snapshot()
                except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as e:
                    print(f"could not read metrics from {what}: {e!r}", file=sys.stderr, flush=True)
                else:
                    if record is not None:
                        write_snapshot(record, snapshot)
                    events = watcher.observe(snapshot)
                    _emit(events, log)
                    await _post(session, args.webhook, events)
                    if not learned and watcher.learned and not args.quiet:
                        learned = True
                        print("normal behaviour learned; watching for incidents", file=sys.stderr, flush=True)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, args.interval_s - (time.monotonic() - started)))
    finally:
        await source.close()
        if record is not None:
            record.close()
    return 0
