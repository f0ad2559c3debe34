"""The Ray Serve application's parts without a cluster: its config (build_app's args and
`tokenmill serve --ray`'s flags, one path), the request router's ranks and load counts, the
in-process ASGI call (with disconnects), and the metrics federation's relabelling."""

from __future__ import annotations

import asyncio
import os
import re
from types import SimpleNamespace

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID
from ray.serve._private.request_router.common import RequestRoutingContext
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tokenmill.bench.spec_counts import SpecDecodeCounts
from tokenmill.cli import build_parser
from tokenmill.config import DEMO_MODEL_DIR
from tokenmill.ray.asgi_call import HTTPCall, call_asgi
from tokenmill.ray.config import RayAppConfig, parse_serve_argv, ray_args
from tokenmill.ray.replica_metrics import _Families, relabel
from tokenmill.ray.request_router import PrefixAwareRequestRouter

# --- config -------------------------------------------------------------------------------


def test_build_app_args_become_the_replicas_serve_options():
    config = RayAppConfig.from_args({
        "model": os.path.relpath(DEMO_MODEL_DIR),
        "engine_kwargs": {"max_model_len": 512, "enable_prefix_caching": False, "served_model_name": ["a", "b"],
                          "kv_cache_memory": "64MiB", "disable_log_requests": True,
                          "speculative_config": {"method": "ngram", "num_speculative_tokens": 3}},
        "deployment_config": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 4}},
        "routing": {"policy": "least_requests", "load_factor": 1.5}})
    args = parse_serve_argv(config.serve_argv)
    assert args.model == DEMO_MODEL_DIR  # made absolute: replicas run elsewhere
    assert (args.max_model_len, args.enable_prefix_caching, args.served_model_name) == (512, False, ["a", "b"])
    assert args.kv_cache_memory == 64 * 2**20 and args.disable_log_requests
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}
    assert config.deployment_config == {"autoscaling_config": {"min_replicas": 0, "max_replicas": 4},
                                        "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 1},
                                        "graceful_shutdown_timeout_s": 30.0}  # --drain-timeout's default
    assert (config.routing_policy, config.routing.policy, config.routing.load_factor) == (
        "least_requests", "least_requests", 1.5)
    assert config.stream_batching_interval_ms == 50
    cuda = RayAppConfig.from_args({"engine_kwargs": {"device": "cuda"}})
    assert cuda.deployment_config["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}


@pytest.mark.parametrize("args, message", [
    ({"engine": {}}, "unknown tokenmill.ray:build_app arg"),
    ({"engine_kwargs": {"port": 9000}}, "Serve's HTTP proxy listens"),
    ({"engine_kwargs": {"max_model_len": "long"}}, "invalid int value: 'long'"),
    ({"engine_kwargs": {"max_replicas": 2}}, "'max_replicas' is not a `tokenmill serve` option"),
    ({"engine_kwargs": {"no_such_flag": 1}}, "'no_such_flag' is not a `tokenmill serve` option"),
    ({"engine_kwargs": ["--max-model-len"]}, "engine_kwargs must be a mapping"),
    ({"routing": {"policy": "round_robin"}}, "routing.policy must be one of prefix, least_requests, power_of_two"),
    ({"routing": {"load_factor": 0.5}}, "load_factor must be >= 1"),
    ({"stream_batching_interval_ms": -1}, "stream_batching_interval_ms must be a number >= 0"),
    ({"deployment_config": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}}, "not both"),
])
def test_bad_build_app_args_are_named(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RayAppConfig.from_args(args)


def test_serve_ray_flags_take_the_build_app_path():
    ns = build_parser().parse_args(["serve", "--ray", "--min-replicas", "0", "--max-replicas", "3",
                                    "--upscale-delay", "5", "--replica-cpus", "2", "--max-model-len", "512",
                                    "--routing", "power_of_two", "--port", "9000", "--api-key", "k",
                                    "--deployment-config", '{"autoscaling_config": {"look_back_period_s": 4}}'])
    args = ray_args(ns)
    assert args["engine_kwargs"] == {"max_model_len": 512, "api_key": "k"}  # no --port, no --ray flags
    assert args["stream_batching_interval_ms"] == 50
    assert args["deployment_config"] == {
        "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 2},
        "autoscaling_config": {"min_replicas": 0, "max_replicas": 3, "upscale_delay_s": 5, "look_back_period_s": 4}}
    config = RayAppConfig.from_args(args)
    assert config.routing_policy == "power_of_two"
    assert parse_serve_argv(config.serve_argv).max_model_len == 512
    fixed = ray_args(build_parser().parse_args(["serve", "--ray"]))
    assert fixed["deployment_config"]["num_replicas"] == 1 and fixed["engine_kwargs"] == {}
    with pytest.raises(ValueError, match="not both"):
        ray_args(build_parser().parse_args(["serve", "--ray", "--num-replicas", "2", "--max-replicas", "3"]))
    with pytest.raises(ValueError, match="needs --max-replicas"):
        ray_args(build_parser().parse_args(["serve", "--ray", "--min-replicas", "0"]))


def test_ray_flags_without_ray_are_an_error(capsys):
    from tokenmill.cli import main

    assert main(["serve", "--num-replicas", "2", "--routing", "least_requests"]) == 2
    assert "--num-replicas, --routing only apply with --ray" in capsys.readouterr().err


# --- request router -----------------------------------------------------------------------

DEPLOYMENT = DeploymentID(name="TokenmillEngine", app_name="tokenmill")


class _Replica:  # what the router reads of Serve's RunningReplica
    def __init__(self, name: str) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)


class _Pending:  # what the router reads of Serve's PendingRequest
    def __init__(self, text: str, request_id: str = "") -> None:
        self.args = [HTTPCall("POST", "/v1/completions", b"", (), b"", routing_text=text)]
        self.routing_context = RequestRoutingContext()
        self.metadata = SimpleNamespace(internal_request_id=request_id)


def _router(**kwargs) -> PrefixAwareRequestRouter:
    router = PrefixAwareRequestRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(**kwargs)
    return router


def test_router_ranks_the_policy_choice_then_power_of_two():
    router, replicas = _router(), [_Replica(n) for n in "abcd"]
    prompt = "a system prompt shared by many requests " * 8
    ranks = asyncio.run(router.choose_replicas(replicas, _Pending(prompt)))
    assert len(ranks) == 2 and len(ranks[0]) == 1 and len(ranks[1]) == 2
    chosen = ranks[0][0]
    assert chosen not in ranks[1]
    for i in range(5):  # the same prefix keeps its replica while loads stay within the bound
        pending = _Pending(prompt + f"question {i}")
        assert asyncio.run(router.choose_replicas(replicas, pending))[0] == [chosen]
        assert pending.routing_context.should_backoff  # no spinning while every replica is full
    no_prompt = asyncio.run(router.choose_replicas(replicas, _Pending("")))
    assert len(no_prompt) == 1 and len(no_prompt[0]) == 2  # Serve's power of two choices


def test_router_remembers_the_replica_that_took_the_request_not_its_first_choice():
    router, replicas = _router(), [_Replica(n) for n in "abcd"]
    prompt = "a document many questions share " * 8
    first = _Pending(prompt + "q1", "r1")
    chosen = asyncio.run(router.choose_replicas(replicas, first))[0][0]
    took = next(r for r in replicas if r is not chosen)  # the choice was full: rank 2 took it
    router.on_request_routed(first, took.replica_id, None)
    router.on_request_completed(took.replica_id, "r1")
    # The prefix's KV blocks are on `took` now: the next request with it goes there.
    assert asyncio.run(router.choose_replicas(replicas, _Pending(prompt + "q2", "r2")))[0] == [took]


def test_router_does_not_count_a_request_that_completed_before_serve_reported_it_routed():
    """Seen on a busy machine: a short request's completion arrived before on_request_routed.
    Counted then, it would stay 'in flight' forever and push that replica over the bound."""
    router, replicas = _router(), [_Replica(n) for n in "ab"]
    pending = _Pending("a quick question " * 8, "quick")
    chosen = asyncio.run(router.choose_replicas(replicas, pending))[0][0]
    router.on_request_completed(chosen.replica_id, "quick")
    router.on_request_routed(pending, chosen.replica_id, None)
    assert not router._in_flight
    # Refused on a, then taken by b: a's completion does not end b's request.
    pending = _Pending("another question " * 8, "moved")
    router.on_request_completed(replicas[0].replica_id, "moved")
    router.on_request_routed(pending, replicas[1].replica_id, None)
    assert router._in_flight == {replicas[1].replica_id: 1}
    router.on_request_completed(replicas[1].replica_id, "moved")
    assert not router._in_flight


def test_router_bounds_the_load_of_a_hot_prefix():
    router, replicas = _router(load_factor=1.25), [_Replica(n) for n in "ab"]
    prompt = "one hot prefix " * 20
    placed = []
    for i in range(6):  # six in flight at once: the bound ceil(1.25 * total * 1/2) spreads them
        pending = _Pending(prompt, f"req-{i}")
        chosen = asyncio.run(router.choose_replicas(replicas, pending))[0][0]
        router.on_request_routed(pending, chosen.replica_id, None)
        placed.append(chosen.replica_id)
    assert sorted(placed.count(r.replica_id) for r in replicas) == [2, 4]
    # Serve also reports completions of requests a full replica refused: they were never counted.
    router.on_request_completed(placed[0], "refused-request")
    assert sum(router._in_flight.values()) == 6
    for i, replica_id in enumerate(placed):
        router.on_request_completed(replica_id, f"req-{i}")
    assert not router._in_flight  # completions bring every count back to zero


# --- in-process ASGI call -----------------------------------------------------------------


def test_call_asgi_returns_the_apps_messages_and_delivers_a_disconnect():
    aborted = asyncio.Event()

    async def tokens():
        try:
            for i in range(10**6):
                yield f"data: {i}\n\n"
                await asyncio.sleep(0.01)
        finally:
            aborted.set()  # what the server's SSE generators do: abort the engine request

    async def plain(request):
        return JSONResponse({"body": (await request.body()).decode(), "path": request.url.path})

    app = Starlette(routes=[Route("/plain", plain, methods=["POST"]),
                            Route("/stream", lambda r: StreamingResponse(tokens()), methods=["POST"])])

    async def run():
        call = HTTPCall("POST", "/plain", b"", ((b"content-type", b"application/json"),), b'{"x": 1}')
        messages = [m async for batch in call_asgi(app, call, ((b"x-replica", b"r1"),)) for m in batch]
        assert messages[0]["status"] == 200 and (b"x-replica", b"r1") in messages[0]["headers"]
        assert b'"body":"{\\"x\\": 1}"' in b"".join(m.get("body", b"") for m in messages[1:])
        stream = call_asgi(app, HTTPCall("POST", "/stream", b"", (), b""))
        first = await stream.__anext__()
        if len(first) == 1:  # the start, then the first event (or both in one batch)
            first += await stream.__anext__()
        assert first[0]["type"] == "http.response.start" and first[1]["body"] == b"data: 0\n\n"
        await stream.aclose()  # the ingress cancelled: its client left
        await asyncio.wait_for(aborted.wait(), 5)

    asyncio.run(run())


def test_call_asgi_batches_a_stream_at_most_once_per_interval_after_the_first_body():
    async def tokens():
        for i in range(30):
            yield f"data: {i}\n\n"
            await asyncio.sleep(0.005)

    app = Starlette(routes=[Route("/stream", lambda r: StreamingResponse(tokens()), methods=["POST"])])

    async def run():
        loop = asyncio.get_running_loop()
        batches, times = [], []
        async for batch in call_asgi(app, HTTPCall("POST", "/stream", b"", (), b""), batch_s=0.05):
            batches.append(batch)
            times.append(loop.time())
        return batches, times

    batches, times = asyncio.run(run())
    bodies = [m["body"] for b in batches for m in b if m["type"] == "http.response.body"]
    assert b"".join(bodies) == b"".join(f"data: {i}\n\n".encode() for i in range(30))  # nothing lost or reordered
    first_body = next(i for i, b in enumerate(batches) if any(m["type"] == "http.response.body" for m in b))
    assert len(batches[first_body]) <= 2  # the first event went at once (TTFT), not after a wait
    gaps = [b - a for a, b in zip(times[first_body:], times[first_body + 1:])]
    # ~150 ms of events in a few batches, not 30 items; the last batch (the end) goes at once.
    assert all(g >= 0.045 for g in gaps[:-1]), gaps
    assert len(batches) < 10


def test_call_asgi_ends_the_call_when_the_app_ends_not_a_batching_interval_later():
    """Serve counts a request as running until its call ends: a call held open for the
    interval would show the router phantom load (and hold `max_ongoing_requests` slots)."""
    async def tokens():
        for i in range(3):
            yield f"data: {i}\n\n"
            await asyncio.sleep(0.01)

    app = Starlette(routes=[Route("/stream", lambda r: StreamingResponse(tokens()), methods=["POST"])])

    async def run():
        loop = asyncio.get_running_loop()
        start, bodies = loop.time(), []
        async for batch in call_asgi(app, HTTPCall("POST", "/stream", b"", (), b""), batch_s=1.0):
            bodies += [m["body"] for m in batch if m["type"] == "http.response.body"]
        return loop.time() - start, b"".join(bodies)

    elapsed_s, body = asyncio.run(run())
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert elapsed_s < 0.5  # the app took ~30 ms; the old code ended the call after 1-2 s


# --- metrics federation -------------------------------------------------------------------


def _exposition(requests: float, latency_s: float) -> str:
    reg = CollectorRegistry()
    Counter("tokenmill:request_success", "Finished requests.", ["model_name"], registry=reg).labels("m").inc(requests)
    Histogram("tokenmill:e2e_request_latency_seconds", "Latency.", registry=reg, buckets=[1, 10]).observe(latency_s)
    return prometheus_client.generate_latest(reg).decode()


def test_relabel_merges_every_replica_into_one_family_with_a_replica_label():
    families: dict = {}
    relabel(_exposition(3, 0.5), "r1", families)
    relabel(_exposition(5, 5.0), "r2", families)
    merged = CollectorRegistry()
    merged.register(_Families(families.values()))
    text = prometheus_client.generate_latest(merged).decode()
    assert text.count("# TYPE tokenmill:request_success_total counter") == 1
    assert text.count("# TYPE tokenmill:e2e_request_latency_seconds histogram") == 1
    parsed = {(s.name, s.labels.get("replica"), s.labels.get("le")): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    assert parsed[("tokenmill:request_success_total", "r1", None)] == 3
    assert parsed[("tokenmill:request_success_total", "r2", None)] == 5
    assert parsed[("tokenmill:e2e_request_latency_seconds_bucket", "r1", "1.0")] == 1
    assert parsed[("tokenmill:e2e_request_latency_seconds_bucket", "r2", "1.0")] == 0


def test_bench_reads_spec_decode_counters_summed_over_replicas():
    one = "\n".join([
        "# TYPE tokenmill:spec_decode_num_drafts counter",
        'tokenmill:spec_decode_num_drafts_total{model_name="m",replica="%s"} %d',
        "# TYPE tokenmill:spec_decode_num_draft_tokens counter",
        'tokenmill:spec_decode_num_draft_tokens_total{model_name="m",replica="%s"} %d',
        "# TYPE tokenmill:spec_decode_num_accepted_tokens counter",
        'tokenmill:spec_decode_num_accepted_tokens_total{model_name="m",replica="%s"} %d', ""])
    families: dict = {}
    relabel(one % ("r1", 10, "r1", 40, "r1", 20), "r1", families)
    relabel(one % ("r2", 5, "r2", 20, "r2", 4), "r2", families)
    merged = CollectorRegistry()
    merged.register(_Families(families.values()))
    counts = SpecDecodeCounts.from_prometheus(prometheus_client.generate_latest(merged).decode(), "m")
    assert (counts.num_drafts, counts.num_draft_tokens, counts.num_accepted_tokens) == (15, 60, 24)


def test_the_serve_config_file_is_valid_for_serve_and_build_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from tokenmill.ray.config import DEFAULT_MAX_ONGOING_REQUESTS

    path = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "ray", "serve.yaml")
    with open(path) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    (app,) = config.applications
    assert app.import_path == "tokenmill.ray:build_app"
    parsed = RayAppConfig.from_args(app.args)
    assert parsed.deployment_config["max_ongoing_requests"] != DEFAULT_MAX_ONGOING_REQUESTS  # the file's own
    assert parse_serve_argv(parsed.serve_argv).max_model_len == 2048
