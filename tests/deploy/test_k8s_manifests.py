"""
k8s/speedrun-job.yaml, checked offline as far as a machine without a cluster allows.

Notable:
- schemas: the RayJob against the KubeRay CRD the repo ships (k8s/crds/, strict: unknown fields fail), each of
  its pod templates against Kubernetes' own PodTemplateSpec schema, and the operator's extra rules.
- policy: every container non-root, read-only root filesystem, all capabilities dropped, with requests.
- meaning: the entrypoint parses with the real `nanochat` parser and its preset loads; the GPU worker group
  holds the GPUs and CPUs that preset's training asks Ray for; credentials come only from the Secret.
- the validators themselves are shown to reject broken copies of the job, so a pass means something.
"""

import copy
import filecmp
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from cli.main import build_parser, config_from_args
from tests.deploy.k8s_validation import (
    CRD_DIR,
    KUBERAY_CRDS,
    assert_secure_pod,
    pod_specs,
    pod_templates,
    validate_crd_object,
    validate_kuberay_rules,
    validate_object,
    validate_pod_template,
)

REPO = Path(__file__).resolve().parents[2]
JOB_PATH = REPO / "k8s" / "speedrun-job.yaml"
SHARED_CRDS = REPO.parent / "shared" / "kuberay-crds"


@pytest.fixture(scope="module")
def job() -> dict:
    docs = [d for d in yaml.safe_load_all(JOB_PATH.read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def _containers(job: dict) -> list[tuple[str, dict]]:
    return [(where, c) for where, t in pod_templates(job) for c in t["spec"]["containers"]]


def _quantity(value: str | int) -> float:
    """Kubernetes CPU/count quantities as numbers: "500m" -> 0.5, "8" -> 8."""
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


# ---------------------------------------------------------------------------------------------
# Schemas and operator rules


def test_speedrun_job_fits_the_kuberay_rayjob_crd(job: dict) -> None:
    validate_crd_object(job, KUBERAY_CRDS["RayJob"])


def test_speedrun_job_follows_the_kuberay_operators_rules(job: dict) -> None:
    validate_kuberay_rules(job)


def test_every_pod_template_fits_the_kubernetes_schema(job: dict) -> None:
    templates = dict(pod_templates(job))
    assert set(templates) == {
        "spec.rayClusterSpec.headGroupSpec.template",
        "spec.rayClusterSpec.workerGroupSpecs[0].template",
    }
    for where, template in templates.items():
        validate_pod_template(template, where=where)


def test_shipped_crds_are_kuberays_own(job: dict) -> None:
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"no {SHARED_CRDS} to compare with")
    for crd in KUBERAY_CRDS.values():
        assert crd.parent == CRD_DIR
        assert filecmp.cmp(crd, SHARED_CRDS / crd.name, shallow=False), f"{crd.name} differs from KubeRay's"


# ---------------------------------------------------------------------------------------------
# Pod policy


def test_no_container_runs_as_root_and_every_one_requests_resources(job: dict) -> None:
    specs = list(pod_specs(job))
    assert len(specs) == 2  # head, GPU workers (submitted over HTTP: no submitter pod)
    for spec in specs:
        assert_secure_pod(spec)
        assert spec["automountServiceAccountToken"] is False  # Ray pods never call the Kubernetes API


def test_writable_paths_are_volumes(job: dict) -> None:
    # the image's HOME (/data) and /tmp (Ray's session dir) must be mounted: the root filesystem is read-only
    home = re.search(r"HOME=(\S+)", (REPO / "docker" / "Dockerfile.gpu").read_text())[1]
    for where, template in pod_templates(job):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for container in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            for path in (home, "/tmp"):
                assert path in mounts, f"{where}: {container['name']} does not mount {path}"
                assert "emptyDir" in volumes[mounts[path]], f"{where}: {path} is not an emptyDir"


def test_ray_pods_use_memory_backed_shared_memory(job: dict) -> None:
    for _, template in pod_templates(job):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (ray_container,) = template["spec"]["containers"]
        shm = next(m["name"] for m in ray_container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        assert volumes[shm]["emptyDir"]["medium"] == "Memory"


# ---------------------------------------------------------------------------------------------
# What the job runs


def test_entrypoint_is_a_nanochat_speedrun_whose_preset_loads(job: dict) -> None:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "nanochat"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "speedrun"
    assert args.preset == "d20"
    assert args.storage.startswith("s3://")
    cfg = config_from_args(args)  # the real preset file, with every override the entrypoint adds
    assert cfg.model.depth == 20


def test_gpu_workers_hold_what_the_presets_training_asks_for(job: dict) -> None:
    spec = job["spec"]
    cfg = config_from_args(build_parser().parse_args(shlex.split(spec["entrypoint"])[1:]))
    gpus = cpus = 0.0
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        # an extended resource must be requested exactly as limited; KubeRay counts Ray's GPUs from the limit
        assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu")
        gpus += group["replicas"] * _quantity(limits.get("nvidia.com/gpu", 0))
        cpus += group["replicas"] * _quantity(limits["cpu"])
        tolerated = {t["key"] for t in group["template"]["spec"].get("tolerations", [])}
        assert "nvidia.com/gpu" in tolerated
    assert gpus == cfg.train.workers * cfg.train.gpus_per_worker
    # Ray Train asks 1 CPU per worker (trainer/pipeline/jobs.py); the head offers none (num-cpus 0)
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cpus >= cfg.train.workers


def test_the_driver_runs_on_the_head_so_a_lost_worker_pod_does_not_end_the_job(job: dict) -> None:
    """A Ray job that asks for no entrypoint resources gets its driver on the head node (Ray's job manager
    pins it there; RAY_JOB_ALLOW_DRIVER_ON_WORKER_NODES would lift that). Any CPUs, GPUs or custom resources
    asked for could place it on a GPU worker, whose loss would end it with the job. The head holds the
    driver's work in its own limits. tests/deploy/test_cluster_replay.py kills a worker mid-training to show the
    job going on."""
    spec = job["spec"]
    assert not {"entrypointNumCpus", "entrypointNumGpus", "entrypointResources"} & set(spec)
    head = spec["rayClusterSpec"]["headGroupSpec"]
    env = {e["name"]: e.get("value") for e in head["template"]["spec"]["containers"][0].get("env", [])}
    assert env.get("RAY_JOB_ALLOW_DRIVER_ON_WORKER_NODES") in (None, "0")
    limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert _quantity(limits["cpu"]) >= 4 and limits["memory"].endswith("Gi") and int(limits["memory"][:-2]) >= 16


def test_job_cleans_up_after_itself_and_retries(job: dict) -> None:
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert spec["backoffLimit"] >= 1  # a retry resumes from the stages and checkpoints already in storage


def test_a_dropped_log_stream_cannot_fail_a_long_run(job: dict) -> None:
    """HTTPMode (KubeRay >= 1.1; with token authentication >= 1.5.1): the operator submits the entrypoint to the
    head's dashboard and polls the job's status. In K8sJobMode a submitter pod runs `ray job submit` and then
    follows the logs, and when that stream drops on a run of hours the submitter Job fails, the RayJob is
    marked Failed and its cluster deleted while training goes on. In HTTPMode failed polls do not fail the
    RayJob (rayjob_controller.go); activeDeadlineSeconds bounds a run whose dashboard stops answering."""
    spec = job["spec"]
    assert spec["submissionMode"] == "HTTPMode"
    assert "submitterPodTemplate" not in spec and "submitterConfig" not in spec  # unused without a submitter
    assert 24 * 3600 <= spec["activeDeadlineSeconds"] <= 7 * 24 * 3600
    assert "kubectl logs -f job/" not in JOB_PATH.read_text()  # there is no such Job to follow
    assert "ray job logs --follow" in JOB_PATH.read_text()


def test_pods_carry_the_labels_the_chart_admits_and_scrapes(job: dict) -> None:
    """The chart's MinIO NetworkPolicy admits pods labelled nanochat.io/storage-client, and its PodMonitor
    scrapes the `metrics` port of pods labelled app.kubernetes.io/name: nanochat and nanochat.io/ray
    (tests/deploy/test_helm.py checks the chart's side of both)."""
    for where, template in pod_templates(job):
        labels = template["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "nanochat", where
        assert labels["nanochat.io/ray"] == "true" and labels["nanochat.io/storage-client"] == "true", where
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 8080, where  # Ray's metrics export port, KubeRay's default


def test_ray_version_matches_the_pinned_ray(job: dict) -> None:
    pinned = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (REPO / "pyproject.toml").read_text())[1]
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pinned


def test_s3_credentials_come_only_from_the_secret(job: dict) -> None:
    for where, container in _containers(job):
        env = {e["name"]: e for e in container["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("nanochat-s3", name), f"{where}: {name}"
        assert not any("value" in e for e in env.values()), f"{where}: literal env values"


# ---------------------------------------------------------------------------------------------
# The validators reject what they should (each breaks one copy of the job)


def _head(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def _worker_group(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


BREAKAGES: dict[str, tuple[Callable[[dict], None], str]] = {
    "unknown RayJob field": (lambda j: j["spec"].update(shutdownAfterJobFinish=True), "'shutdownAfterJobFinish' was unexpected"),
    "wrong type in the CRD": (lambda j: j["spec"].update(backoffLimit="2"), "backoffLimit: '2' is not of type 'integer'"),
    "unknown container field": (lambda j: _head(j)["containers"][0].update(imagePullPolicyy="Always"), "'imagePullPolicyy' was unexpected"),
    "bad restart policy": (lambda j: j["spec"].update(submitterPodTemplate={"spec": {"restartPolicy": "Always", "containers": [{"name": "s", "image": "i"}]}}), "restartPolicy must be Never or OnFailure"),
    "replicas above max": (lambda j: _worker_group(j).update(replicas=3), "replicas 3 outside minReplicas..maxReplicas 1..1"),
    "name too long": (lambda j: j["metadata"].update(name="n" * 48), "DNS-1035 label of at most 47"),
    "ttl without shutdown": (lambda j: j["spec"].update(shutdownAfterJobFinishes=False), "needs shutdownAfterJobFinishes"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_validation_rejects_a_broken_job(breakage: str, job: dict) -> None:
    broken = copy.deepcopy(job)
    mutate, message = BREAKAGES[breakage]
    mutate(broken)
    with pytest.raises(AssertionError, match=re.escape(message)):
        validate_object(broken)


POLICY_BREAKAGES: dict[str, tuple[Callable[[dict], None], str]] = {
    "root user": (lambda s: s["securityContext"].update(runAsUser=0), "runs as uid or gid 0"),
    "root allowed": (lambda s: s["securityContext"].pop("runAsNonRoot"), "runAsNonRoot is not true"),
    "writable root fs": (lambda s: s["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem"),
    "capabilities kept": (lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "lacks ALL"),
    "no memory request": (lambda s: s["containers"][0]["resources"]["requests"].pop("memory"), "no memory request"),
    "no seccomp": (lambda s: s["securityContext"].pop("seccompProfile"), "seccompProfile is None"),
}


@pytest.mark.parametrize("breakage", sorted(POLICY_BREAKAGES))
def test_pod_policy_rejects_an_insecure_pod(breakage: str, job: dict) -> None:
    spec = copy.deepcopy(_head(job))
    mutate, message = POLICY_BREAKAGES[breakage]
    mutate(spec)
    with pytest.raises(AssertionError, match=re.escape(message)):
        assert_secure_pod(spec)


def test_pod_specs_finds_pods_in_every_workload_kind() -> None:
    pod = {"containers": [{"name": "c", "image": "i"}]}
    template = {"spec": pod}
    cluster = {"headGroupSpec": {"template": template}, "workerGroupSpecs": [{"template": template}] * 2}
    objects = {
        "Pod": ({"kind": "Pod", "spec": pod}, 1),
        "Deployment": ({"kind": "Deployment", "spec": {"template": template}}, 1),
        "Job": ({"kind": "Job", "spec": {"template": template}}, 1),
        "CronJob": ({"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": template}}}}, 1),
        "RayCluster": ({"kind": "RayCluster", "spec": cluster}, 3),
        "RayService": ({"kind": "RayService", "spec": {"rayClusterConfig": cluster}}, 3),
        "RayJob": ({"kind": "RayJob", "spec": {"rayClusterSpec": cluster, "submitterPodTemplate": template}}, 4),
        "Service": ({"kind": "Service", "spec": {}}, 0),
    }
    for kind, (obj, count) in objects.items():
        assert list(pod_specs(obj)) == [pod] * count, kind
