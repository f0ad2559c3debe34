"""The Grafana dashboards under deploy/grafana/: the committed JSON is what the generator
(`tokenmill dashboards`) writes now, and every panel's query returns data from a real
Prometheus scraping a live `tokenmill serve` (speculative decoding on) and a `tokenmill
gateway` in front of it, after some load: streamed and plain completions, a chat, an unknown
model, requests over a key's rate limit.

A query that matches no series, misspells a metric or a label, or divides by a counter that
never moves shows up here as an empty or NaN result, which Grafana would draw as "No data".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("grafana_foundation_sdk", reason="the dashboard generator needs Grafana's SDK (Python 3.11+)")

from tests.gateway.harness import create_key, gateway  # noqa: E402
from tests.server.server_harness import CEILING_S, ServedProcess, wait_until  # noqa: E402
from tests.services import ServiceUnavailable, prometheus_server  # noqa: E402
from tokenmill.config import DEMO_MODEL_DIR  # noqa: E402
from tokenmill.observability.dashboards import (  # noqa: E402
    SDK_REQUIREMENT,
    add_dashboards_parser,
    panel_queries,
    render_dashboards,
)

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
MODEL = "demo"
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": None}
# Repeats itself, so n-gram lookup finds drafts to propose.
PROMPT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is "
          "the sun. ROMEO: But soft, what light")
SCRAPE_INTERVAL_S = 1.0
LABEL_VALUES = re.compile(r"^label_values\((?P<metric>[^,]+),\s*(?P<label>\w+)\)$")


def _committed() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(DEPLOY_DIR.glob("*.json"))}


def test_committed_dashboards_are_the_generated_ones(tmp_path):
    # Another SDK release writes other JSON: say so rather than call the files stale.
    installed = importlib.metadata.version("grafana_foundation_sdk").lstrip("v")
    assert installed == SDK_REQUIREMENT.partition("==")[2], f"install {SDK_REQUIREMENT} (found {installed})"
    parser = argparse.ArgumentParser()
    add_dashboards_parser(parser.add_subparsers())
    check = parser.parse_args(["dashboards", "--output-dir", str(DEPLOY_DIR), "--check"])
    assert check.func(check) == 0, "deploy/grafana is stale: run tokenmill dashboards --output-dir deploy/grafana"
    write = parser.parse_args(["dashboards", "--output-dir", str(tmp_path)])
    assert write.func(write) == 0
    assert {p.name: p.read_text(encoding="utf-8") for p in tmp_path.iterdir()} == _committed() == render_dashboards()
    for text in _committed().values():
        variables = {v["name"]: v for v in json.loads(text)["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert variables["model_name"]["includeAll"] and variables["model_name"]["allValue"] == ".*"


def _load(server_url: str, gw_url: str, paid_key: str, limited_key: str) -> None:
    def completion(i: int) -> None:
        body = {"model": MODEL, "prompt": f"{i}: {PROMPT}", "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, "stream": i % 2 == 0}
        with httpx.Client(timeout=CEILING_S) as c:
            r = c.post(gw_url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {paid_key}"})
            assert r.status_code == 200, r.text

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(completion, range(12)))
    with httpx.Client(timeout=CEILING_S) as c:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12, "stream": True}
        assert c.post(gw_url + "/v1/chat/completions", json=chat,
                      headers={"Authorization": f"Bearer {paid_key}"}).status_code == 200
        assert c.post(server_url + "/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
        limited = [c.post(gw_url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                          headers={"Authorization": f"Bearer {limited_key}"}).status_code for _ in range(3)]
        assert limited == [200, 429, 429], limited


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """(Prometheus URL, when the load started) once a server, a gateway and Prometheus run and
    the load is over."""
    tmp = tmp_path_factory.mktemp("dashboards")
    prices = tmp / "gateway.toml"
    prices.write_text(f'[models.{MODEL}]\ninput_usd_per_1m = 1.0\noutput_usd_per_1m = 2.0\n')
    server_args = ("--served-model-name", MODEL, "--dtype", "float32", "--max-model-len", "1024",
                   "--kv-cache-memory", "64MiB", "--speculative-config", json.dumps(SPEC), "--disable-log-requests")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(ServedProcess(DEMO_MODEL_DIR, *server_args, capture_log=False))
        gw = stack.enter_context(gateway([server.url], tmp / "keys.db", "--config", str(prices),
                                         "--access-log", "off"))
        targets = [u.removeprefix("http://") for u in (server.url, gw.url)]
        try:
            prom = stack.enter_context(prometheus_server(targets, scrape_interval_s=SCRAPE_INTERVAL_S))
        except ServiceUnavailable as e:
            pytest.skip(str(e))
        paid = create_key(gw.url, key_alias="paid", max_budget=100.0, budget_duration="daily")
        limited = create_key(gw.url, key_alias="limited", rpm_limit=1)
        # The counters' values before the load must be scraped too, or rate() over the load
        # would start from its first scrape and miss what came before. The gateway's series
        # are labelled by model, so they exist only after a first request through it: one
        # request, scraped, before the load (else a load shorter than a scrape interval left
        # them one constant sample: rate 0, NaN quantiles).
        with httpx.Client(timeout=CEILING_S) as c:
            r = c.post(gw.url + "/v1/completions", json={"model": MODEL, "prompt": "warm", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {paid}"})
            assert r.status_code == 200, r.text
        wait_until(lambda: _up(prom) == 2 and _instant(prom, "tokenmill:gateway_request_latency_seconds_count")["result"],
                   timeout=60, interval=0.2)
        started = time.time()
        _load(server.url, gw.url, paid, limited)
        yield prom, started


def _up(prom: str) -> int:
    r = httpx.get(prom + "/api/v1/query", params={"query": "sum(up)"}, timeout=CEILING_S).json()
    return int(float(r["data"]["result"][0]["value"][1])) if r["data"]["result"] else 0


def _instant(prom: str, promql: str) -> dict:
    r = httpx.get(prom + "/api/v1/query", params={"query": promql}, timeout=CEILING_S).json()
    assert r["status"] == "success", (promql, r)
    return r["data"]


def _substitute(expr: str, window: str) -> str:
    """What Grafana sends: the model picked, its rate window and range filled in. The window
    spans the whole load, as $__rate_interval would on a dashboard zoomed out to it."""
    promql = (expr.replace("$model_name", MODEL).replace("$__rate_interval", window)
              .replace("$__range", window))
    assert "$" not in promql, f"a variable the test does not fill in: {promql}"
    return promql


def test_every_panel_query_returns_data(prometheus):
    prom, started = prometheus
    queries = panel_queries(_committed())
    assert {q.needs for q in queries} == {None, "gateway", "speculative decoding"}

    def failing() -> list[str]:
        window = f"{math.ceil(time.time() - started) + 10}s"
        out = []
        for q in queries:
            promql = _substitute(q.expr, window)
            result = _instant(prom, promql)["result"]
            values = [float(s["value"][1]) for s in result]
            if not any(math.isfinite(v) for v in values):
                out.append(f"{q.dashboard} / {q.panel}: {promql} -> {values or 'no series'}")
        return out

    # Until Prometheus has scraped the end of the load (a scrape or two).
    deadline = time.monotonic() + 30
    while (bad := failing()) and time.monotonic() < deadline:
        time.sleep(SCRAPE_INTERVAL_S)
    assert not bad, "panels without data:\n" + "\n".join(bad)


def test_model_variable_lists_the_served_model(prometheus):
    prom, _ = prometheus
    for name, text in _committed().items():
        variable = next(v for v in json.loads(text)["templating"]["list"] if v["name"] == "model_name")
        m = LABEL_VALUES.match(variable["query"])
        assert m, f"{name}: {variable['query']}"
        r = httpx.get(f"{prom}/api/v1/label/{m['label']}/values", params={"match[]": m["metric"]},
                      timeout=CEILING_S).json()
        assert r["status"] == "success" and MODEL in r["data"], (name, r)
