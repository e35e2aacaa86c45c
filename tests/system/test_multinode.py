"""
`nanochat train base`, unchanged, on an existing multi-node Ray cluster: two `ray start` nodes of 1 CPU each
on this machine, the job sent with `ray job submit`, checkpoints in shared object storage (the moto server).

Notable:
- token authentication stays on, as on Kubernetes: the test makes its own token and hands it to every `ray`
  process through RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (~/.ray/auth_token is neither read nor written),
  and checks that a wrong token is refused
- each node has its own --temp-dir and free ports, and runs `ray start --block` as a child of the test;
  teardown signals those two processes (then anything they left) by PID. `ray stop` is never used: it kills
  every Ray process on the machine, including the embedded Ray of this pytest session and of other sessions
- 2 workers x 1 CPU on 2 nodes x 1 CPU leaves Ray one placement; the State API confirms each node ran one
- the AWS variables reach the nodes through their environment, as a pod's would
- a storage endpoint that refuses connections fails `train base` in seconds, before any Ray starts
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.network import free_port
from services.storage import open_storage
from tests.support.processes import stop_process

BIN = Path(sys.executable).parent
RAY, NANOCHAT = str(BIN / "ray"), str(BIN / "nanochat")
STEPS = 6

# tests/system/test_train_ray.py's SMALL: steps of tens of milliseconds, what is tested is the machinery
SMALL = [
    "model.depth=2", "model.head_dim=32", "tokenizer.vocab_size=512", "tokenizer.max_chars=400000",
    "train.seq_len=64", "train.device_batch_size=4", "train.total_batch_size=512", f"train.max_steps={STEPS}",
    "train.checkpoint_every=3", "train.eval_every=6", "train.eval_tokens=1024", "train.workers=2",
    "train.keep_checkpoints=5", "log.tensorboard=false", "data.docs_per_shard=80", "data.row_group_size=16",
    # all of the stdlib corpus is prepared here (test_train_ray takes 3 full shards): its last shard holds
    # the remainder, 2 documents in 1 row group, too few for 2 workers to evaluate on alone
    "data.val_shards=2",
]
# what Ray forwards into a job's log, maybe coloured: a worker's lines "(RayTrainWorker pid=12, ip=...) ...", and
# the raylet's own warnings "(raylet) ..." (a nearly full disk, say)
RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|\S+ pid=)")
SETTINGS = [arg for override in SMALL for arg in ("--set", override)]


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:PORT: the jobs and state APIs
    env: dict[str, str]  # what every `ray` command needs to reach it (the token)


def cluster_env() -> dict[str, str]:
    """This process's environment (AWS variables included) without Ray's variables, plus a fresh token.

    An embedded Ray started earlier in this session leaves RAY_* variables behind; none may leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's entrypoint finds `nanochat` as a user's would
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # nothing to drain: stop at once on SIGTERM
        # the cluster operator's choice, not nanochat's: Ray Train's small-run settings (STACK-NOTES), which
        # `nanochat` sets only for the embedded Ray it starts itself
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
        RAY_TRAIN_METRICS_ENABLED="0",
    )
    return env


def start_node(env: dict[str, str], temp_dir: Path, log: Path, *head_or_join: str) -> subprocess.Popen:
    """`ray start --block` for one node on its own ports; returns once the node runs."""
    ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    cmd = [RAY, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",  # 0: any free port
           *[f"{flag}={free_port()}" for flag in ports], *head_or_join]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while b"Ray runtime started" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_nodes([proc])
            raise RuntimeError(f"`{' '.join(cmd)}` did not start a node:\n{log.read_text()}")
        time.sleep(0.2)
    return proc


def _stat(pid: int | str) -> tuple[int, int] | None:
    """(parent pid, start time) from /proc/PID/stat; None once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def descendants(pids: list[int]) -> dict[int, int]:
    """{pid: start time} of every process below pids (Ray's workers start their own sessions, so there is
    no process group to signal); the start time tells a survivor from a new process that reused its pid."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(entry.name)):
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found: dict[int, int] = {}
    todo = list(pids)
    while todo:
        for child, started in children.get(todo.pop(), []):
            if child not in found:
                found[child] = started
                todo.append(child)
    return found


def stop_nodes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each `ray start --block` (it stops what it started), then SIGKILL whatever they left behind."""
    family = descendants([p.pid for p in procs])
    for proc in reversed(procs):  # the joining node first, so the head does not wait for it
        stop_process(proc, timeout=30)
    for pid, started in family.items():
        if (stat := _stat(pid)) and stat[1] == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def cluster(s3_env: str, tmp_path: Path) -> Iterator[Cluster]:
    """A head and a second node, each with 1 CPU, sharing the moto S3 server through the AWS variables."""
    env = cluster_env()
    gcs, dashboard = free_port(), free_port()
    # not under tmp_path: Ray's unix sockets live in the temp dir and socket paths are limited to 107 bytes
    root = Path(tempfile.mkdtemp(prefix="ray-mn-"))
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(start_node(env, root / "head", tmp_path / "head.log", "--head", f"--port={gcs}",
                                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                f"--ray-client-server-port={free_port()}"))
        nodes.append(start_node(env, root / "node2", tmp_path / "node2.log", f"--address=127.0.0.1:{gcs}"))
        yield Cluster(f"http://127.0.0.1:{dashboard}", env)
    finally:
        stop_nodes(nodes)
        shutil.rmtree(root, ignore_errors=True)


def ray_cli(cluster: Cluster, command: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`ray COMMAND --address DASHBOARD ARGS...` with the cluster's token."""
    return subprocess.run([RAY, *command.split(), "--address", cluster.dashboard, *args], env=cluster.env,
                          capture_output=True, text=True, timeout=timeout)


def ray_list(cluster: Cluster, kind: str, *filters: str) -> list[dict]:
    out = ray_cli(cluster, f"list {kind}", "--format=json", "--detail", *[f"--filter={f}" for f in filters])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def driver_lines(job_log: str) -> list[str]:
    """What the job's entrypoint printed itself: the log also holds the lines Ray forwards from the workers
    (prefixed "(RayTrainWorker pid=...)") and the raylet ("(raylet)"), which may arrive after the driver's last."""
    return [line for line in job_log.splitlines() if line.strip() and not RAY_FORWARDED.match(line)]


def nanochat(storage: str, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([NANOCHAT, *args, "--storage", storage, *SETTINGS],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.slow
def test_train_base_runs_unchanged_on_a_two_node_cluster(s3_env: str, cluster: Cluster):
    nanochat(s3_env, "data", "prepare")
    nanochat(s3_env, "tok", "train")
    nodes = ray_list(cluster, "nodes")
    assert len(nodes) == 2 and all(n["state"] == "ALIVE" for n in nodes), nodes
    stranger = Cluster(cluster.dashboard, {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    refused = ray_cli(stranger, "job list")
    assert refused.returncode != 0 and "token" in refused.stderr, "token auth must be on"

    job_id = f"nanochat-multinode-{secrets.token_hex(4)}"
    submit = ray_cli(cluster, "job submit", "--submission-id", job_id, "--", "nanochat", "train", "base",
                     "--storage", s3_env, "--run", "multinode", *SETTINGS, timeout=180)
    assert submit.returncode == 0, f"job failed:\n{submit.stdout[-6000:]}\n{submit.stderr[-3000:]}"
    assert f"Job '{job_id}' succeeded" in submit.stdout

    logs = ray_cli(cluster, "job logs", job_id)
    assert logs.returncode == 0, logs.stderr
    summary = json.loads(driver_lines(logs.stdout)[-1])  # the stage's JSON line comes last
    assert summary["stage"] == "base" and summary["run"] == "multinode"
    assert summary["steps"] == STEPS and summary["tokens"] == STEPS * 512
    assert summary["metrics"]["resumed_from"] == [], "one uninterrupted run, no worker-group restart"
    # the workers' own lines reach the job's log; Ray Train's per-report INFO lines do not (log.ray_train=WARNING)
    assert re.search(r"RayTrainWorker pid=\d+[^)]*\)\S* base: [\d,]+ params", logs.stdout), logs.stdout[-3000:]
    assert "Reporting training result" not in logs.stdout

    # one worker of 1 CPU on each 1-CPU node: Ray Train spanned the cluster
    workers = ray_list(cluster, "actors", "class_name=RayTrainWorker")
    assert len(workers) == 2, workers
    assert {w["node_id"] for w in workers} == {n["node_id"] for n in nodes}

    storage = open_storage(s3_env)  # the bucket the workers wrote, read back from here
    keys = storage.list("runs/multinode/base/")
    for step in (3, 6):
        assert f"runs/multinode/base/step_{step:06d}/manifest.json" in keys
        assert f"runs/multinode/base/step_{step:06d}/model.safetensors" in keys
    assert storage.read_text("runs/multinode/base/latest").strip() == f"step_{STEPS:06d}"


def test_unreachable_storage_fails_fast_before_ray_starts(s3_env: str, tmp_path: Path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ray_tmp = tmp_path / "ray-tmp"  # a Ray started by the command would create its session folder here
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS to attach to
    env.update(AWS_ENDPOINT_URL_S3=endpoint, RAY_TMPDIR=str(ray_tmp))
    started = time.monotonic()
    out = subprocess.run([NANOCHAT, "train", "base", "--storage", f"{s3_env}/x"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "train base failed" in out.stderr and endpoint in out.stderr
    assert not ray_tmp.exists(), "storage must be checked before any Ray starts"
    # seconds alone (imports and botocore's retries), but a loaded 2-core machine may take several times that
    assert time.monotonic() - started < 60
