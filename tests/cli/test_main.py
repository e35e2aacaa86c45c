"""The `nanochat` command line: its commands, global options and exit statuses (SPEC.md)."""

import os
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


def test_global_options_count_wherever_they_stand(tmp_path):
    from cli.main import build_parser, config_from_args

    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("train:\n  max_steps: 7\n  seq_len: 128\n")
    second.write_text("train:\n  max_steps: 9\n")
    argv = ["--config", str(first), "--set", "train.eval_every=3", "--run", "a",
            "train", "--set", "train.eval_every=5", "--run", "b",
            "base", "--config", str(second), "--set", "train.checkpoint_every=4"]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert (cfg.train.max_steps, cfg.train.seq_len) == (9, 128)  # both files, the later winning
    assert (cfg.train.eval_every, cfg.train.checkpoint_every) == (5, 4)  # every --set, the later winning
    assert cfg.run == "b"
    assert config_from_args(build_parser().parse_args(["data", "--run", "c", "prepare"])).run == "c"


@pytest.mark.parametrize("argv, named", [
    (["--storage", "ftp://host/x", "report"], "--storage"),
    (["--storage", "s3://", "report"], "--storage"),
    (["--run", "..", "report"], "run"),
    (["eval", "core", "--tasks", "hellaswag_zeroshot,typo"], "typo"),
    (["eval", "chat", "--tasks", "gsm8k,typo"], "typo"),
])
def test_bad_usage_exits_2_naming_it_before_anything_starts(argv, named, tmp_path):
    out = run(*argv, env={**os.environ, "NANOCHAT_STORAGE": str(tmp_path / "store")}, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert named in out.stderr
    assert list(tmp_path.iterdir()) == [], "nothing written"


@pytest.mark.parametrize("command", [["train", "base", "--metrics-port"], ["serve", "--port"]])
def test_a_port_another_process_holds_exits_2(tmp_path, command):
    import socket

    from services.network import free_port

    port = free_port()
    with socket.socket() as held:
        held.bind(("", port))
        held.listen()
        out = run("--storage", str(tmp_path), *command, str(port))
    assert out.returncode == 2 and f"{command[-1]}={port}: another process holds" in out.stderr
    assert not any(tmp_path.iterdir())
    out = run("--storage", str(tmp_path), *command, "99999")
    assert out.returncode == 2 and "1-65535" in out.stderr
