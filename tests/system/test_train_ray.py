"""Base pretraining as a real Ray Train job: 2 CPU workers, checkpoints in a real S3 server (moto), resume,
and a worker crash restarted by Ray Train that continues exactly where an uninterrupted run would be, with
the optimizer state replicated (DDP) or sharded (train.shard_optimizer)."""

import json
import tempfile
from pathlib import Path

import pytest

from nanochat.checkpoint import read_checkpoint
from nanochat.config import load_config
from services.checkpoints import CheckpointManager
from services.storage import open_storage
from tests.support.s3 import create_bucket, set_s3_env
from trainer.data.corpus import prepare_corpus
from trainer.data.tokenizer import train_tokenizer
from trainer.pipeline.jobs import run_stage, stage_function
from trainer.stages.base import train_base

pytestmark = pytest.mark.slow

# the tiny preset, shrunk so each step takes tens of milliseconds: what is tested is the machinery
SMALL = [
    "model.depth=2", "model.head_dim=32", "tokenizer.vocab_size=512", "tokenizer.max_chars=400000",
    "train.seq_len=64", "train.device_batch_size=4", "train.total_batch_size=512", "train.max_steps=12",
    "train.checkpoint_every=4", "train.eval_every=6", "train.eval_tokens=1024", "train.workers=2",
    "train.keep_checkpoints=5", "log.tensorboard=false", "data.docs_per_shard=80", "data.row_group_size=16",
]


def config(run: str, *extra: str):
    return load_config(preset="tiny-cpu", overrides=[*SMALL, f"run={run}", *extra])


def history(storage, run: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        step, folder = CheckpointManager(storage, run, "base").latest_valid(Path(tmp))
        return read_checkpoint(folder, load_optimizer=False).meta["history"]


@pytest.fixture(scope="module")
def s3_storage(s3_server):
    """One bucket for the module, with the AWS variables set before Ray starts (workers inherit them)."""
    with pytest.MonkeyPatch.context() as mp:
        set_s3_env(mp, s3_server)
        bucket = create_bucket(s3_server)
        storage = open_storage(f"s3://{bucket}/nanochat")
        cfg = config("prep")
        prepare_corpus(cfg.data, storage, limit=240)
        train_tokenizer(cfg, storage)
        yield storage


@pytest.fixture(scope="module")
def reference(s3_storage):
    """An uninterrupted 12-step run: its summary and per-step losses."""
    summary = run_stage("base", train_base, config("reference"), s3_storage, show_progress=False)
    return summary, history(s3_storage, "reference")


def test_training_writes_checkpoints_into_the_bucket(s3_storage, reference):
    summary, steps = reference
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 512
    assert summary["tokens_per_second"] > 0 and summary["metrics"]["resumed_from"] == []
    keys = s3_storage.list("runs/reference/base/")
    for step in (4, 8, 12):
        assert f"runs/reference/base/step_{step:06d}/manifest.json" in keys
        assert f"runs/reference/base/step_{step:06d}/model.safetensors" in keys
    assert s3_storage.read_text("runs/reference/base/latest").strip() == "step_000012"
    assert [h["step"] for h in steps] == list(range(1, 13))
    assert steps[-1]["loss"] < steps[0]["loss"], "the model should learn something in 12 steps"
    json.dumps(summary)  # the stage's JSON line


def test_second_run_resumes_past_a_truncated_newest_checkpoint(s3_storage, reference):
    # damage the newest checkpoint as an interrupted upload would: its manifest no longer matches
    key = "runs/reference/base/step_000012/model.safetensors"
    s3_storage.write_bytes(key, s3_storage.read_bytes(key)[:1000])
    summary = run_stage("base", train_base, config("reference", "train.max_steps=16"), s3_storage, show_progress=False)
    assert summary["metrics"]["resumed_from"] == [8], "step 12 is damaged: the previous checkpoint is used"
    assert summary["steps"] == 16
    assert "runs/reference/base/step_000016/manifest.json" in s3_storage.list("runs/reference/base/")
    resumed = history(s3_storage, "reference")
    assert resumed[:8] == reference[1][:8], "the history before the resume is carried over, not recomputed"
    assert [h["step"] for h in resumed] == list(range(1, 17))


def test_crashed_worker_is_restarted_and_continues_exactly(s3_storage, reference):
    # rank 1 calls os._exit(1) before step 10 (once); Ray Train restarts the group, which resumes
    # from the newest valid checkpoint (step 8) and must reproduce the uninterrupted losses
    summary = run_stage("base", train_base, config("crash"), s3_storage, fail_at_step=9, show_progress=False)
    assert s3_storage.exists("runs/crash/base/fault_injected_at_9")
    assert summary["metrics"]["resumed_from"] == [8]
    crashed, uninterrupted = history(s3_storage, "crash"), reference[1]
    assert [h["step"] for h in crashed] == list(range(1, 13))
    for ours, theirs in zip(crashed, uninterrupted):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5), f"step {ours['step']}"


def test_sharded_optimizer_state_trains_as_ddp_and_resumes_after_a_crash(s3_storage, reference):
    # train.shard_optimizer: no DDP, each worker keeps half the optimizer state; the same crash at step 9
    # resumes from the gathered step-8 checkpoint, and every step's loss is the DDP reference's
    cfg = config("sharded", "train.shard_optimizer=true")
    summary = run_stage("base", train_base, cfg, s3_storage, fail_at_step=9, show_progress=False)
    assert summary["metrics"]["resumed_from"] == [8]
    replicated = reference[0]["metrics"]["optimizer_state_bytes"]
    assert len(set(replicated)) == 1, "under DDP every worker holds all of it"
    halves = summary["metrics"]["optimizer_state_bytes"]
    assert sum(halves) == replicated[0] and all(0.3 * replicated[0] < h < 0.7 * replicated[0] for h in halves)
    sharded, uninterrupted = history(s3_storage, "sharded"), reference[1]
    assert [h["step"] for h in sharded] == list(range(1, 13))
    for ours, theirs in zip(sharded, uninterrupted):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5), f"step {ours['step']}"
    with tempfile.TemporaryDirectory() as tmp:
        _, folder = CheckpointManager(s3_storage, "sharded", "base").latest_valid(Path(tmp))
        ckpt = read_checkpoint(folder)
        saved = [len(s["state"]["state"]) for s in ckpt.optimizer_state["optimizers"]]
        assert sum(saved) == len(ckpt.model_state), "the checkpoint holds every parameter's state, as unsharded"


def test_mid_and_sft_continue_from_the_previous_stage(s3_storage, reference):
    chat = ["mid.max_steps=3", "sft.max_steps=4", "mid.tasks={identity: 1, simple-spelling: 1}",
            "sft.tasks={identity: 1, smoltalk: 1}", "mid.device_batch_size=1", "mid.tokens_per_step=256",
            "sft.device_batch_size=2", "sft.tokens_per_step=256", "train.checkpoint_every=2"]
    cfg = config("reference", *chat)
    mid = run_stage("mid", stage_function("mid", cfg), cfg, s3_storage, show_progress=False)
    assert mid["steps"] == 3 and mid["metrics"]["mixture"] == {"identity": 1000, "simple-spelling": 10000}
    base_step = CheckpointManager(s3_storage, "reference", "base").latest_step()  # other tests train it on
    assert mid["metrics"]["optimizer_from"] == f"base step {base_step}"  # the momentum base training ended with
    # a worker dies as soon as step 2's checkpoint is reported: the checkpoint is whole (every rank waits for
    # rank 0's upload), SFT resumes from it and still knows where its momentum came from
    sft = run_stage("sft", stage_function("sft", cfg), cfg, s3_storage, fail_at_step=2, show_progress=False)
    assert sft["steps"] == 4 and sft["metrics"]["resumed_from"] == [2]
    assert sft["metrics"]["optimizer_from"] == "mid step 3"
    assert "smoltalk" in sft["metrics"]["skipped_tasks"], "offline, SmolTalk is skipped with its reason"
    keys = s3_storage.list("runs/reference/")
    assert "runs/reference/mid/step_000003/manifest.json" in keys
    assert "runs/reference/sft/step_000004/manifest.json" in keys
