"""`tokenmill watch` on metric series recorded from live servers (`tokenmill bench faults
--record-dir tests/observability/data`): steady load, then one real fault injected at a
known time. The watcher must stay quiet on a clean series, and find each fault after it
began, within a minute, naming its cause then (at once, or revised by decisive evidence
within that minute). faults.json holds the injection times and the expected causes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.observability.metrics_source import iter_recording
from tokenmill.observability.watch.watcher import Watcher

DATA = Path(__file__).parent / "data"
FAULTS = {name: truth for name, truth in json.loads((DATA / "faults.json").read_text()).items()
          if truth.get("injected_at_s") is not None}
MAX_DELAY_S = 60.0


def replay(path: Path) -> list[tuple[float, str, str, str]]:
    """(time, event, incident id, cause) of every event the watcher raised."""
    watcher, out = Watcher(), []
    for snapshot in iter_recording(path):
        for e in watcher.observe(snapshot):
            out.append((snapshot.time_s, e.what, e.incident.id, e.incident.cause))
    return out


def test_a_clean_recording_raises_nothing():
    assert replay(DATA / "clean.jsonl.gz") == []


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_recorded_fault_is_found_with_its_cause(fault):
    truth = FAULTS[fault]
    injected_at_s = truth["injected_at_s"]
    events = replay(DATA / f"{fault}.jsonl.gz")
    early = [e for e in events if e[0] < injected_at_s]
    assert not early, f"false alarm before the fault: {early}"
    opened = [e for e in events if e[1] == "opened"]
    assert opened, f"{fault}: nothing reported"
    first_at, _, first_id, _ = opened[0]
    assert first_at - injected_at_s <= MAX_DELAY_S, f"{fault} reported {first_at - injected_at_s:.0f} s after injection"
    causes = [cause for at, what, incident, cause in events
              if incident == first_id and what in ("opened", "updated") and at - injected_at_s <= MAX_DELAY_S]
    assert causes[-1] == truth["expected_cause"], events


def test_the_command_logs_incidents_and_posts_them_to_a_webhook(tmp_path):
    """`tokenmill watch --replay ... --incident-log ... --webhook URL` against a real HTTP
    receiver on loopback: the incident arrives in Alertmanager's webhook format."""
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the stdlib's name)
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log = tmp_path / "incidents.jsonl"
    try:
        proc = subprocess.run([sys.executable, "-m", "tokenmill", "watch", "--replay", str(DATA / "small_kv.jsonl.gz"),
                               "--incident-log", str(log), "--webhook", f"http://127.0.0.1:{server.server_port}/hook"],
                              capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    assert "INCIDENT" in proc.stdout and "kv cache pressure" in proc.stdout
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert logged[0]["event"] == "opened" and logged[0]["cause"] == "kv_cache_pressure"
    assert received and received[0]["version"] == "4" and received[0]["status"] == "firing"
    alert = received[0]["alerts"][0]
    assert alert["labels"]["cause"] == "kv_cache_pressure" and alert["annotations"]["action"]
    assert {p["groupLabels"]["incident"] for p in received} == {logged[0]["id"]}  # one incident, not one per signal
