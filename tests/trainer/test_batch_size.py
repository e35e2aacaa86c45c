"""train.device_batch_size = 0 (auto): the choice from a measured memory profile (a pure function, figures
worked by hand), the CPU fallback, the config's checks, and a tiny CPU run that trains at the fallback
exactly as at the same size set by hand."""

from pathlib import Path

import pytest
import torch

from nanochat.config import ConfigError, load_config
from services.storage import LocalStorage
from trainer.batch_size import (
    GIB,
    MemoryProfile,
    fallback_rows,
    rows_per_worker,
    rows_that_fit,
    smaller_divisors,
    unseen_bytes,
)
from trainer.data.corpus import prepare_corpus
from trainer.data.tokenizer import load_tokenizer, train_tokenizer
from trainer.optim import apply_schedule, build_optimizers
from trainer.stages.base import BaseStage
from trainer.stages.loop import StepHooks, TrainState, step_loop
from trainer.worker import Worker

PROFILE = MemoryProfile(fixed_bytes=10 * GIB, bytes_per_row=2 * GIB)


# (capacity GiB, rows per worker per step) -> rows: the budget is 85% of capacity; 10 + 2 r GiB must fit it
@pytest.mark.parametrize("capacity, per_step, rows", [
    (80, 64, 16),   # budget 68 GiB: up to 29 rows, 16 the largest divisor of 64
    (141, 64, 32),  # an H200: budget 119.85 GiB, up to 54 rows
    (80, 48, 24),   # divisors of 48 below 29: 24
    (80, 8, 8),     # everything fits: no accumulation
    (80, 7, 7),
    (15, 64, 1),    # budget 12.75 GiB: one row (two take 14 GiB)
])
def test_the_largest_divisor_that_fits_the_headroom(capacity, per_step, rows):
    assert rows_that_fit(PROFILE, capacity * GIB, per_step) == rows


def test_a_model_too_large_for_one_row_is_a_clear_error():
    with pytest.raises(ValueError, match=r"train\.device_batch_size=0 \(auto\): one row .* 12\.0 GiB.* 12\.0 GiB"):
        rows_that_fit(PROFILE, 12 * GIB, 64)


def test_headroom_is_a_parameter_of_the_choice():
    assert rows_that_fit(PROFILE, 80 * GIB, 64, headroom=1.0) == 32  # 10 + 2 x 32 = 74 <= 80
    assert PROFILE.peak(32) == 74 * GIB


@pytest.mark.parametrize("per_step, rows", [(64, 8), (12, 6), (9, 3), (7, 7), (1, 1)])
def test_cpu_fallback_is_the_largest_divisor_up_to_eight(per_step, rows):
    assert fallback_rows(per_step) == rows


def test_step_down_order_and_rows_per_worker():
    assert smaller_divisors(16, 64) == [16, 8, 4, 2, 1]
    assert smaller_divisors(6, 12) == [6, 4, 3, 2, 1]
    assert rows_per_worker(2**20, 2048, 8) == 64


def test_what_a_probe_cannot_see_is_the_optimizer_state_and_ddp_buckets():
    model = torch.nn.Linear(256, 128, bias=False)  # 32768 float32 weights: 128 KiB
    assert unseen_bytes(model, ddp=False) == 2 * 131072
    assert unseen_bytes(model, ddp=True) == 3 * 131072


def test_auto_validates_when_the_batch_splits_into_whole_rows_per_worker():
    cfg = load_config(preset="tiny-cpu", overrides=["train.device_batch_size=0"])
    assert cfg.train.device_batch_size == 0
    with pytest.raises(ConfigError, match=r"train\.device_batch_size=0 \(auto\).*train\.seq_len \* train\.workers \(1024\)"):
        load_config(preset="tiny-cpu", overrides=["train.device_batch_size=0", "train.total_batch_size=4608"])
    with pytest.raises(ConfigError, match=r"train\.device_batch_size=0 \(auto\) is for the torch backend"):
        load_config(preset="tiny-cpu", overrides=["train.device_batch_size=0", "train.backend=jax"])
    with pytest.raises(ConfigError, match=r"train\.device_batch_size"):
        load_config(preset="tiny-cpu", overrides=["train.device_batch_size=-1"])


SMALL = ["model.depth=2", "model.head_dim=32", "tokenizer.vocab_size=512", "tokenizer.max_chars=400000",
         "train.seq_len=64", "train.total_batch_size=2048", "train.max_steps=3", "data.docs_per_shard=80",
         "data.row_group_size=16", "train.workers=1"]


def losses(cfg, storage: LocalStorage) -> tuple[int, int, list[float]]:
    """(rows, micro-steps, losses) of a short base run on a CPU worker."""
    stage = BaseStage(cfg, Worker(0, 1, torch.device("cpu")), storage, load_tokenizer(storage))
    torch.manual_seed(cfg.train.seed)
    model = stage.build_model().train()
    optim_cfg = stage.optim_config()
    optimizers = build_optimizers(model, optim_cfg)
    forward = stage.wrap(model)
    stage.size_batch(forward, model)
    loader, horizon, state = stage.make_loader(None), stage.horizon(model), TrainState()
    step_loop(state, horizon, StepHooks(
        schedule=lambda step: apply_schedule(optimizers, step, horizon, optim_cfg),
        train=lambda schedule: stage.train_step(forward, model, optimizers, loader),
        evaluates_at=lambda step: False, evaluate=dict, publish=lambda metrics: None,
    ))
    return stage.rows, stage.micro_steps(), [entry["loss"] for entry in state.history]


def test_auto_on_a_cpu_trains_exactly_as_the_fallback_set_by_hand(tmp_path: Path):
    """2048 tokens a step in rows of 64: 32 rows, auto takes 8 of them per micro-step, in 4 micro-steps."""
    storage = LocalStorage(tmp_path)
    auto = load_config(preset="tiny-cpu", overrides=[*SMALL, "train.device_batch_size=0"])
    prepare_corpus(auto.data, storage, limit=240)
    train_tokenizer(auto, storage)
    rows, micro_steps, auto_losses = losses(auto, storage)
    assert (rows, micro_steps) == (8, 4)
    by_hand = losses(load_config(preset="tiny-cpu", overrides=[*SMALL, "train.device_batch_size=8"]), storage)
    assert by_hand == (8, 4, auto_losses)
