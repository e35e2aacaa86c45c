"""The Helm chart (helm/nanochat/) rendered by the real helm binary and checked offline.

Notable:
- two value sets: the defaults, and every optional feature on (helm/nanochat/ci/all-features-values.yaml);
  each is linted, rendered, and every object validated: core kinds against Kubernetes' schemas, KubeRay
  kinds against the CRDs in k8s/crds/ (tests/k8s_validation.py), Prometheus Operator kinds against the
  subset of their schema the chart uses
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
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.k8s_validation import assert_secure_pod, pod_templates, validate_object

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "nanochat"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
VALUE_SETS = {"defaults": [], "all-features": ["-f", str(ALL_FEATURES)]}
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
def _render(helm: str, args: tuple[str, ...]) -> tuple[dict, ...]:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", "ml", *args)
    assert result.returncode == 0, result.stderr
    return tuple(obj for obj in yaml.safe_load_all(result.stdout) if obj)


def render(helm: str, *args: str) -> list[dict]:
    """The chart's objects for these helm arguments (each call gets its own copies)."""
    return copy.deepcopy(list(_render(helm, args)))


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
    result = run_helm(helm, "template", RELEASE, str(CHART), "--set", "storage.uri=")
    assert result.returncode != 0
    assert "storage.uri is required" in result.stderr


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
    # defaults: serving head + worker, the helm test pod; all features add the training RayCluster (2),
    # the RayJob (2 + its submitter), MinIO and its bucket job
    assert checked == (3 if value_set == "defaults" else 10)


def test_ray_autoscaler_sidecar_is_hardened_too(helm):
    """KubeRay injects the autoscaler container into the head pod from autoscalerOptions."""
    options = one(render(helm), "RayService")["spec"]["rayClusterConfig"]["autoscalerOptions"]
    spec = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "autoscaler", "securityContext": options["securityContext"],
                            "resources": options["resources"]}]}
    assert_secure_pod(spec)


def test_gpu_workers_request_the_gpus_ray_schedules_replicas_on(helm):
    objects = render(helm)
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
    objects = render(helm, "--set", "serving.workers.gpus=0", "--set", "serving.replicaResources.gpus=0",
                     "--set", "serving.workers.tolerations=null")
    worker = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(worker["containers"][0]["resources"])
    assert "tolerations" not in worker


# ---------------------------------------------------------------------------------------------
# wiring between objects


def ray_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    kinds = {"RayService", "RayCluster", "RayJob"}
    return [(f"{o['kind']} {where}", t) for o in objects if o["kind"] in kinds
            for where, t in pod_templates(o) if "submitterPodTemplate" not in where]


def test_serving_service_and_pdb_select_the_serving_pods(helm):
    objects = render(helm, *VALUE_SETS["all-features"])
    service = next(s for s in of_kind(objects, "Service") if s["metadata"]["name"] == f"{RELEASE}-nanochat")
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    serving = [cluster["headGroupSpec"]["template"], *[g["template"] for g in cluster["workerGroupSpecs"]]]
    selector = dict(service["spec"]["selector"])
    assert selector.pop("ray.io/serve") == "true"  # KubeRay sets it on pods whose Serve proxy is ready
    for template in serving:
        assert matches(selector, template["metadata"]["labels"])
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports[service["spec"]["ports"][0]["targetPort"]] == 8000
    for _, template in ray_templates(objects):
        if template not in serving:
            assert not matches(selector, template["metadata"]["labels"]), "training pods must not serve"

    pdb = one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    kuberay_worker_labels = {"ray.io/node-type": "worker"}
    assert matches(pdb, {**cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"], **kuberay_worker_labels})
    assert not matches(pdb, {**cluster["headGroupSpec"]["template"]["metadata"]["labels"], "ray.io/node-type": "head"})


def test_ingress_routes_to_the_serving_service(helm):
    objects = render(helm, *VALUE_SETS["all-features"])
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    for rule in one(objects, "Ingress")["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            ports = [p["name"] for p in services[backend["name"]]["spec"]["ports"]]
            assert backend["port"]["name"] in ports


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
    objects = render(helm, "--set", "s3.existingSecret=my-s3", "--set", "apiKeys.existingSecret=my-keys",
                     "--set", "apiKeys.existingSecretKey=keys")
    assert not of_kind(objects, "Secret")
    worker = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    env = env_of(worker["spec"]["containers"][0])
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "my-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert env["NANOCHAT_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "my-keys", "key": "keys"}


def test_without_credentials_pods_rely_on_workload_identity(helm):
    objects = render(helm)
    assert not of_kind(objects, "Secret")
    for where, template in ray_templates(objects):
        env = env_of(template["spec"]["containers"][0])
        assert "AWS_ACCESS_KEY_ID" not in env and "NANOCHAT_API_KEYS" not in env, where
        assert template["spec"]["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]


def test_helm_test_pod_asks_the_service_for_the_configured_model(helm):
    objects = render(helm, *VALUE_SETS["all-features"])
    pod = next(p for p in of_kind(objects, "Pod") if p["metadata"]["annotations"]["helm.sh/hook"] == "test")
    env = env_of(pod["spec"]["containers"][0])
    service = next(s for s in of_kind(objects, "Service") if s["metadata"]["name"] == f"{RELEASE}-nanochat")
    assert env["URL"]["value"] == f"http://{RELEASE}-nanochat:{service['spec']['ports'][0]['port']}/v1/models"
    assert env["MODEL"]["value"] == "nanochat"
    assert env["NANOCHAT_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-nanochat-api-keys"


def test_install_notes_say_how_to_reach_and_check_the_api(helm):
    for value_set, reach in [("defaults", f"port-forward svc/{RELEASE}-nanochat 8000:8000"),
                             ("all-features", "https://chat.example.com/v1/chat/completions")]:
        result = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", "ml", "--dry-run=client",
                          *VALUE_SETS[value_set])
        assert result.returncode == 0, result.stderr
        notes = result.stdout.split("NOTES:", 1)[1]
        assert reach in notes and f"helm test {RELEASE} -n ml" in notes, notes
        assert ("API keys are required" in notes) == (value_set == "all-features"), notes


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
    from services.storage import open_storage
    from serving.model_source import TOKENIZER_KEY

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
    engine_values = chart_values["serving"]["engine"]

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
    assert serve_cfg["num_gpus"] == app["deployments"][0]["ray_actor_options"]["num_gpus"]
    assert serve_cfg["num_cpus"] == app["deployments"][0]["ray_actor_options"]["num_cpus"]
    assert source.storage == str(storage_with_tokenizer)
    # the ingress admits more than the engines can run or queue, so that their bound answers an overload (429)
    engine_config = app["deployments"][0]
    capacity = (engine_config["max_ongoing_requests"] + max(engine_config["max_queued_requests"], 0)) \
        * engine_config["autoscaling_config"]["max_replicas"]
    assert deployments["api"].max_ongoing_requests == 2 * capacity
    if values == "defaults":
        assert (source.run, source.stage, source.step) == (chart_values["storage"]["run"], "sft", None)
    else:
        assert (source.run, source.stage) == ("ci", "sft")


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
    objects = render(helm)
    maps = {m["metadata"]["name"]: m for m in of_kind(objects, "ConfigMap")}
    assert len(maps) == len(DASHBOARDS)
    for path in DASHBOARDS:
        config_map = maps[f"{RELEASE}-nanochat-dashboard-{path.stem}"]
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        (content,) = config_map["data"].values()
        assert json.loads(content) == json.loads(path.read_text())
