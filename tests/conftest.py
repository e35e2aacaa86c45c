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
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.storage import LocalStorage

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
S3_PREFIX = "root"  # a non-empty prefix, so tests also check that keys stay relative to it


# The suite's thread counts, set here and nowhere else, whatever the machine's core count or the caller's
# environment: one thread per process beats oversubscription on 2 cores (10-100x slower under load
# otherwise), and fixed counts keep a run's numbers from depending on the machine (tests/numerics.py).
# Set before any test imports torch or numpy; every process the tests start (spawned ranks, Ray workers,
# servers) inherits them.
THREADS = 1
os.environ.update({name: str(THREADS) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
# JAX tests shard over 8 virtual CPU devices; XLA reads this once, when jax is first imported.
# On this busy 2-core machine, collectives between those virtual devices get minutes before XLA aborts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=900 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=900")


@pytest.fixture(autouse=True, scope="session")
def pinned_torch_threads():
    """THREADS for torch even where it was imported before the variables above were set."""
    import torch

    torch.set_num_threads(THREADS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM proc and wait for it; SIGKILL it if it is still there after timeout seconds (a no-op once it has
    exited). For the servers and nodes the tests start in subprocesses."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until_answers(url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float = 30.0) -> None:
    """Wait until url answers 2xx, for a server the test started as proc (writing log); fail with that log
    if proc exits or timeout_s passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} at {url} did not answer within {timeout_s} s:\n{log.read_text()}")


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


def set_s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point the usual AWS variables at endpoint with moto's test credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    for name in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)  # a developer's own AWS set-up must not leak in


def create_bucket(endpoint: str) -> str:
    import boto3

    name = f"nanochat-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=name)
    return name


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


@pytest.fixture(scope="session")
def cpu_image() -> str:
    """The CPU image's tag, built once per session through scripts/build-images.sh (tests/containers.py: the
    Docker engine is started where it is not running; the test is skipped where none can be)."""
    from tests.containers import build_cpu_image

    return build_cpu_image()
