"""The embedded Ray cluster's settings, seen from inside its workers and jobs (a real local cluster per case, in a
process of its own so that the variables reach its raylet)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import os
import ray
from services.ray_cluster import connect

connect(num_cpus=1, dashboard=False)
print("niceness", ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote()))
"""


def run_script(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    """Run a Python script from the repository root in a process of its own; its stdout, once it succeeded."""
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def worker_niceness(env: dict[str, str]) -> int:
    out = run_script(PROBE, env=env)
    return int(next(line for line in out.splitlines() if line.startswith("niceness")).split()[1])


@pytest.mark.parametrize("setting, expected", [(None, 0), ("7", 7)])
def test_embedded_workers_run_at_an_ordinary_niceness_unless_told(setting: str | None, expected: int) -> None:
    """Ray's own default would start them at 15; a RAY_worker_niceness of the user's wins."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
    if setting is not None:
        env["RAY_worker_niceness"] = setting
    assert worker_niceness(env) == expected


# a cluster with the dashboard, as `nanochat serve` starts one: it waits for the job to be training, starts,
# says so, and ends when its stdin closes
OTHER_CLUSTER = """
import sys, time
from pathlib import Path
from services.ray_cluster import connect

flags = Path(sys.argv[1])
while not (flags / "training").exists():
    time.sleep(0.2)
connect(num_cpus=1)
(flags / "up").touch()
sys.stdin.read()
"""

# argv[1]: the other cluster's script
TRAIN_WHILE_ANOTHER_CLUSTER_STARTS = """
import os, subprocess, sys, tempfile, time
from pathlib import Path
import ray.train
from ray.train.torch import TorchTrainer
from services.ray_cluster import connect

flags = Path(tempfile.mkdtemp())
own_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # the other must not attach to ours


def train():
    (flags / "training").touch()
    while not (flags / "up").exists():
        time.sleep(0.2)
    time.sleep(5)  # the placement-group cleaner asks once a second


connect(num_cpus=1, dashboard=False)
other = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(flags)], stdin=subprocess.PIPE, env=own_env)
try:
    run = ray.train.RunConfig(storage_path=str(flags), failure_config=ray.train.FailureConfig(max_failures=0))
    TorchTrainer(train, scaling_config=ray.train.ScalingConfig(num_workers=1), run_config=run).fit()
    print("trained")
finally:
    other.stdin.close()
    other.wait(timeout=120)
"""


@pytest.mark.system
def test_a_training_job_survives_another_cluster_starting_on_the_same_machine() -> None:
    """A training cluster (no dashboard) keeps its job's workers while a cluster with a dashboard starts beside
    it: Ray Train's placement-group cleaner would otherwise ask that dashboard whether the job's controller
    lives, hear no, and remove the job's placement group mid-run."""
    assert "trained" in run_script(TRAIN_WHILE_ANOTHER_CLUSTER_STARTS, OTHER_CLUSTER, timeout=300)


# ---------------------------------------------------------------------------------------------
# The embedded cluster's metrics port


def listening(port: int):
    import socket

    s = socket.socket()
    s.bind(("", port))
    s.listen()
    return s


def test_metrics_port_is_8080_and_gives_way_to_another_process_there(monkeypatch, caplog) -> None:
    from services import ray_cluster
    from services.network import free_port

    default = free_port()  # 8080 itself may be held on a developer's machine
    monkeypatch.setattr(ray_cluster, "DEFAULT_METRICS_PORT", default)
    monkeypatch.delenv(ray_cluster.METRICS_PORT_ENV)
    assert ray_cluster.embedded_metrics_port() == default
    with listening(default):
        other = ray_cluster.embedded_metrics_port()
    assert other != default and f"http://127.0.0.1:{other}/metrics" in caplog.text
    listening(other).close()  # a port a server can bind


def test_a_metrics_port_asked_for_must_be_free_and_a_number(monkeypatch) -> None:
    from nanochat.config import ConfigError
    from services import ray_cluster
    from services.network import free_port

    port = free_port()
    monkeypatch.setenv(ray_cluster.METRICS_PORT_ENV, str(port))
    assert ray_cluster.embedded_metrics_port() == port
    with listening(port), pytest.raises(ConfigError, match=f"NANOCHAT_METRICS_PORT={port}: another process"):
        ray_cluster.embedded_metrics_port()
    monkeypatch.setenv(ray_cluster.METRICS_PORT_ENV, "eighty")
    with pytest.raises(ConfigError, match="NANOCHAT_METRICS_PORT='eighty': expected a TCP port"):
        ray_cluster.embedded_metrics_port()
    monkeypatch.setenv(ray_cluster.METRICS_PORT_ENV, "0")  # Ray's choice, as the test suite runs
    assert ray_cluster.embedded_metrics_port() is None
