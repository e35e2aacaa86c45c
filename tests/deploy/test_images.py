"""
The CPU image, built through scripts/build-images.sh and run on a real Docker engine.

Notable:
- the image is built once per session (the cpu_image fixture, tests/deploy/containers.py): the first build takes
  minutes, the later ones (other workers, a rerun) hit Docker's cache. The engine is started where it is not
  running; the tests skip, saying why, only where no engine can be installed or started.
- containers run as the image runs in a pod: uid 1000, read-only root filesystem, writable only at /data (an
  anonymous volume, which takes the image's ownership of /data) and /tmp (a tmpfs).
- the GPU image is not built here (its CUDA wheels are gigabytes); tests/deploy/test_docker.py checks statically that
  it installs the same Python from the same base.
"""

import fcntl
import hashlib
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy.containers import BUILD_LOCK, BUILD_TIMEOUT_S, REPO, TEST_REPO, docker_client, image_version

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_S + 300)]

SYSTEM_CA = Path("/etc/ssl/certs/ca-certificates.crt")
POD_LIKE = ["--read-only", "--user", "1000:1000", "-v", "/data", "--tmpfs", "/tmp"]  # as the chart's pods


def _run(image: str, *args: str, options: list[str] = POD_LIKE, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([docker_client(), "run", "--rm", *options, image, *args],
                          capture_output=True, text=True, timeout=timeout)


def test_cpu_image_is_tagged_with_the_charts_app_version(cpu_image: str) -> None:
    assert cpu_image == f"{TEST_REPO}:{image_version()}"
    out = subprocess.run([docker_client(), "image", "inspect", "-f", "{{.Config.User}}", cpu_image],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1000:1000"


def test_cpu_image_runs_nanochat_as_uid_1000_on_a_read_only_root(cpu_image: str) -> None:
    out = _run(cpu_image)  # the image's own command: nanochat --help, through tini and the entrypoint
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: nanochat [-h]")
    out = _run(cpu_image, "nanochat", "speedrun", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: nanochat speedrun")


def test_cpu_image_has_the_user_python_ray_and_tools_pods_need(cpu_image: str) -> None:
    script = ("id -u; id -g; python -c 'import sys; print(sys.version.split()[0], sys.base_prefix)'; ray --version; "
              "python -c 'from nanochat.config import PRESETS_DIR as p; print(p)'; command -v wget; command -v tini")
    out = _run(cpu_image, "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    (uid, gid), (python, base_prefix), (ray, presets, wget, tini) = lines[:2], lines[2].split(), lines[3:7]
    assert (uid, gid) == ("1000", "1000")
    # Debian's python3.11 (the Dockerfiles' PYTHON_VERSION), the interpreter every node of a cluster must share
    python_arg = re.search(r"^ARG PYTHON_VERSION=(\S+)$", (REPO / "docker" / "Dockerfile.cpu").read_text(), re.M)[1]
    assert python.startswith(python_arg + ".") and base_prefix == "/usr"
    ray_pin = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (REPO / "pyproject.toml").read_text())[1]
    assert ray == f"ray, version {ray_pin}"
    assert presets == "/app/configs"  # the editable install finds the presets
    assert (wget, tini) == ("/usr/bin/wget", "/usr/bin/tini")


def test_login_shell_as_kuberay_runs_it_finds_the_venv(cpu_image: str) -> None:
    # KubeRay replaces the entrypoint with `/bin/bash -lc "ulimit ...; ray start ..."`
    out = _run(cpu_image, "-lc", "command -v ray python", options=[*POD_LIKE, "--entrypoint", "/bin/bash"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["/opt/venv/bin/ray", "/opt/venv/bin/python"]


def test_cpu_image_refuses_to_start_without_a_data_volume(cpu_image: str) -> None:
    out = _run(cpu_image, "nanochat", "--help", options=["--read-only", "--tmpfs", "/tmp"])
    assert out.returncode == 78, out.stdout + out.stderr  # EX_CONFIG, from docker/entrypoint.sh
    assert "HOME=/data is not a writable directory for uid 1000" in out.stderr
    assert "mount a volume at /data" in out.stderr
    assert "usage: nanochat" not in out.stdout


@pytest.mark.skipif(not SYSTEM_CA.is_file(), reason=f"no CA bundle at {SYSTEM_CA} to look for")
def test_ca_bundle_given_to_the_build_is_not_in_the_image(cpu_image: str) -> None:
    # scripts/build-images.sh hands this machine's bundle to pip as a build secret: no file in the image may hold
    # it, no secret may be left at /run/secrets, and no layer's command may carry its text
    bundle = SYSTEM_CA.read_bytes()
    find = (f"ls -A /run/secrets 2>/dev/null; find / -xdev -type f -size {len(bundle)}c -exec sha256sum {{}} + "
            "2>/dev/null; true")
    out = _run(cpu_image, "-c", find, options=["--user", "0", "--entrypoint", "/bin/sh"])
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(bundle).hexdigest() not in out.stdout
    assert not [line for line in out.stdout.splitlines() if not re.match(r"^[0-9a-f]{64}\s", line)], out.stdout
    history = subprocess.run([docker_client(), "history", "--no-trunc", "--format", "{{.CreatedBy}}", cpu_image],
                             capture_output=True, text=True, check=True).stdout
    assert "BEGIN CERTIFICATE" not in history and str(SYSTEM_CA) not in history and "secret" not in history


def _cached_steps(build_output: str) -> dict[str, bool]:
    """BuildKit's plain progress: step title -> whether it came from the cache."""
    titles = dict(re.findall(r"^(#\d+) (\[[^\]]+\] .*)$", build_output, re.M))
    cached = set(re.findall(r"^(#\d+) CACHED$", build_output, re.M))
    return {title: step in cached for step, title in titles.items()}


def test_a_second_build_hits_the_cache(cpu_image: str) -> None:
    with open(BUILD_LOCK, "w") as lock:  # not while another worker builds
        fcntl.flock(lock, fcntl.LOCK_EX)
        start = time.monotonic()
        out = subprocess.run([str(REPO / "scripts" / "build-images.sh"), "--only", "cpu", "--repo", TEST_REPO],
                             cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        seconds = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-3000:]
    assert "base: debian:bookworm-slim (local)" in out.stderr
    # the slow steps (system packages, torch, the dependencies) come from the cache; the project's own files
    # may have changed since the fixture's build (an edit during the session), so their steps may not
    steps = _cached_steps(out.stderr)
    slow = [t for t in steps if "apt-get install" in t or "torch==" in t or "requirements.txt" in t]
    assert len(slow) == 4 and all(steps[t] for t in slow), steps  # system, venv, torch, dependencies
    assert cpu_image in out.stdout  # the summary: tag, size, build time
    assert seconds < 120, f"a cached rebuild took {seconds:.0f} s"


def test_start_docker_returns_at_once_when_the_engine_runs(cpu_image: str) -> None:
    start = time.monotonic()
    out = subprocess.run([str(REPO / "scripts" / "start-docker.sh")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "starting" not in out.stderr and time.monotonic() - start < 10
