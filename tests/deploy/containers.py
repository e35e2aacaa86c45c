"""
Helpers for tests that run the project's container images on a real Docker engine (no tests here).

- require_docker() makes sure an engine answers: it installs Debian's docker.io where it is missing and the
  suite runs as root, starts dockerd through scripts/start-docker.sh, and otherwise skips the test with the
  reason (only where no engine can be installed or started).
- docker_client() is the client to use, for builds and runs alike: one that can build with BuildKit (buildx, or
  a client that accepts DOCKER_BUILDKIT=1 such as Debian's /usr/bin/docker), as scripts/build-images.sh picks.
- build_cpu_image() builds the CPU image through scripts/build-images.sh, the users' recipe, tagged
  nanochat-test/nanochat:VERSION. A file lock under /tmp keeps two pytest-xdist workers from building at once;
  the second one finds Docker's build cache warm and is done in seconds.
"""

import fcntl
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEST_REPO = "nanochat-test/nanochat"  # the test images' name, apart from what users build and push
BUILD_LOCK = Path("/tmp/nanochat-image-build.lock")
BUILD_LOG = Path("/tmp/nanochat-image-build.log")
BUILD_TIMEOUT_S = 1800  # a cold build (base, torch, Ray) on a slow network


def image_version() -> str:
    """The images' version: the chart's appVersion (scripts/build-images.sh checks it equals pyproject's)."""
    chart = (REPO / "helm" / "nanochat" / "Chart.yaml").read_text()
    return re.search(r'^appVersion:\s*"?([^"\s]+)"?\s*$', chart, re.M)[1]


def _clients() -> list[str]:
    found = [shutil.which("docker"), "/usr/bin/docker", "/usr/local/bin/docker"]
    return list(dict.fromkeys(c for c in found if c and os.access(c, os.X_OK)))


def _builds_with_buildkit(client: str) -> bool:
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    if subprocess.run([client, "buildx", "version"], capture_output=True, env=env).returncode == 0:
        return True
    out = subprocess.run([client, "build", "--help"], capture_output=True, text=True, env=env)
    return "--secret" in out.stdout + out.stderr


@functools.cache
def docker_client() -> str:
    """The path of the Docker client to use: the first on PATH (or in /usr/bin, /usr/local/bin) that can build
    with BuildKit; where none can, the first there is (runs need no BuildKit). Skips the test if there is none."""
    clients = _clients()
    if not clients:
        pytest.skip("no docker client installed (Debian: apt-get install docker.io; scripts/setup-test-tools.sh)")
    return next((c for c in clients if _builds_with_buildkit(c)), clients[0])


def _engine_answers(client: str) -> bool:
    try:
        return subprocess.run([client, "info"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _install_docker() -> None:
    """Debian's docker.io with apt-get, where it is missing and we are root (as scripts/setup-test-tools.sh)."""
    if shutil.which("dockerd") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io"],
                   capture_output=True, env=env, timeout=900)


@functools.cache
def _start_engine() -> str:
    """'' once an engine answers, else why not (cached: one attempt per process)."""
    _install_docker()
    if not _clients():
        return "no Docker engine installed, and apt-get could not install docker.io (needs root and Debian)"
    if _engine_answers(docker_client()):
        return ""
    out = subprocess.run([str(REPO / "scripts" / "start-docker.sh")], capture_output=True, text=True, timeout=120)
    if out.returncode != 0 or not _engine_answers(docker_client()):
        return f"the Docker engine is not running and could not be started: {out.stderr.strip()}"
    return ""


def require_docker() -> str:
    """The Docker client, once the engine answers (started here where it was not); skips the test where no
    engine can be installed or started, with the reason."""
    reason = _start_engine()
    if reason:
        pytest.skip(reason)
    return docker_client()


@functools.cache
def build_cpu_image() -> str:
    """Build the CPU image with scripts/build-images.sh under the test name and return its tag. Safe to call
    from several processes at once: the builds take turns under a file lock, and the later ones hit the cache.
    The build's output goes to /tmp/nanochat-image-build.log; a failed build fails with its end."""
    client = require_docker()
    tag = f"{TEST_REPO}:{image_version()}"
    env = {**os.environ, "PATH": f"{Path(client).parent}:{os.environ.get('PATH', '')}"}
    with open(BUILD_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(BUILD_LOG, "w") as log:
            out = subprocess.run([str(REPO / "scripts" / "build-images.sh"), "--only", "cpu", "--repo", TEST_REPO],
                                 cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=BUILD_TIMEOUT_S)
        if out.returncode != 0:
            tail = "\n".join(BUILD_LOG.read_text().splitlines()[-40:])
            raise RuntimeError(f"scripts/build-images.sh --only cpu failed ({out.returncode}):\n{tail}")
    return tag
