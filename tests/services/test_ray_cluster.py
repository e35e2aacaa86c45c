"""The embedded Ray cluster's settings, seen from inside its workers (a real local cluster per case, in a
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


def worker_niceness(env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(next(line for line in done.stdout.splitlines() if line.startswith("niceness")).split()[1])


@pytest.mark.parametrize("setting, expected", [(None, 0), ("7", 7)])
def test_embedded_workers_run_at_an_ordinary_niceness_unless_told(setting: str | None, expected: int) -> None:
    """Ray's own default would start them at 15; a RAY_worker_niceness of the user's wins."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
    if setting is not None:
        env["RAY_worker_niceness"] = setting
    assert worker_niceness(env) == expected
