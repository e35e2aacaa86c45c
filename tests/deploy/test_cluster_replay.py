"""
The cluster path replayed in containers: the chart's RayService (CPU values) and k8s/speedrun-job.yaml, each
Ray pod run from the CPU image as KubeRay would run it (tests/deploy/kuberay.py), on one Docker network with an S3
server beside them. There is no Kubernetes API server here; everything the pods do is real.

One story, in order (each step needs the one before, so they share a module-scoped cluster):
1. serving starts on an empty bucket: the RayService's serveConfigV2 is deployed through the head's Serve
   REST API as KubeRay deploys it; KubeRay's probes pass; `/health` is 200, `/v1/models` lists nothing and a
   completion gets a 503 saying how to train a model
2. the speedrun RayJob's entrypoint (tiny preset, a few steps) is submitted to its own cluster as KubeRay's
   HTTP mode submits it; the worker container is killed during base training and a new one started in its
   place, as KubeRay replaces a lost pod; the job still succeeds and its artifacts and report land in the bucket
3. the serving cluster picks up the SFT checkpoint the job wrote, without a restart; the chart's `helm test`
   pod command passes in a container; the official `openai` client chats through the head's Serve port

Notable:
- the S3 server is moto on the Docker network's gateway address, reachable from the containers and from here
- token authentication is on, as the chart and the job set it: every Ray process and REST call carries the
  cluster's token
- the containers are removed and the network deleted at the end, also when a step fails
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.network import free_port
from tests.deploy import kuberay
from tests.support.processes import stop_process, wait_until_answers

pytestmark = [pytest.mark.slow, pytest.mark.docker]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "nanochat"
JOB = REPO / "k8s" / "speedrun-job.yaml"
RUN = "replay"
TINY = [  # tests/system/test_speedrun.py's shrunken tiny preset: what is tested is the path, not the model
    "model.depth=2", "model.head_dim=32", "tokenizer.vocab_size=512", "tokenizer.max_chars=400000",
    "train.seq_len=64", "train.device_batch_size=4", "train.total_batch_size=256", "train.max_steps=40",
    "train.checkpoint_every=5", "train.eval_every=-1", "train.eval_tokens=1024", "eval.loss_tokens=2048",
    "train.workers=1", "data.docs_per_shard=200", "mid.max_steps=4", "sft.max_steps=4",
    "mid.device_batch_size=2", "mid.tokens_per_step=128", "sft.device_batch_size=2", "sft.tokens_per_step=128",
    "chat_eval.max_problems=4", "chat_eval.max_new_tokens=8", "log.tensorboard=false",
]


@dataclass
class Replay:
    image: str
    network: str
    s3_endpoint: str  # as the containers (and this process) reach it
    bucket: str
    token: str
    containers: list[str] = field(default_factory=list)

    def start(self, pod: kuberay.Pod, publish: dict[int, int] | None = None) -> kuberay.Pod:
        kuberay.docker(*pod.run_args(self.network, publish))
        self.containers.append(pod.name)
        return pod

    def wait_ready(self, pod: kuberay.Pod, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if kuberay.is_ready(pod):
                return
            state = kuberay.docker("inspect", "-f", "{{.State.Running}}", pod.name).stdout
            assert state.strip() == "true", f"{pod.name} exited:\n{kuberay.logs(pod.name)}"
            time.sleep(1)
        raise AssertionError(f"{pod.name} not ready within {timeout_s} s:\n{kuberay.logs(pod.name)}")

    def s3_keys(self, prefix: str) -> list[str]:
        client = _s3(self.s3_endpoint)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _http(url: str, token: str, method: str = "GET", body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw.strip() else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def _secrets(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    out = {}
    for obj in objects:
        if obj.get("kind") == "Secret":
            values = dict(obj.get("stringData") or {})
            values.update({k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()})
            out[obj["metadata"]["name"]] = values
    return out


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def replay(cpu_image: str) -> Iterator[Replay]:
    network = f"nanochat-replay-{uuid.uuid4().hex[:8]}"
    kuberay.docker("network", "create", network)
    gateway = kuberay.docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", network).stdout.strip()
    port = free_port()
    log = Path(f"/tmp/{network}-moto.log")
    with open(log, "wb") as out:
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", gateway, "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    state = Replay(cpu_image, network, f"http://{gateway}:{port}", f"nanochat-{uuid.uuid4().hex[:8]}",
                   secrets.token_hex(32))
    try:
        wait_until_answers(f"{state.s3_endpoint}/moto-api/", moto, log, "moto server")
        _s3(state.s3_endpoint).create_bucket(Bucket=state.bucket)
        yield state
    finally:
        for name in state.containers:
            kuberay.docker("rm", "-f", name, check=False)
        kuberay.docker("network", "rm", network, check=False)
        stop_process(moto, timeout=10)


def _helm() -> str:
    from tests.deploy.test_helm import helm_binary

    found = helm_binary()
    if not found:
        pytest.skip("helm is not installed (scripts/setup-test-tools.sh installs it)")
    return found


@pytest.fixture(scope="module")
def chart(replay: Replay) -> list[dict[str, Any]]:
    """The chart rendered with its CPU values for this bucket, as `helm install` would send it."""
    repository, tag = replay.image.rsplit(":", 1)
    settings = {
        "image.repository": repository, "image.tag": tag, "image.pullPolicy": "Never",
        "storage.uri": f"s3://{replay.bucket}", "storage.run": RUN, "s3.endpoint": replay.s3_endpoint,
        "s3.accessKeyId": "testing", "s3.secretAccessKey": "testing", "serving.reloadIntervalSeconds": "2",
    }
    args = [_helm(), "template", "nanochat", str(CHART), "-f", str(CHART / "ci" / "cpu-values.yaml")]
    args += [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _one(objects: list[dict[str, Any]], kind: str, **where: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind
             and all(o["metadata"].get("annotations", {}).get(k) == v for k, v in where.items())]
    assert len(found) == 1, f"expected one {kind} {where}, found {len(found)}"
    return found[0]


@dataclass
class ServingCluster:
    head: kuberay.Pod
    worker: kuberay.Pod
    dashboard: str  # http://127.0.0.1:PORT on this machine
    api: str  # the head's Serve port, http://127.0.0.1:PORT
    service: str  # the host name the chart's own clients (helm test, Ingress) use


@pytest.fixture(scope="module")
def serving(replay: Replay, chart: list[dict[str, Any]]) -> ServingCluster:
    """The RayService's cluster up, its serveConfigV2 deployed and RUNNING, as KubeRay brings it up."""
    service = _one(chart, "RayService")
    cluster = f"{service['metadata']['name']}-{uuid.uuid4().hex[:5]}"  # KubeRay: <rayservice>-<random>
    spec = service["spec"]["rayClusterConfig"]
    common = dict(image=replay.image, secrets=_secrets(chart), auth_token=replay.token, rayservice=True, max_cpus=1)
    head = kuberay.build_pod(cluster, spec["headGroupSpec"], "head", **common)
    # the chart's own clients reach serving through a Service: here, a network alias of the head
    test_pod = _one(chart, "Pod", **{"helm.sh/hook": "test"})
    test_env = {e["name"]: e.get("value", "") for e in test_pod["spec"]["containers"][0].get("env", [])}
    service_host = urllib.parse.urlsplit(test_env["URL"]).hostname
    head.aliases.append(service_host)
    dashboard_port, api_port = free_port(), free_port()
    replay.start(head, publish={dashboard_port: kuberay.DASHBOARD_PORT, api_port: kuberay.SERVE_PORT})
    replay.wait_ready(head, timeout_s=120)
    worker = kuberay.build_pod(cluster, spec["workerGroupSpecs"][0], "worker", **common)
    replay.start(worker)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    status, body = _http(f"{dashboard}/api/serve/applications/", replay.token, "PUT", config)
    assert status == 200, body
    _wait_app_running(dashboard, replay.token, timeout_s=240, head=head)
    replay.wait_ready(worker, timeout_s=120)  # a serving worker is ready once its Serve proxy answers
    return ServingCluster(head, worker, dashboard, f"http://127.0.0.1:{api_port}", service_host)


def _wait_app_running(dashboard: str, token: str, timeout_s: float, head: kuberay.Pod) -> None:
    """KubeRay's check of a RayService: every application in the Serve REST API's status is RUNNING."""
    deadline, body = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        status, body = _http(f"{dashboard}/api/serve/applications/", token)
        apps = (body or {}).get("applications", {}) if status == 200 else {}
        if apps and all(app["status"] == "RUNNING" for app in apps.values()):
            return
        assert not any(app["status"] == "DEPLOY_FAILED" for app in apps.values()), json.dumps(apps)[:3000]
        time.sleep(2)
    raise AssertionError(f"Serve application not RUNNING in {timeout_s} s: {json.dumps(body)[:2000]}\n"
                         f"{kuberay.logs(head.name)}")


# ---------------------------------------------------------------------------------------------
# 1. serving on an empty bucket


@pytest.mark.timeout(900)  # the set-up builds the image and starts the serving cluster
def test_serving_starts_on_an_empty_bucket_and_says_how_to_train(serving: ServingCluster) -> None:
    import openai

    with urllib.request.urlopen(f"{serving.api}/health", timeout=10) as response:
        assert response.status == 200
    client = openai.OpenAI(base_url=f"{serving.api}/v1", api_key="unused", max_retries=0)
    assert client.models.list().data == []
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 503
    assert "speedrun" in refused.value.message
    assert refused.value.response.headers.get("retry-after")
    # the chart's default ingress is Ray Serve's high-throughput mode: HAProxy takes the serve port in every pod
    for pod in (serving.head, serving.worker):
        assert "haproxy" in _process_names(pod), f"no HAProxy in {pod.name}"


def _process_names(pod: kuberay.Pod) -> set[str]:
    """The names of the processes running in pod's container (the image has no ps)."""
    out = kuberay.docker("exec", pod.name, "bash", "-c", "cat /proc/[0-9]*/comm 2>/dev/null", check=False)
    return set(out.stdout.split())


# ---------------------------------------------------------------------------------------------
# 2. the speedrun RayJob


def _job_manifest(replay: Replay) -> dict[str, Any]:
    """k8s/speedrun-job.yaml with the tiny preset, a few steps and this machine's sizes: what a user with
    two CPU cores would change in it, nothing else."""
    job = yaml.safe_load(JOB.read_text())
    spec = job["spec"]
    entrypoint = spec["entrypoint"].split()
    storage = entrypoint[entrypoint.index("--storage") + 1]
    assert storage.startswith("s3://"), spec["entrypoint"]
    settings = " ".join(f"--set {item}" for item in TINY)
    spec["entrypoint"] = f"nanochat speedrun --preset tiny-cpu --storage s3://{replay.bucket} --run {RUN} {settings}"
    cluster = spec["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        container = group["template"]["spec"]["containers"][0]
        container["resources"] = {"limits": {"cpu": "2", "memory": "6Gi"}}
        for volume in group["template"]["spec"].get("volumes", []):
            if (volume.get("emptyDir") or {}).get("medium") == "Memory":
                volume["emptyDir"]["sizeLimit"] = "1Gi"
        group.get("rayStartParams", {}).pop("object-store-memory", None)
    return job


@dataclass
class JobRun:
    status: dict[str, Any]
    worker_killed_at_step: int
    log: str


@pytest.fixture(scope="module")
def speedrun_job(replay: Replay, chart: list[dict[str, Any]], serving: ServingCluster) -> JobRun:
    job = _job_manifest(replay)
    spec = job["spec"]
    cluster = f"{job['metadata']['name']}-{uuid.uuid4().hex[:5]}"
    rc = spec["rayClusterSpec"]
    # the job reads its S3 settings from the Secret its pods name; with MinIO that is the chart's own
    job_secrets = {**_secrets(chart), **_job_secret(replay, job)}
    common = dict(image=replay.image, secrets=job_secrets, auth_token=replay.token, max_cpus=2)
    head = kuberay.build_pod(cluster, rc["headGroupSpec"], "head", **common)
    dashboard_port = free_port()
    replay.start(head, publish={dashboard_port: kuberay.DASHBOARD_PORT})
    replay.wait_ready(head, timeout_s=120)
    group = rc["workerGroupSpecs"][0]
    worker = replay.start(kuberay.build_pod(cluster, group, "worker", **common))
    replay.wait_ready(worker, timeout_s=120)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    submission = {"entrypoint": spec["entrypoint"], "submission_id": f"{cluster}-{uuid.uuid4().hex[:6]}"}
    for key, field_name in [("entrypointNumCpus", "entrypoint_num_cpus"), ("entrypointNumGpus", "entrypoint_num_gpus")]:
        if key in spec:
            submission[field_name] = min(float(spec[key]), 1.0)  # this machine's 2 cores, not a GPU node's
    if "entrypointResources" in spec:
        submission["entrypoint_resources"] = json.loads(spec["entrypointResources"])
    if "runtimeEnvYAML" in spec:
        submission["runtime_env"] = yaml.safe_load(spec["runtimeEnvYAML"])
    status, body = _http(f"{dashboard}/api/jobs/", replay.token, "POST", submission)
    assert status == 200, body
    job_id = submission["submission_id"]

    # kill the worker once base training has a checkpoint; start its replacement as KubeRay would
    latest = f"runs/{RUN}/base/latest"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and latest not in replay.s3_keys(latest):
        status, body = _http(f"{dashboard}/api/jobs/{job_id}", replay.token)
        assert body["status"] in ("PENDING", "RUNNING"), _job_log(dashboard, replay.token, job_id)
        time.sleep(2)
    assert latest in replay.s3_keys(latest), "base training wrote no checkpoint in 600 s"
    killed_at = int(_s3(replay.s3_endpoint).get_object(Bucket=replay.bucket, Key=latest)["Body"].read()
                    .decode().strip().removeprefix("step_"))
    kuberay.docker("kill", worker.name)
    replay.start(kuberay.build_pod(cluster, group, "worker", name=f"{worker.name}-2", **common))

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status, body = _http(f"{dashboard}/api/jobs/{job_id}", replay.token)
        if body["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    return JobRun(body, killed_at, _job_log(dashboard, replay.token, job_id))


def _job_secret(replay: Replay, job: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The S3 Secret the job's pods name, made as its header tells a user to make it (when the chart's
    rendered objects do not already hold it)."""
    names = {ref["secretKeyRef"]["name"]
             for group in [job["spec"]["rayClusterSpec"]["headGroupSpec"], *job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
             for env in group["template"]["spec"]["containers"][0].get("env", [])
             if (ref := env.get("valueFrom")) and "secretKeyRef" in ref}
    values = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "AWS_ENDPOINT_URL_S3": replay.s3_endpoint, "AWS_REGION": "us-east-1"}
    return {name: values for name in names}


def _job_log(dashboard: str, token: str, job_id: str) -> str:
    status, body = _http(f"{dashboard}/api/jobs/{job_id}/logs", token)
    return (body or {}).get("logs", "") if isinstance(body, dict) else str(body)


@pytest.mark.timeout(1800)  # the set-up runs the whole pipeline
def test_speedrun_job_survives_a_lost_worker_and_writes_everything_to_the_bucket(replay: Replay, speedrun_job: JobRun) -> None:
    assert speedrun_job.status["status"] == "SUCCEEDED", (speedrun_job.status.get("message"), speedrun_job.log[-5000:])
    assert 0 < speedrun_job.worker_killed_at_step < 40
    result = json.loads(speedrun_job.log.strip().splitlines()[-1])
    assert result["stage"] == "speedrun"
    done = json.loads(_s3(replay.s3_endpoint).get_object(
        Bucket=replay.bucket, Key=f"runs/{RUN}/base/DONE.json")["Body"].read())["summary"]
    assert done["steps"] == 40 and done["metrics"]["resumed_from"], "base resumed from a checkpoint after the loss"
    keys = replay.s3_keys("")
    assert "tokenizer/tokenizer.json" in keys
    assert any(k.startswith("data/") and k.endswith(".parquet") for k in keys)
    assert f"runs/{RUN}/sft/latest" in keys
    assert f"runs/{RUN}/report.md" in keys, [k for k in keys if k.endswith(".md")]
    assert "report.md" not in keys, "the report is kept per run, not at the storage root"


# ---------------------------------------------------------------------------------------------
# 3. the hand-off: serving picks up the job's checkpoint


def test_serving_picks_up_the_trained_model_and_chats(replay: Replay, chart: list[dict[str, Any]],
                                                      serving: ServingCluster, speedrun_job: JobRun) -> None:
    import openai

    assert speedrun_job.status["status"] == "SUCCEEDED"
    client = openai.OpenAI(base_url=f"{serving.api}/v1", api_key="unused", max_retries=0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not client.models.list().data:
        time.sleep(1)
    models = [m.id for m in client.models.list().data]
    assert models, f"the served app did not load the new checkpoint:\n{kuberay.logs(serving.worker.name)}"
    reply = client.chat.completions.create(model=models[0], max_tokens=8,
                                           messages=[{"role": "user", "content": "Hello!"}])
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0

    # `helm test`: the chart's test pod, its command and environment, in a container on the network
    test_pod = _one(chart, "Pod", **{"helm.sh/hook": "test"})
    container = test_pod["spec"]["containers"][0]
    env = [a for e in container.get("env", []) if "value" in e for a in ("--env", f"{e['name']}={e['value']}")]
    security = test_pod["spec"].get("securityContext", {})
    out = kuberay.docker("run", "--rm", "--network", replay.network, "--read-only", "--tmpfs", "/tmp",
                         "--user", f"{security.get('runAsUser', 1000)}:{security.get('runAsGroup', 1000)}",
                         *env, "--entrypoint", container["command"][0], replay.image,
                         *container["command"][1:], *container.get("args", []),
                         check=False, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
