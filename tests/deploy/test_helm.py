"""The Helm chart (helm/nanochat/) rendered by the real helm binary and checked offline.

Notable:
- three value sets: the least a fresh install needs (the defaults plus storage.uri), every optional feature
  on (helm/nanochat/ci/all-features-values.yaml) and CPU-only serving (ci/cpu-values.yaml); each is linted,
  rendered, and every object validated: core kinds against Kubernetes' schemas, KubeRay kinds against the
  CRDs in k8s/crds/ and the operator's own rules (tests/deploy/k8s_validation.py), Prometheus Operator kinds against
  the subset of their schema the chart uses
- what KubeRay does with the objects is checked where it decides an outcome: the name limits it enforces,
  the Service it makes from serveService, the pod labels it hashes for upgrades, the head ports it calls
  (through the rendered NetworkPolicies, evaluated as Kubernetes does)
- selectors are checked against the labels of what they should select (Service, PDB, NetworkPolicy,
  monitors), since a schema-valid selector that matches nothing fails silently in a cluster
- the generated Serve config is validated by Ray Serve's own schema, and its import path and args are fed
  through Ray Serve's own builder call into our app: the built application must carry the chart's values
- helm comes from PATH or .tools/bin (scripts/get-helm.sh installs it there); without it these tests skip
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.k8s_validation import (
    Peer,
    assert_secure_pod,
    network_policies_admit,
    pod_templates,
    validate_object,
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "nanochat"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
CPU_VALUES = CHART / "ci" / "cpu-values.yaml"
SPEEDRUN_JOB = REPO / "k8s" / "speedrun-job.yaml"
TPU_JOB = REPO / "k8s" / "tpu-base-job.yaml"
# the least a fresh install takes: the image's default is where the release workflow publishes it, the bucket
# has to be the user's own
MINIMAL = ["--set", "storage.uri=s3://nanochat"]
VALUE_SETS = {"defaults": MINIMAL, "all-features": ["-f", str(ALL_FEATURES)], "cpu": ["-f", str(CPU_VALUES)]}
RELEASE = "chat"
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}


def helm_binary() -> str | None:
    local = REPO / ".tools" / "bin" / "helm"
    return shutil.which("helm") or (str(local) if local.exists() else None)


@pytest.fixture(scope="module")
def helm() -> str:
    binary = helm_binary()
    if binary is None:
        pytest.skip("helm not found on PATH or in .tools/bin: install it with scripts/get-helm.sh")
    return binary


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)


@cache
def _render(helm: str, release: str, args: tuple[str, ...]) -> tuple[dict, ...]:
    result = run_helm(helm, "template", release, str(CHART), "--namespace", "ml", *args)
    assert result.returncode == 0, result.stderr
    return tuple(obj for obj in yaml.safe_load_all(result.stdout) if obj)


def render(helm: str, *args: str) -> list[dict]:
    """The chart's objects for these helm arguments (each call gets its own copies)."""
    return render_release(helm, RELEASE, *args)


def render_release(helm: str, release: str, *args: str) -> list[dict]:
    return copy.deepcopy(list(_render(helm, release, args)))


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def containers(template: dict) -> Iterator[dict]:
    yield from template["spec"].get("initContainers", [])
    yield from template["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def serve_config(objects: list[dict]) -> dict:
    return yaml.safe_load(one(objects, "RayService")["spec"]["serveConfigV2"])


@pytest.fixture(params=sorted(VALUE_SETS))
def value_set(request: pytest.FixtureRequest) -> str:
    return request.param


# ---------------------------------------------------------------------------------------------
# lint and schemas


def test_chart_lints_cleanly(helm, value_set):
    result = run_helm(helm, "lint", "--strict", str(CHART), *VALUE_SETS[value_set])
    assert result.returncode == 0, result.stdout + result.stderr


# The part of the Prometheus Operator's monitoring.coreos.com/v1 schema the chart uses (those CRDs are
# not in kubernetes-validate); closed, so a misspelt field fails here as it would on the API server.
_SELECTOR = {"type": "object", "additionalProperties": False, "required": ["matchLabels"],
             "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}}
_ENDPOINT = {"type": "object", "additionalProperties": False, "required": ["port"],
             "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}
_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}}


def _monitor_schema(endpoints_key: str) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"type": "string"},
                           "metadata": _METADATA,
                           "spec": {"type": "object", "additionalProperties": False,
                                    "required": ["selector", endpoints_key],
                                    "properties": {"selector": _SELECTOR,
                                                   "namespaceSelector": {"type": "object", "additionalProperties": False,
                                                                         "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}}},
                                                   endpoints_key: {"type": "array", "minItems": 1, "items": _ENDPOINT}}}}}


MONITOR_SCHEMAS = {"ServiceMonitor": _monitor_schema("endpoints"), "PodMonitor": _monitor_schema("podMetricsEndpoints")}


def test_every_rendered_object_fits_its_schema(helm, value_set):
    objects = render(helm, *VALUE_SETS[value_set])
    assert of_kind(objects, "RayService"), "serving is on in both value sets"
    for obj in objects:
        if obj["kind"] in MONITORING_KINDS:
            jsonschema.validate(obj, MONITOR_SCHEMAS[obj["kind"]])
        else:
            validate_object(obj)


def test_values_schema_rejects_unknown_keys_and_bad_values(helm):
    for bad in ["serving.engine.num_blokcs=64", "serving.replicas.min=-1", "image.pullPolicy=Sometimes",
                "storage.uri=http://not-s3", "minio.persistence.size=lots"]:
        result = run_helm(helm, "template", RELEASE, str(CHART), "--set", bad)
        assert result.returncode != 0, f"--set {bad} was accepted"
        assert "schema" in result.stderr.lower(), result.stderr


def test_storage_is_required_without_the_bundled_minio(helm):
    """No default bucket: the chart cannot know one the user owns, so an install without one stops and says so."""
    for args in [[], ["--set", "storage.uri="]]:
        result = run_helm(helm, "template", RELEASE, str(CHART), *args)
        assert result.returncode != 0
        assert "storage.uri is required" in result.stderr and "minio.enabled=true" in result.stderr, result.stderr


def test_a_fresh_install_needs_only_the_image_and_a_bucket_or_minio(helm):
    for args in [["--set", "image.repository=registry.example/nanochat", "--set", "storage.uri=s3://my-bucket/chat"],
                 ["--set", "minio.enabled=true"]]:
        result = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", "ml", "--dry-run=client", *args)
        assert result.returncode == 0, result.stderr
    # MinIO without credentials given: the chart makes them, URL-safe and as long as MinIO wants
    secret = one(render(helm, "--set", "minio.enabled=true"), "Secret")["stringData"]
    assert re.fullmatch(r"[A-Za-z0-9._~-]{3,}", secret["AWS_ACCESS_KEY_ID"])
    assert re.fullmatch(r"[A-Za-z0-9._~-]{8,}", secret["AWS_SECRET_ACCESS_KEY"])


# ---------------------------------------------------------------------------------------------
# pods


def test_every_pod_runs_hardened_with_resource_requests(helm, value_set):
    objects = render(helm, *VALUE_SETS[value_set])
    checked = 0
    for obj in objects:
        specs = [obj["spec"]] if obj["kind"] == "Pod" else [t["spec"] for _, t in pod_templates(obj)]
        for spec in specs:
            assert_secure_pod(spec)
            checked += 1
    # defaults and cpu: serving head + worker, the helm test pod; all features add the training RayCluster (2),
    # the RayJob (2; submitted over HTTP, no submitter pod), MinIO and its bucket job
    assert checked == (9 if value_set == "all-features" else 3)


def test_ray_autoscaler_sidecar_is_hardened_too(helm):
    """KubeRay injects the autoscaler container into the head pod from autoscalerOptions."""
    options = one(render(helm, *MINIMAL), "RayService")["spec"]["rayClusterConfig"]["autoscalerOptions"]
    spec = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "autoscaler", "securityContext": options["securityContext"],
                            "resources": options["resources"]}]}
    assert_secure_pod(spec)


def test_gpu_workers_request_the_gpus_ray_schedules_replicas_on(helm):
    objects = render(helm, *MINIMAL)
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    app = serve_config(objects)["applications"][0]
    replica_gpus = app["deployments"][0]["ray_actor_options"]["num_gpus"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= replica_gpus > 0
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"]
    head = cluster["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # replicas go to the workers


def test_cpu_only_serving_requests_no_gpus(helm):
    objects = render(helm, *MINIMAL, "--set", "serving.workers.gpus=0", "--set", "serving.replicaResources.gpus=0",
                     "--set", "serving.workers.tolerations=null")
    worker = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(worker["containers"][0]["resources"])
    assert "tolerations" not in worker


# ---------------------------------------------------------------------------------------------
# wiring between objects


@pytest.mark.parametrize("transport, proxy_grpc", [("grpc", "1"), ("ray", "0")])
def test_the_serve_transport_reaches_the_app_and_the_proxies_of_every_serving_pod(helm, transport, proxy_grpc):
    """serve.transport is the app's setting for its own handle; Serve's HTTP proxy reads its side from the
    environment of the pod it runs on, so every serving pod gets RAY_SERVE_PROXY_USE_GRPC to match, and a
    user's extraEnv comes after it (the last of two equal names is the one a container gets)."""
    objects = render(helm, *MINIMAL, "--set", f"serving.engine.transport={transport}")
    (app,) = serve_config(objects)["applications"]
    assert f"serve.transport={transport}" in app["args"]["set"].split(",")
    for template in serving_templates(objects):
        assert env_of(template["spec"]["containers"][0])["RAY_SERVE_PROXY_USE_GRPC"]["value"] == proxy_grpc
    overridden = render(helm, *MINIMAL, "--set", "serving.extraEnv[0].name=RAY_SERVE_PROXY_USE_GRPC",
                        "--set-string", "serving.extraEnv[0].value=0")
    for template in serving_templates(overridden):
        names = [e["name"] for e in template["spec"]["containers"][0]["env"]]
        last = max(i for i, name in enumerate(names) if name == "RAY_SERVE_PROXY_USE_GRPC")
        assert template["spec"]["containers"][0]["env"][last]["value"] == "0"


@pytest.mark.parametrize("ingress", ["proxy", "haproxy"])
def test_the_serve_ingress_reaches_the_app_and_the_environment_of_every_serving_pod(helm, ingress):
    """serve.ingress=haproxy is Ray Serve's high-throughput mode, which Serve reads from the Ray pods'
    environment (RAY_SERVE_THROUGHPUT_OPTIMIZED, RAY_SERVE_ENABLE_HA_PROXY): on every serving pod, and on
    none with Serve's own proxy."""
    objects = render(helm, *MINIMAL, "--set", f"serving.engine.ingress={ingress}")
    (app,) = serve_config(objects)["applications"]
    assert f"serve.ingress={ingress}" in app["args"]["set"].split(",")
    names = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_LOG_TO_STDERR")
    expected = dict.fromkeys(names, "1") if ingress == "haproxy" else {}
    templates = serving_templates(objects)
    assert templates
    for template in templates:
        env = env_of(template["spec"]["containers"][0])
        assert {name: env[name]["value"] for name in env if name in names} == expected


def test_the_kv_cache_is_sized_by_the_app_unless_the_values_set_a_fraction(helm):
    """By default the chart sets no kv_cache_memory_fraction, so the app sizes a GPU's cache from its free
    memory and a CPU's by num_blocks; a fraction in the values reaches the app, and one past 1 is refused."""
    def engine_settings(*args: str) -> dict[str, str]:
        (app,) = serve_config(render(helm, *MINIMAL, *args))["applications"]
        return dict(item.split("=", 1) for item in app["args"]["set"].split(","))

    default = engine_settings()
    assert "serve.kv_cache_memory_fraction" not in default and default["serve.num_blocks"] == "2048"
    assert engine_settings("--set-json", "serving.engine.kv_cache_memory_fraction=0.5")[
        "serve.kv_cache_memory_fraction"] == "0.5"
    refused = run_helm(helm, "template", RELEASE, str(CHART), *MINIMAL,
                       "--set-json", "serving.engine.kv_cache_memory_fraction=1.5")
    assert refused.returncode != 0 and "kv_cache_memory_fraction" in refused.stderr


def test_an_unknown_serve_ingress_is_refused_by_the_schema(helm):
    result = run_helm(helm, "template", RELEASE, str(CHART), *MINIMAL, "--set", "serving.engine.ingress=nginx")
    assert result.returncode != 0 and "ingress" in result.stderr


def ray_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    kinds = {"RayService", "RayCluster", "RayJob"}
    return [(f"{o['kind']} {where}", t) for o in objects if o["kind"] in kinds
            for where, t in pod_templates(o) if "submitterPodTemplate" not in where]


def serving_templates(objects: list[dict]) -> list[dict]:
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"], *[g["template"] for g in cluster["workerGroupSpecs"]]]


def container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}


def test_serving_service_follows_the_ready_cluster_only(helm):
    """The chart's serving Service is the RayService's serveService: KubeRay creates it under that name and
    selects the ray.io/serve=true pods of the cluster whose Serve app is ready (during an upgrade, the old
    cluster until the new one's app runs: ray-operator/controllers/ray/common/service.go BuildServeService,
    rayservice_controller.go reconcileServicesToReadyCluster). No Service of the chart sends API traffic to
    serving pods by label alone, which would reach a new cluster whose app is not running yet."""
    objects = render(helm, *VALUE_SETS["all-features"])
    spec = one(objects, "RayService")["spec"]
    serve_service = spec["serveService"]
    assert serve_service["metadata"]["name"] == f"{RELEASE}-nanochat"
    assert serve_service["spec"] == {"type": "ClusterIP"}  # KubeRay sets selector and ports
    head, *workers = serving_templates(objects)
    assert container_ports(head)["serve"] == 8000  # KubeRay takes the serve Service's port from here
    assert all(container_ports(w)["serve"] == 8000 for w in workers)
    for service in of_kind(objects, "Service"):
        ports = {p.get("targetPort") for p in service["spec"]["ports"]} | {p["port"] for p in service["spec"]["ports"]}
        if any(matches(service["spec"].get("selector", {}), t["metadata"]["labels"]) for t in serving_templates(objects)):
            assert not ports & {"serve", 8000}, f"Service {service['metadata']['name']} serves by label"


def test_pdb_selects_the_serving_workers(helm):
    objects = render(helm, *VALUE_SETS["all-features"])
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    pdb = one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    kuberay_worker_labels = {"ray.io/node-type": "worker"}
    assert matches(pdb, {**cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"], **kuberay_worker_labels})
    assert not matches(pdb, {**cluster["headGroupSpec"]["template"]["metadata"]["labels"], "ray.io/node-type": "head"})
    for _, template in ray_templates(objects):
        if template not in serving_templates(objects):
            assert not matches(pdb, {**template["metadata"]["labels"], **kuberay_worker_labels})


def test_upgrade_strategy_is_passed_to_kuberay(helm):
    assert one(render(helm, *MINIMAL), "RayService")["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    spec = one(render(helm, *MINIMAL, "--set", "serving.upgradeStrategy=None"), "RayService")["spec"]
    assert spec["upgradeStrategy"] == {"type": "None"}
    result = run_helm(helm, "template", RELEASE, str(CHART), *MINIMAL, "--set", "serving.upgradeStrategy=Rolling")
    assert result.returncode != 0 and "upgradeStrategy" in result.stderr


def test_a_chart_upgrade_does_not_start_a_second_cluster(helm, tmp_path):
    """KubeRay rolls out a new RayCluster (twice the GPUs with NewCluster) when the hash of rayClusterConfig
    changes, pod labels included: a new chart version with the same image and cluster values must render the
    same rayClusterConfig."""
    bumped = tmp_path / "nanochat"
    shutil.copytree(CHART, bumped)
    chart_yaml = (bumped / "Chart.yaml").read_text()
    chart_yaml = re.sub(r"(?m)^version: .*$", "version: 9.9.9", chart_yaml)
    chart_yaml = re.sub(r"(?m)^appVersion: .*$", 'appVersion: "9.9.9"', chart_yaml)
    (bumped / "Chart.yaml").write_text(chart_yaml)
    pinned = [*MINIMAL, "--set", "image.tag=0.1.0-cuda"]
    clusters = []
    for chart in (CHART, bumped):
        result = run_helm(helm, "template", RELEASE, str(chart), *pinned)
        assert result.returncode == 0, result.stderr
        objects = [o for o in yaml.safe_load_all(result.stdout) if o]
        assert one(objects, "RayService")["metadata"]["labels"]["helm.sh/chart"].startswith("nanochat-")
        clusters.append(one(objects, "RayService")["spec"]["rayClusterConfig"])
    assert clusters[0] == clusters[1]
    for _, template in ray_templates(render(helm, *VALUE_SETS["all-features"])):
        assert not {"helm.sh/chart", "app.kubernetes.io/version"} & set(template["metadata"]["labels"])


def test_ingress_routes_to_the_serving_service(helm):
    objects = render(helm, *VALUE_SETS["all-features"])
    serve_service = one(objects, "RayService")["spec"]["serveService"]["metadata"]["name"]
    head_ports = container_ports(serving_templates(objects)[0])
    for rule in one(objects, "Ingress")["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            # KubeRay names the serve Service's port after the head container's `serve` port
            assert backend == {"name": serve_service, "port": {"name": "serve"}} and "serve" in head_ports


def test_network_policies_cover_every_ray_pod_and_minio(helm):
    objects = render(helm, *VALUE_SETS["all-features"])
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "NetworkPolicy")}
    ray = policies[f"{RELEASE}-nanochat-ray"]
    for where, template in ray_templates(objects):
        assert matches(ray["podSelector"]["matchLabels"], template["metadata"]["labels"]), where
    open_ports = {p["port"] for rule in ray["ingress"] for p in rule.get("ports", [])}
    assert {8000, 8080, 8265} <= open_ports
    minio_pods = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert matches(policies[f"{RELEASE}-nanochat-minio"]["podSelector"]["matchLabels"], minio_pods)
    # the pods that need MinIO (Ray pods, the bucket job) are in the release the MinIO policy admits
    admitted = policies[f"{RELEASE}-nanochat-minio"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    bucket_job = one(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    assert all(matches(admitted, t["metadata"]["labels"]) for _, t in ray_templates(objects))
    assert matches(admitted, bucket_job)


# the KubeRay operator as its own Helm chart labels it, in a namespace of its own
OPERATOR = Peer({"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
                 "app.kubernetes.io/component": "kuberay-operator"},
                "kuberay-system", {"kubernetes.io/metadata.name": "kuberay-system"})
KUBERAY_HEAD_LABELS = {"ray.io/node-type": "head", "ray.io/is-ray-node": "yes"}


def test_the_operator_reaches_what_it_checks_on_every_head(helm):
    """With servingFrom set, the operator still reaches the heads' dashboard (8265: Serve status and config,
    RayJob submission in HTTPMode) and the serving head's Serve proxy (8000, /-/healthz: KubeRay's
    updateHeadPodServeLabel decides by it whether the head serves); other pods of other namespaces do not."""
    objects = render(helm, *VALUE_SETS["all-features"])
    policies = of_kind(objects, "NetworkPolicy")
    stranger = Peer({"app": "other"}, "elsewhere", {"kubernetes.io/metadata.name": "elsewhere"})
    ingress_nginx = Peer({"app": "ingress-nginx"}, "ingress-nginx", {"kubernetes.io/metadata.name": "ingress-nginx"})
    heads = [(w, t) for w, t in ray_templates(objects) if "headGroupSpec" in w]
    assert len(heads) == 3  # serving, the training RayCluster, the RayJob's cluster
    for where, template in heads:
        labels = {**template["metadata"]["labels"], **KUBERAY_HEAD_LABELS}
        assert network_policies_admit(policies, labels, "ml", 8265, OPERATOR), where
        assert not network_policies_admit(policies, labels, "ml", 8265, stranger), where
    serving_head = {**serving_templates(objects)[0]["metadata"]["labels"], **KUBERAY_HEAD_LABELS}
    assert network_policies_admit(policies, serving_head, "ml", 8000, OPERATOR)
    assert network_policies_admit(policies, serving_head, "ml", 8000, ingress_nginx)  # servingFrom
    assert not network_policies_admit(policies, serving_head, "ml", 8000, stranger)


def notes(helm: str, *args: str, release: str = RELEASE) -> str:
    result = run_helm(helm, "install", release, str(CHART), "--namespace", "ml", "--dry-run=client", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


def job_as_notes_apply_it(helm: str, *args: str, release: str = RELEASE) -> dict:
    """k8s/speedrun-job.yaml edited by the sed command the install notes print, as a user would pipe it."""
    (line,) = [text for text in notes(helm, *args, release=release).splitlines() if "k8s/speedrun-job.yaml |" in text]
    command, apply = line.strip().split(" | ")
    assert apply == "kubectl -n ml apply -f -"
    argv = shlex.split(command)
    assert argv[0] == "sed"
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_minio_and_the_speedrun_job_work_together_as_the_notes_say(helm):
    """The release named like the chart (Secret names that used to be "nanochat-s3", the job's own), MinIO on:
    the job edited as NOTES says reads all four S3 settings from the chart's Secret, goes to MinIO (not AWS)
    with the chart's storage and run, and MinIO's NetworkPolicy admits its pods."""
    args = ["--set", "minio.enabled=true", "--set", "storage.run=first"]
    objects = render_release(helm, "nanochat", *args)
    secrets = {s["metadata"]["name"]: s["stringData"] for s in of_kind(objects, "Secret")}
    assert "nanochat-s3" not in secrets, "the chart's Secret collides with the one the job's header creates"
    minio = next(s for s in of_kind(objects, "Service") if s["metadata"]["name"].endswith("-minio"))
    job = job_as_notes_apply_it(helm, *args, release="nanochat")
    validate_object(job)
    for where, template in pod_templates(job):
        env = env_of(template["spec"]["containers"][0])
        values = {}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            values[name] = secrets[ref["name"]][ref["key"]]  # present, even where the job marks it optional
        assert values["AWS_ENDPOINT_URL_S3"] == f"http://{minio['metadata']['name']}:9000", where
        assert values["AWS_REGION"] == "us-east-1"
        job_pod = Peer(template["metadata"]["labels"], "ml", {"kubernetes.io/metadata.name": "ml"})
        minio_pod = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert network_policies_admit(of_kind(objects, "NetworkPolicy"), minio_pod, "ml", 9000, job_pod), where
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[argv.index("--storage") + 1] == "s3://nanochat" and argv[argv.index("--run") + 1] == "first"
    # and MinIO admits nobody else
    stranger = Peer({"app.kubernetes.io/name": "nanochat"}, "ml", {"kubernetes.io/metadata.name": "ml"})
    minio_pod = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not network_policies_admit(of_kind(objects, "NetworkPolicy"), minio_pod, "ml", 9000, stranger)


def test_minio_bucket_hook_needs_no_nanochat_image(helm):
    """The bucket is made by the MinIO client image: at install the nanochat image may not be pushed yet."""
    objects = render(helm, *VALUE_SETS["all-features"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())["minio"]["client"]["image"]
    hook = one(objects, "Job")
    assert "post-install" in hook["metadata"]["annotations"]["helm.sh/hook"]
    (container,) = hook["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{values['repository']}:{values['tag']}"
    assert "nanochat/nanochat" not in container["image"]
    assert container["command"] + container["args"] == ["mc", "--config-dir", "/tmp/mc", "mb", "--ignore-existing",
                                                        "minio/nanochat"]
    env = env_of(container)
    minio = next(s for s in of_kind(objects, "Service") if s["metadata"]["name"].endswith("-minio"))
    assert env["MC_HOST_minio"]["value"] == f"http://$(MINIO_USER):$(MINIO_PASSWORD)@{minio['metadata']['name']}:9000"
    names = [e["name"] for e in container["env"]]  # Kubernetes expands $(VAR) from variables defined before
    assert names.index("MINIO_USER") < names.index("MC_HOST_minio") and names.index("MINIO_PASSWORD") < names.index("MC_HOST_minio")


def k8s_job_templates(path: Path) -> list[tuple[str, dict]]:
    return list(pod_templates(yaml.safe_load(path.read_text())))


def test_monitors_scrape_the_metrics_port_of_every_ray_pod(helm):
    objects = render(helm, *VALUE_SETS["all-features"])
    templates = ray_templates(objects)
    assert len(templates) == 6  # serving, training cluster and the RayJob's cluster: head + workers each

    pod_monitor = one(objects, "PodMonitor")["spec"]
    assert pod_monitor["namespaceSelector"]["matchNames"] == ["ml"]
    for where, template in templates:
        assert matches(pod_monitor["selector"]["matchLabels"], template["metadata"]["labels"]), where
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports[pod_monitor["podMetricsEndpoints"][0]["port"]] == 8080, where

    # the RayJobs of k8s/ run in the same namespace outside any release: their pods are scraped too
    for path in (SPEEDRUN_JOB, TPU_JOB):
        for where, template in k8s_job_templates(path):
            assert matches(pod_monitor["selector"]["matchLabels"], template["metadata"]["labels"]), f"{path.name} {where}"
            assert container_ports(template)[pod_monitor["podMetricsEndpoints"][0]["port"]] == 8080

    service_monitor = one(objects, "ServiceMonitor")["spec"]
    metrics_service = next(s for s in of_kind(objects, "Service")
                           if matches(service_monitor["selector"]["matchLabels"], s["metadata"]["labels"]))
    assert metrics_service["spec"]["clusterIP"] == "None"  # one endpoint per pod, not a load-balanced sample
    assert service_monitor["endpoints"][0]["port"] in [p["name"] for p in metrics_service["spec"]["ports"]]
    for where, template in templates:
        assert matches(metrics_service["spec"]["selector"], template["metadata"]["labels"]), where


def test_s3_settings_and_api_keys_reach_the_containers_from_secrets(helm):
    objects = render(helm, *VALUE_SETS["all-features"])
    secrets = {s["metadata"]["name"]: s["stringData"] for s in of_kind(objects, "Secret")}
    minio_service = next(s for s in of_kind(objects, "Service") if s["metadata"]["name"].endswith("-minio"))
    for where, template in ray_templates(objects):
        env = env_of(template["spec"]["containers"][0])
        assert env["AWS_ENDPOINT_URL_S3"]["value"] == f"http://{minio_service['metadata']['name']}:9000", where
        assert env["NANOCHAT_STORAGE"]["value"] == "s3://nanochat"
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert secrets[ref["name"]][ref["key"]] == {"AWS_ACCESS_KEY_ID": "nanochat-ci",
                                                        "AWS_SECRET_ACCESS_KEY": "nanochat-ci-secret"}[name], where
        if where.startswith("RayService"):
            ref = env["NANOCHAT_API_KEYS"]["valueFrom"]["secretKeyRef"]
            assert secrets[ref["name"]][ref["key"]] == "sk-nanochat-ci-1,sk-nanochat-ci-2"
        else:
            assert "NANOCHAT_API_KEYS" not in env, "training needs no API keys"


def test_existing_secrets_are_used_instead_of_created(helm):
    objects = render(helm, *MINIMAL, "--set", "s3.existingSecret=my-s3", "--set", "apiKeys.existingSecret=my-keys",
                     "--set", "apiKeys.existingSecretKey=keys")
    assert not of_kind(objects, "Secret")
    worker = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    env = env_of(worker["spec"]["containers"][0])
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "my-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert env["NANOCHAT_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "my-keys", "key": "keys"}


def test_without_credentials_pods_rely_on_workload_identity(helm):
    objects = render(helm, *MINIMAL)
    assert not of_kind(objects, "Secret")
    for where, template in ray_templates(objects):
        env = env_of(template["spec"]["containers"][0])
        assert "AWS_ACCESS_KEY_ID" not in env and "NANOCHAT_API_KEYS" not in env, where
        assert template["spec"]["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]


def test_helm_test_pod_asks_the_serving_service_for_the_configured_model(helm):
    objects = render(helm, *VALUE_SETS["all-features"])
    pod = next(p for p in of_kind(objects, "Pod") if p["metadata"]["annotations"]["helm.sh/hook"] == "test")
    env = env_of(pod["spec"]["containers"][0])
    serve_service = one(objects, "RayService")["spec"]["serveService"]["metadata"]["name"]
    assert env["URL"]["value"] == f"http://{serve_service}:8000/v1/models"
    assert env["MODEL"]["value"] == "nanochat"
    assert env["NANOCHAT_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-nanochat-api-keys"


@contextmanager
def api_server(served_tokenizer) -> Iterator[str]:
    """serving/api's real app on 127.0.0.1 over a tiny engine; served_tokenizer None: no model yet."""
    import uvicorn

    from serving.api.app import create_app
    from serving.engine.async_engine import AsyncEngine
    from serving.engine.llm_engine import LLMEngine
    from tests.system.chat_server import reply_model, reply_tokenizer

    tok = reply_tokenizer()
    engine = AsyncEngine(LLMEngine(reply_model(tok), tok, num_blocks=16, block_size=16, max_num_seqs=2,
                                   max_num_batched_tokens=256))
    app = create_app(engine, tok if served_tokenizer else None)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the API server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()


def run_test_pod(pod: dict, base_url: str, **env_overrides: str) -> subprocess.CompletedProcess:
    """The `helm test` pod's command and environment, run here against base_url instead of the Service."""
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env["URL"] = base_url + urllib.parse.urlsplit(env["URL"]).path
    assert container["command"][0] == "python"
    argv = [sys.executable, *container["command"][1:], *container["args"]]
    return subprocess.run(argv, env={**env, **env_overrides}, capture_output=True, text=True, timeout=60)


def test_helm_test_passes_on_a_fresh_install_and_once_the_model_is_served(helm):
    """Against the real API: with no checkpoint yet (a fresh install) the test passes and says so; with the
    model served it passes; a server that serves some other model fails it."""
    pod = next(p for p in of_kind(render(helm, *MINIMAL), "Pod") if p["metadata"]["annotations"]["helm.sh/hook"] == "test")
    with api_server(served_tokenizer=False) as url:
        empty = run_test_pod(pod, url)
    assert empty.returncode == 0, empty.stdout + empty.stderr
    assert "no model yet" in empty.stdout
    with api_server(served_tokenizer=True) as url:
        served = run_test_pod(pod, url)
        other = run_test_pod(pod, url, MODEL="another-model")
    assert served.returncode == 0 and "['nanochat']" in served.stdout, served.stdout + served.stderr
    assert other.returncode == 1


def test_install_notes_say_how_to_reach_and_check_the_api(helm):
    for value_set, reach in [("defaults", f"port-forward svc/{RELEASE}-nanochat 8000:8000"),
                             ("all-features", "https://chat.example.com/v1/chat/completions")]:
        text = notes(helm, *VALUE_SETS[value_set])
        assert reach in text and f"helm test {RELEASE} -n ml" in text, text
        assert ("API keys are required" in text) == (value_set == "all-features"), text


def test_requirements_are_stated_where_users_look(helm):
    """authOptions (token authentication) needs KubeRay 1.5.1, not 1.5; the cuda image needs a driver >= 580."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert "KubeRay operator >= 1.5.1" in chart["annotations"]["nanochat.io/requires"]
    assert "driver >= 580" in chart["annotations"]["nanochat.io/requires"]
    values_text = (CHART / "values.yaml").read_text()
    assert "KubeRay operator >= 1.5.1" in values_text and "driver >= 580" in values_text
    gpu_notes = notes(helm, *MINIMAL)
    assert "KubeRay operator >= 1.5.1" in gpu_notes and "NVIDIA driver >= 580" in gpu_notes
    assert "NVIDIA driver" not in notes(helm, *VALUE_SETS["cpu"])  # nothing there needs a GPU
    for path in (SPEEDRUN_JOB, TPU_JOB):
        assert "KubeRay operator >= 1.5.1" in path.read_text()
    assert "driver >= 580" in SPEEDRUN_JOB.read_text()


def test_notes_say_where_each_runs_report_is(helm):
    text = notes(helm, *MINIMAL, "--set", "storage.run=first")
    assert "aws s3 cp s3://nanochat/runs/first/report.md ." in text
    assert "nanochat --storage s3://nanochat --run first report" in text


def test_training_job_runs_the_speedrun_on_the_chart_storage(helm):
    objects = render(helm, *VALUE_SETS["all-features"])
    job = one(objects, "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    args = job["entrypoint"].split()
    assert args[0] == "nanochat" and args[-1] == "speedrun"
    assert args[args.index("--storage") + 1] == "s3://nanochat"
    workers = job["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = workers["replicas"] * workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert f"train.workers={gpus}" in args  # one Ray Train worker per GPU
    assert "train.max_steps=100" in args


def test_training_job_is_submitted_over_http(helm):
    """HTTPMode: the operator submits the job to the head's dashboard and polls it; there is no submitter pod
    whose dropped `ray job logs --follow` would mark a long run Failed and delete a cluster still training."""
    job = one(render(helm, *VALUE_SETS["all-features"]), "RayJob")["spec"]
    assert job["submissionMode"] == "HTTPMode"
    assert "submitterPodTemplate" not in job and "submitterConfig" not in job
    assert job["activeDeadlineSeconds"] == 86400  # what bounds a run whose dashboard stops answering


# ---------------------------------------------------------------------------------------------
# names within KubeRay's limits


LONG_RELEASES = ["a-long-release-name-for-the-teams-chat-assistant-prod", "a-long-release-name-for-the-teams-chat-assistant-test"]


def test_long_release_names_give_names_kuberay_accepts(helm):
    """Helm allows 53-character release names; KubeRay refuses RayJob and RayService names over 47 and
    RayCluster names over 53 (MaxRayJobNameLength and friends in ray-operator/controllers/ray/utils/constant.go:
    the cluster a RayJob or RayService creates is its name plus "-" and 5 random characters, and that cluster's
    "-serve-svc" Service must fit 63). validate_object applies those limits."""
    kinds = {}
    for release in LONG_RELEASES:
        assert len(release) == 53
        objects = render_release(helm, release, *VALUE_SETS["all-features"])
        for obj in objects:
            if obj["kind"] not in MONITORING_KINDS:
                validate_object(obj)
            name = obj["metadata"]["name"]
            assert len(name) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
        rayjob = one(objects, "RayJob")["metadata"]["name"]
        assert len(rayjob) + len("-xxxxx") + len("-head-svc") <= 63
        kinds[release] = {o["kind"]: o["metadata"]["name"] for o in objects if o["kind"].startswith("Ray")}
    # the two releases differ only past the cut: the hash keeps their objects apart
    assert all(kinds[LONG_RELEASES[0]][k] != kinds[LONG_RELEASES[1]][k] for k in kinds[LONG_RELEASES[0]])
    short = render(helm, *MINIMAL)
    assert one(short, "RayService")["metadata"]["name"] == f"{RELEASE}-nanochat"  # short names stay as they were


def test_a_name_kuberay_cannot_take_fails_clearly(helm):
    result = run_helm(helm, "template", "1chat", str(CHART), *MINIMAL)
    assert result.returncode != 0 and "must start with a letter" in result.stderr and "fullnameOverride" in result.stderr


# ---------------------------------------------------------------------------------------------
# CPU-only serving (ci/cpu-values.yaml)


def test_cpu_values_render_a_cpu_only_rayservice(helm):
    objects = render(helm, *VALUE_SETS["cpu"])
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert {o["kind"] for o in objects} >= {"RayService", "Secret", "Pod"} and not of_kind(objects, "RayJob")
    service = one(objects, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    assert cluster["workerGroupSpecs"][0]["rayStartParams"] == {}
    assert "nvidia" not in json.dumps(objects)
    (app,) = serve_config(objects)["applications"]
    assert app["deployments"][0]["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0}
    for template in serving_templates(objects):
        spec = template["spec"]
        (container,) = spec["containers"]
        assert container["image"] == f"ghcr.io/nanochat/nanochat:{chart['appVersion']}"  # the cpu tag
        assert "command" not in container and "args" not in container  # KubeRay's `ray start`, nothing else
        assert spec["securityContext"]["runAsUser"] == 1000 and container["securityContext"]["readOnlyRootFilesystem"]
        assert all(set(v) == {"name", "emptyDir"} for v in spec["volumes"])
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp", "/data", "/dev/shm"}
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits and int(limits["cpu"]) <= 2
        assert "tolerations" not in spec and "nodeSelector" not in spec
    env = env_of(serving_templates(objects)[1]["spec"]["containers"][0])
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://s3:9000" and env["NANOCHAT_STORAGE"]["value"] == "s3://nanochat"


def test_cpu_values_take_the_bundled_minio_or_another_endpoint(helm):
    minio = render(helm, *VALUE_SETS["cpu"], "--set", "minio.enabled=true", "--set", "storage.uri=",
                   "--set", "s3.endpoint=")
    worker = serving_templates(minio)[1]["spec"]["containers"][0]
    assert env_of(worker)["AWS_ENDPOINT_URL_S3"]["value"] == f"http://{RELEASE}-nanochat-minio:9000"
    other = render(helm, *VALUE_SETS["cpu"], "--set", "s3.endpoint=http://10.0.0.5:5000", "--set",
                   "storage.uri=s3://replay", "--set", "serving.reloadIntervalSeconds=2")
    worker = serving_templates(other)[1]["spec"]["containers"][0]
    assert env_of(worker)["AWS_ENDPOINT_URL_S3"]["value"] == "http://10.0.0.5:5000"
    assert one(other, "Secret")["stringData"]["AWS_ENDPOINT_URL_S3"] == "http://10.0.0.5:5000"
    assert "serve.reload_interval_s=2" in serve_config(other)["applications"][0]["args"]["set"].split(",")


# ---------------------------------------------------------------------------------------------
# the Serve config


def test_serve_config_is_valid_for_ray_serve(helm, value_set):
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(render(helm, *VALUE_SETS[value_set]))
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.route_prefix == "/"


class RecordingArgs(dict):
    """The builder's args, remembering which keys the builder looked at."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def bound_deployments(app) -> Iterator:
    """Every deployment in a built Serve application graph (the ingress first)."""
    from ray.serve.deployment import Application

    deployment = app._bound_deployment
    yield deployment
    for arg in [*deployment.init_args, *deployment.init_kwargs.values()]:
        if isinstance(arg, Application):
            yield from bound_deployments(arg)


@pytest.fixture(scope="module")
def storage_with_tokenizer(tmp_path_factory) -> Path:
    """A local storage root with a real tokenizer: what the app builder reads before any replica starts."""
    from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
    from services.layout import TOKENIZER_KEY
    from services.storage import open_storage

    root = tmp_path_factory.mktemp("storage")
    tokenizer = Tokenizer.train_from_iterator(["hello"], 256 + len(SPECIAL_TOKENS))
    open_storage(str(root)).write_text(TOKENIZER_KEY, tokenizer.to_json())
    return root


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_serve_import_path_builds_our_app_from_the_chart_args(helm, values, storage_with_tokenizer):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    objects = render(helm, *VALUE_SETS[values])
    (app,) = serve_config(objects)["applications"]
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    value_file = yaml.safe_load(Path(VALUE_SETS[values][1]).read_text()) if VALUE_SETS[values][0] == "-f" else {}
    engine_values = {**chart_values["serving"]["engine"], **value_file.get("serving", {}).get("engine", {})}
    reload_s = value_file.get("serving", {}).get("reloadIntervalSeconds", chart_values["serving"]["reloadIntervalSeconds"])

    # the args as rendered, with the bucket swapped for a local storage root holding a tokenizer
    args = RecordingArgs({k: v.replace("s3://nanochat", str(storage_with_tokenizer)) if isinstance(v, str) else v
                          for k, v in app["args"].items()})
    builder = import_attr(app["import_path"])  # what Ray Serve does with import_path
    built = call_user_app_builder_with_args_if_necessary(builder, args)

    assert set(app["args"]) <= args.read, f"app_builder ignores args {set(app['args']) - args.read}"
    deployments = {d.name: d for d in bound_deployments(built)}
    assert {d["name"] for d in app["deployments"]} <= set(deployments), "the config names a deployment the app lacks"
    engine = deployments["engine"]
    source, serve_cfg = engine.init_args
    assert {k: serve_cfg[k] for k in engine_values} == engine_values
    assert serve_cfg["reload_interval_s"] == reload_s
    assert serve_cfg["num_gpus"] == app["deployments"][0]["ray_actor_options"]["num_gpus"]
    assert serve_cfg["num_cpus"] == app["deployments"][0]["ray_actor_options"]["num_cpus"]
    assert source.storage == str(storage_with_tokenizer)
    # the ingress admits more than the engines can run or queue, so that their bound answers an overload (429),
    # and Serve's proxy bounds no queue in front of it (whose overflow would get a plain-text 503)
    engine_config = app["deployments"][0]
    capacity = (engine_config["max_ongoing_requests"] + max(engine_config["max_queued_requests"], 0)) \
        * engine_config["autoscaling_config"]["max_replicas"]
    api = deployments["api"]._deployment_config
    assert api.max_ongoing_requests > 2 * capacity and api.max_queued_requests == -1
    if values == "all-features":
        assert (source.run, source.stage) == ("ci", "sft")
    else:
        assert (source.run, source.stage, source.step) == (chart_values["storage"]["run"], "sft", None)


# ---------------------------------------------------------------------------------------------
# dashboards


DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))


def panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def test_dashboards_are_grafana_json_with_a_query_in_every_panel():
    assert [p.stem for p in DASHBOARDS] == ["serving", "training"]
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        assert "datasource" in variables
        ids = [p["id"] for p in panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        graphs = [p for p in panels(dashboard) if p["type"] != "row"]
        assert graphs, path.name
        for panel in graphs:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{path.name}: {panel['title']} overflows the grid"
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], f"{path.name}: {panel['title']} has no query"
            for target in panel["targets"]:
                assert target["expr"].strip(), f"{path.name}: {panel['title']} has an empty query"


def test_dashboards_show_what_the_issue_asks_for():
    titles = {path.stem: " | ".join(p["title"].lower() for p in panels(json.loads(path.read_text())))
              for path in DASHBOARDS}
    for word in ["request rate", "error", "time to first token", "inter-token", "end-to-end", "waiting",
                 "kv cache", "tokens per second", "replicas"]:
        assert word in titles["serving"], word
    for word in ["loss", "tokens per second", "mfu", "step time", "checkpoint time"]:
        assert word in titles["training"], word


def test_training_dashboard_queries_metrics_the_trainer_exports():
    """The trainer's gauges as Ray's metrics agent exports them: `ray_` prefix, ':' replaced by '_'."""
    from services.telemetry import TRAIN_METRICS

    exported = {"ray_" + name.replace(":", "_") for name, _ in TRAIN_METRICS.values()}
    queried = set()
    for panel in panels(json.loads((CHART / "dashboards" / "training.json").read_text())):
        for target in panel.get("targets", []):
            names = set(re.findall(r"\bray_nanochat_[a-z_]+", target["expr"]))
            assert names and names <= exported, f"{panel['title']}: {names - exported} is not exported"
            queried |= names
    wanted = ["loss", "tokens_per_second", "mfu", "step_seconds", "checkpoint_seconds"]
    assert {f"ray_nanochat_train_{name}" for name in wanted} <= queried


def test_dashboards_ship_as_configmaps_labelled_for_grafana(helm):
    objects = render(helm, *MINIMAL)
    maps = {m["metadata"]["name"]: m for m in of_kind(objects, "ConfigMap")}
    assert len(maps) == len(DASHBOARDS)
    for path in DASHBOARDS:
        config_map = maps[f"{RELEASE}-nanochat-dashboard-{path.stem}"]
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        (content,) = config_map["data"].values()
        assert json.loads(content) == json.loads(path.read_text())
