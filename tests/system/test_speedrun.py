"""The speedrun end to end on a shrunken tiny preset: interrupted during base training, then run again, it
continues without redoing the corpus or the tokenizer and ends with report.md; its training metrics are
served at --metrics-port while it runs."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from services.network import free_port

pytestmark = pytest.mark.slow

NANOCHAT = str(Path(sys.executable).parent / "nanochat")
STAGES = ("base", "mid", "sft")
SMALL = [
    "model.depth=2", "model.head_dim=32", "tokenizer.vocab_size=512", "tokenizer.max_chars=400000",
    "train.seq_len=64", "train.device_batch_size=4", "train.total_batch_size=512", "train.max_steps=40",
    "train.checkpoint_every=10", "train.eval_every=-1", "train.eval_tokens=1024", "eval.loss_tokens=2048",
    "data.docs_per_shard=200", "mid.max_steps=4", "sft.max_steps=4", "mid.device_batch_size=2",
    "mid.tokens_per_step=256", "sft.device_batch_size=2", "sft.tokens_per_step=256",
    "chat_eval.max_problems=4", "chat_eval.max_new_tokens=8", "log.tensorboard=false",
]


def speedrun(storage: Path, workdir: Path, *options: str, stderr=subprocess.DEVNULL, env: dict | None = None,
             **popen) -> subprocess.Popen:
    args = [NANOCHAT, "speedrun", "--preset", "tiny-cpu", "--storage", str(storage), *options]
    for item in SMALL:
        args += ["--set", item]
    return subprocess.Popen(args, cwd=workdir, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, "NANOCHAT_STORAGE": str(storage), **(env or {})}, **popen)


def scrape_while_running(proc: subprocess.Popen, url: str, name: str) -> list[str]:
    """The samples of metric `name` seen at url, read every 0.2 s on a thread until proc ends."""
    seen: list[str] = []

    def scrape() -> None:
        while proc.poll() is None:
            try:
                text = urllib.request.urlopen(url, timeout=2).read().decode()
            except OSError:  # the cluster has not started yet, or has just stopped
                text = ""
            seen.extend(line for line in text.splitlines() if line.startswith(name + "{"))
            time.sleep(0.2)

    threading.Thread(target=scrape, daemon=True).start()
    return seen


def test_an_interrupted_speedrun_continues_where_it_stopped(tmp_path):
    storage, workdir = tmp_path / "storage", tmp_path / "work"
    workdir.mkdir()
    first = speedrun(storage, workdir, start_new_session=True)
    base = storage / "runs" / "default" / "base"
    deadline = time.time() + 240
    while time.time() < deadline and not (base / "latest").exists():
        assert first.poll() is None, "the first run ended before base training wrote a checkpoint"
        time.sleep(0.5)
    assert (base / "latest").exists(), "base training wrote no checkpoint in 240 s"
    os.killpg(first.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    first.wait(timeout=120)
    assert not (base / "DONE.json").exists(), "interrupted before base finished"

    metrics_port = free_port()
    # Ray's agent exports each worker's metrics every 10 s by default, longer than the tiny stages last
    second = speedrun(storage, workdir, "--metrics-port", str(metrics_port), stderr=subprocess.PIPE,
                      env={"RAY_metrics_report_interval_ms": "200"})
    losses = scrape_while_running(second, f"http://127.0.0.1:{metrics_port}/metrics", "ray_nanochat_train_loss")
    out, err = second.communicate(timeout=900)
    assert second.returncode == 0, out[-3000:] + err[-3000:]
    # the embedded cluster runs without the dashboard, and Ray Train's placement-group cleaner, which would
    # warn every second that the state API is missing, stays quiet
    assert "View the dashboard" not in err and "State API" not in err, err[-3000:]
    assert "speedrun: data: skipped (complete)" in out
    assert "speedrun: tokenizer: skipped (current)" in out
    done = json.loads((base / "DONE.json").read_text())["summary"]
    assert done["steps"] == 40 and done["metrics"]["resumed_from"], "base resumed from its checkpoint"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stage"] == "speedrun" and result["steps"] == 40
    outcomes = {name: entry["outcome"] for name, entry in result["metrics"]["stages"].items()}
    # each training job also evaluated its final checkpoint, so the evaluation stages found their results
    assert outcomes["base"] == "done (and its loss evaluation)"
    assert outcomes["mid"] == outcomes["sft"] == "done (and its chat evaluation)"
    for stage, kind, step in [("base", "loss", 40), ("mid", "chat", 4), ("sft", "chat", 4)]:
        assert outcomes[f"{stage} {kind if kind == 'loss' else 'chat eval'}"] == f"done in the {stage} training job"
        assert json.loads((storage / "runs" / "default" / "evals" / f"{stage}_{kind}.json").read_text())["step"] == step
    stages = {stage for stage in STAGES if any(f'stage="{stage}"' in line and 'run="default"' in line
                                                 for line in losses)}
    assert stages == set(STAGES), f"training losses seen at --metrics-port for {stages} only: {losses[-3:]}"
    report = (workdir / "report.md").read_text()
    assert "## Speedrun" in report and (workdir / "report" / "loss.png").stat().st_size > 0
