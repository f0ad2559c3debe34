"""Plots of recorded fault runs with what `tokenmill watch` (this version) reports on them.

Replays each recording of a `tokenmill bench faults --record-dir DIR` run through the
watcher in-process, then draws the signals around the injection with the injection, the
removal and the watcher's first report marked (bench/fault_plot.py), and prints the table
of detection delays and causes. The watcher reads a recording exactly as it read the live
scrapes, so the delays are those of a live run with this version.

    python scripts/plot_faults.py tests/observability/data docs/img/faults
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenmill.bench.fault_plot import plot_outcome
from tokenmill.bench.fault_report import FaultOutcome
from tokenmill.observability.metrics_source import read_recording
from tokenmill.observability.watch.watcher import Watcher

MAX_DELAY_S = 60.0


def replayed(record_dir: Path, fault: str, truth: dict) -> tuple[FaultOutcome, list]:
    snapshots = read_recording(record_dir / f"{fault}.jsonl.gz")
    watcher, incidents = Watcher(), []
    for snapshot in snapshots:
        for event in watcher.observe(snapshot):
            if event.what in ("opened", "updated"):
                incidents.append({**event.incident.to_json(), "event": event.what, "at_s": snapshot.time_s})
    outcome = FaultOutcome(fault=fault, description=truth["description"], started_at_s=truth["started_at_s"],
                           ended_at_s=truth["ended_at_s"], injected_at_s=truth.get("injected_at_s"),
                           removed_at_s=truth.get("removed_at_s"), watch_ran=True,
                           incidents=[i for i in incidents if i["event"] == "opened"])
    return outcome, incidents


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("record_dir", type=Path, help="A --record-dir of tokenmill bench faults (with faults.json).")
    p.add_argument("plot_dir", type=Path, help="Where to write <fault>.png.")
    args = p.parse_args()
    truths = json.loads((args.record_dir / "faults.json").read_text())
    args.plot_dir.mkdir(parents=True, exist_ok=True)
    print("| fault | injected (what) | reported after (s) | kind | cause named | settled cause (within 60 s) "
          "| expected | false alarms |")
    print("|---|---|---|---|---|---|---|---|")
    for fault, truth in truths.items():
        outcome, events = replayed(args.record_dir, fault, truth)
        plot_outcome(outcome, read_recording(args.record_dir / f"{fault}.jsonl.gz"), args.plot_dir / f"{fault}.png")
        injected = truth.get("injected_at_s")
        early = [e for e in events if injected is None or e["at_s"] < injected]
        first = next((e for e in events if injected is not None and e["at_s"] >= injected), None)
        if first is None:
            print(f"| {fault} | {truth['description']} | - | - | - | - | {truth.get('expected_cause') or '-'} "
                  f"| {len(early)} |")
            continue
        settled = [e["cause"] for e in events if e["id"] == first["id"] and e["at_s"] - injected <= MAX_DELAY_S][-1]
        print(f"| {fault} | {truth['description']} | {first['at_s'] - injected:.0f} | {first['kind']} "
              f"| {first['cause']} | {settled} | {truth['expected_cause']} | {len(early)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
