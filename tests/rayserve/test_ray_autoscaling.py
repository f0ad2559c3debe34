"""Autoscaling on ongoing requests: one replica when idle, two under load, one again when the
load stops (Serve's decisions, sped up by short delays and metric windows)."""

from __future__ import annotations

import json
import threading

import httpx

from tests.server.server_harness import CEILING_S, wait_until
from tokenmill.config import DEMO_MODEL_DIR

from .harness import RayServe

AUTOSCALING = {"autoscaling_config": {"metrics_interval_s": 0.5, "look_back_period_s": 2}}


def test_autoscaling_goes_1_to_2_under_load_and_back_to_1_when_idle(cluster):
    served = RayServe(cluster, "--model", DEMO_MODEL_DIR, "--served-model-name", "demo", "--dtype", "float32",
                      "--max-model-len", "1024", "--kv-cache-memory", "64MiB", "--disable-log-requests",
                      "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "1",
                      "--upscale-delay", "1", "--downscale-delay", "4", "--deployment-config", json.dumps(AUTOSCALING))
    stop = threading.Event()
    answered_by: set[str] = set()
    statuses: list[int] = []  # asserted after the threads end (an assert in a thread is only a warning)

    def load():
        with httpx.Client(timeout=CEILING_S) as client:
            while not stop.is_set():
                r = client.post(served.url + "/v1/completions", json={
                    "model": "demo", "prompt": "a long tale", "max_tokens": 32, "ignore_eos": True})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    answered_by.add(r.headers["x-tokenmill-replica"])

    try:
        assert len(served.replicas()) == 1  # min_replicas at start
        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            wait_until(lambda: len(served.replicas()) == 2, interval=0.5)
            wait_until(lambda: len(answered_by) == 2, interval=0.5)  # the new replica serves
        finally:
            stop.set()
            for w in workers:
                w.join()
        assert len(statuses) >= 8 and set(statuses) == {200}, statuses  # scaling up lost nothing
        wait_until(lambda: len(served.replicas()) == 1, interval=0.5)
        r = httpx.post(served.url + "/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-tokenmill-replica"] in served.replicas()
    finally:
        served.stop()


def test_scale_to_zero_and_back_on_the_next_request(cluster):
    served = RayServe(cluster, "--model", DEMO_MODEL_DIR, "--served-model-name", "demo", "--dtype", "float32",
                      "--max-model-len", "1024", "--kv-cache-memory", "64MiB", "--disable-log-requests",
                      "--min-replicas", "0", "--max-replicas", "1", "--downscale-delay", "2",
                      "--deployment-config", json.dumps(AUTOSCALING))
    try:
        wait_until(lambda: not served.replicas(), interval=0.5)  # idle: no replica left
        assert httpx.get(served.url + "/health").status_code == 200  # answered without waking one
        assert not served.replicas()
        r = httpx.post(served.url + "/v1/completions", timeout=CEILING_S,  # waits while a replica loads
                       json={"model": "demo", "prompt": "wake up", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert served.replicas() == {r.headers["x-tokenmill-replica"]}
    finally:
        served.stop()
