"""
Shared pytest fixtures.

Notable:
- s3_server is a real moto server in a subprocess on 127.0.0.1 (one per session): a separate process
  keeps moto's request patching out of ours and out of Ray's workers, which reach it like real S3.
- s3_env points the AWS variables at it and creates a fresh bucket per test, so tests never see each
  other's objects; code under test reads the same variables as it does in production.
- shared_data is the test corpus beside the repository; the package itself never reads it.
"""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.network import free_port
from services.storage import LocalStorage
from tests.support.processes import stop_process, wait_until_answers
from tests.support.s3 import create_bucket, set_s3_env

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
S3_PREFIX = "root"  # a non-empty prefix, so tests also check that keys stay relative to it


# The suite's thread counts, set here and nowhere else, whatever the machine's core count or the caller's
# environment: one thread per process beats oversubscription on 2 cores (10-100x slower under load
# otherwise), and fixed counts keep a run's numbers from depending on the machine (tests/support/numerics.py).
# Set before any test imports torch or numpy; every process the tests start (spawned ranks, Ray workers,
# servers) inherits them.
THREADS = 1
os.environ.update({name: str(THREADS) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
# JAX tests shard over 8 virtual CPU devices; XLA reads this once, when jax is first imported.
# On this busy 2-core machine, collectives between those virtual devices get minutes before XLA aborts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=900 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=900")

# Every embedded Ray cluster would serve its metrics at :8080; clusters the two xdist workers start at once
# would both see it free and one would fail to start. Tests that read metrics give ports of their own.
os.environ["NANOCHAT_METRICS_PORT"] = "0"


TESTS = Path(__file__).resolve().parent
FOLDER_MARKERS = {"system": pytest.mark.system, "deploy": pytest.mark.deploy}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """System tests (tests/system/) and deployment tests (tests/deploy/) carry their folder's marker, so
    `-m "not system and not deploy"` selects the unit tests."""
    for item in items:
        folder = Path(item.fspath).resolve().relative_to(TESTS).parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[folder])


@pytest.fixture(autouse=True, scope="session")
def pinned_torch_threads():
    """THREADS for torch even where it was imported before the variables above were set."""
    import torch

    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a real moto S3 server on 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{endpoint}/moto-api/", proc, log, "moto server")
        yield endpoint
    finally:
        stop_process(proc, timeout=10)


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """AWS variables set for the moto server and a fresh bucket: yields "s3://<bucket>/<prefix>"."""
    set_s3_env(monkeypatch, s3_server)
    return f"s3://{create_bucket(s3_server)}/{S3_PREFIX}"


@pytest.fixture
def local_storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"test data not found at {SHARED_DATA} (the shared/ folder beside the repository)")
    return SHARED_DATA
