"""The `nanochat` command line: its commands, global options and exit statuses (SPEC.md)."""

import subprocess
import sys
from pathlib import Path

import pytest

NANOCHAT = str(Path(sys.executable).parent / "nanochat")


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([NANOCHAT, *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    for command in ["data", "tok", "train", "eval", "speedrun", "serve", "chat", "report", "experiment"]:
        assert f"    {command} " in out.stdout, command


@pytest.mark.parametrize("where", ["before", "after"])
def test_bad_config_exits_2_naming_the_field(where, tmp_path):
    options = ["--storage", str(tmp_path), "--set", "train.max_step=5"]
    argv = options + ["data", "prepare"] if where == "before" else ["data", "prepare"] + options
    out = run(*argv)
    assert out.returncode == 2
    assert "train.max_step" in out.stderr and "max_steps" in out.stderr
    assert not any(tmp_path.iterdir()), "a rejected configuration must not touch storage"


def test_bad_flag_value_exits_2():
    out = run("train", "base", "--workers", "0")
    assert out.returncode == 2 and "train.workers" in out.stderr


def test_unknown_command_exits_2():
    assert run("bogus").returncode == 2


def test_backend_flag_sets_train_backend_for_base_only():
    from cli.main import build_parser, config_from_args

    args = build_parser().parse_args(["train", "base", "--backend", "jax"])
    assert config_from_args(args).train.backend == "jax"
    assert run("train", "mid", "--backend", "jax").returncode == 2  # only base pretraining has a JAX path
    out = run("train", "base", "--backend", "tensorflow")
    assert out.returncode == 2 and "jax" in out.stderr


def test_jax_batch_that_does_not_split_over_the_devices_exits_2_before_ray(tmp_path):
    out = run("--storage", str(tmp_path), "train", "base", "--backend", "jax", "--set", "jax.cpu_devices=8")
    assert out.returncode == 2  # tiny-cpu: 4 rows x 512 tokens x 8 devices > 4096 tokens per step
    assert "train.device_batch_size" in out.stderr and "8 = 16384" in out.stderr
    assert not any(tmp_path.iterdir())
