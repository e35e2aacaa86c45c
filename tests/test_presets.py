"""Every preset's stages configure at the preset's own worker count: the batch split each stage's workers
would compute first, without a GPU or a Ray cluster (a GPU preset that stops after base pretraining is
found here, not hours into a cluster run)."""

import math

import pytest

from nanochat.config import available_presets, load_config
from trainer.chat_train import chat_batch_plan
from trainer.optim import grad_accum_steps
from trainer.rl_train import prompts_per_worker
from trainer.runner import stage_backend


@pytest.mark.parametrize("preset", available_presets())
def test_every_stage_of_the_preset_splits_its_batch_over_the_preset_workers(preset):
    cfg = load_config(preset=preset)
    t, workers = cfg.train, cfg.train.workers
    if stage_backend("base", cfg) == "torch":
        accum = grad_accum_steps(t.total_batch_size, t.device_batch_size, t.seq_len, workers)
        assert accum * t.device_batch_size * t.seq_len * workers == t.total_batch_size
    else:
        from trainer.jaxgpt.train import micro_steps

        chips = math.prod(int(n) for n in cfg.jax.tpu_topology.split("x")) if cfg.jax.tpu_topology else 1
        assert micro_steps(cfg, chips) >= 1
    for name in ("mid", "sft"):
        stage_cfg = getattr(cfg, name)
        plan = chat_batch_plan(stage_cfg, t.seq_len, workers)
        assert 1 <= plan.rows <= stage_cfg.device_batch_size
        assert plan.tokens_per_step == plan.rows * plan.micro_steps * t.seq_len * workers
        # the budget to within one row per worker per micro-step
        assert abs(plan.tokens_per_step - stage_cfg.tokens_per_step) <= plan.micro_steps * t.seq_len * workers
    assert prompts_per_worker(cfg.rl, workers) * workers >= cfg.rl.prompts_per_step


# 20,000 tokens in rows of 512, at most 3 rows per micro-step: (workers, rows, micro-steps), by hand
@pytest.mark.parametrize("workers, rows, micro_steps", [(1, 3, 13), (2, 3, 7), (3, 3, 5), (5, 3, 3), (8, 3, 2),
                                                         (64, 1, 1)])
def test_a_chat_budget_splits_over_any_worker_count(workers, rows, micro_steps):
    cfg = load_config(preset="tiny-cpu", overrides=["mid.tokens_per_step=20000", "mid.device_batch_size=3"])
    plan = chat_batch_plan(cfg.mid, cfg.train.seq_len, workers)
    assert (plan.rows, plan.micro_steps) == (rows, micro_steps)
    assert plan.tokens_per_step == rows * micro_steps * 512 * workers


def test_a_small_budget_still_gives_every_worker_a_row():
    cfg = load_config(preset="tiny-cpu", overrides=["sft.tokens_per_step=1"])
    plan = chat_batch_plan(cfg.sft, cfg.train.seq_len, 8)
    assert (plan.rows, plan.micro_steps, plan.tokens_per_step) == (1, 1, 8 * 512)
