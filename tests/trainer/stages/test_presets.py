"""Every preset's stages configure at the preset's own worker count: the batch split each stage's workers
would compute first, without a GPU or a Ray cluster (a GPU preset that stops after base pretraining is
found here, not hours into a cluster run)."""

import math
from types import SimpleNamespace

import pytest

from nanochat.config import available_presets, load_config
from trainer.batch_size import divisors, rows_per_worker
from trainer.optim import MUON_BETA2, grad_accum_steps, optim_config
from trainer.stages.base import BaseStage, depth_scaling
from trainer.stages.chat import MidStage, SFTStage, chat_batch_plan
from trainer.stages.rl import prompts_per_worker, rl_optim_config
from trainer.stages.table import stage_backend


@pytest.mark.parametrize("preset", available_presets())
def test_every_stage_of_the_preset_splits_its_batch_over_the_preset_workers(preset):
    cfg = load_config(preset=preset)
    t, workers = cfg.train, cfg.train.workers
    if stage_backend("base", cfg.train.backend) == "torch":
        # auto (0): measured on a GPU from the divisors of the rows per worker; every one of them splits
        choices = divisors(rows_per_worker(t.total_batch_size, t.seq_len, workers)) if t.device_batch_size == 0 \
            else [t.device_batch_size]
        for rows in choices:
            accum = grad_accum_steps(t.total_batch_size, rows, t.seq_len, workers)
            assert accum * rows * t.seq_len * workers == t.total_batch_size
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


# -----------------------------------------------------------------------------
# nanochat's record recipe in the GPU presets

# preset: (Muon weight decay nanochat derives for the depth from 0.28 at d12, tokens per parameter)
RECORD_PRESETS = {"d20": (0.100, 10.5), "d24": (0.060, 8), "d26": (0.048, 10.5)}


@pytest.mark.parametrize("preset", RECORD_PRESETS)
def test_record_presets_resolve_to_nanochats_batch_learning_rate_and_weight_decay(preset):
    cfg = load_config(preset=preset)
    weight_decay, ratio = RECORD_PRESETS[preset]
    scaling = depth_scaling(cfg, cfg.tokenizer.vocab_size)
    assert cfg.train.total_batch_size == scaling.optimal_batch_size == 2**20  # the 1M-token batch
    assert scaling.lr_scale == pytest.approx(1.414, abs=1e-3)
    assert scaling.weight_decay == pytest.approx(weight_decay, abs=1e-3)
    assert cfg.train.target_param_data_ratio == ratio
    assert (cfg.train.recipe, cfg.model.rope_base, cfg.model.qk_scale, cfg.data.source) == (
        "record", 100000, 1.2, "climbmix")
    assert cfg.train.workers == 8


def test_d24_is_nanochats_time_to_gpt2_record_run():
    cfg = load_config(preset="d24")
    assert (cfg.model.depth, cfg.model.window_pattern, cfg.train.seq_len) == (24, "SSSL", 2048)
    assert (cfg.model.aspect_ratio, cfg.model.head_dim, cfg.tokenizer.vocab_size) == (64, 128, 32768)


@pytest.mark.parametrize("preset", RECORD_PRESETS)
def test_record_presets_train_the_sssl_windows_through_the_kernel_that_skips_masked_work(preset):
    model = load_config(preset=preset).model
    assert (model.window_pattern, model.attention) == ("SSSL", "auto")  # auto: FlexAttention for S layers on a GPU


@pytest.mark.parametrize("preset", available_presets())
def test_a_recipe_record_preset_trains_at_the_batch_nanochat_derives(preset):
    cfg = load_config(preset=preset)
    if cfg.train.recipe == "record":
        assert cfg.train.total_batch_size == depth_scaling(cfg, cfg.tokenizer.vocab_size).optimal_batch_size


def test_base_pretraining_trains_d24_at_the_scaled_rates_and_tiny_cpu_as_before():
    d24, tiny = load_config(preset="d24"), load_config(preset="tiny-cpu")

    def stage(cfg):
        return SimpleNamespace(cfg=cfg, worker=SimpleNamespace(is_main=True),
                               tokenizer=SimpleNamespace(vocab_size=cfg.tokenizer.vocab_size))

    record = BaseStage.optim_config(stage(d24))
    t = d24.train
    assert (record.recipe, record.muon_beta2) == ("record", 0.9)
    for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr"):
        assert getattr(record, name) == pytest.approx(getattr(t, name) * 2**0.5)
    assert record.weight_decay == pytest.approx(0.0597, abs=1e-4)
    assert BaseStage.optim_config(stage(tiny)) == optim_config(tiny)  # classic: the train section as given
    assert (optim_config(tiny).recipe, optim_config(tiny).weight_decay) == ("classic", 0.28)


@pytest.mark.parametrize("preset", ["tiny-cpu", "d24"])
def test_chat_stages_train_without_weight_decay_on_their_own_schedules(preset):
    """Mid and SFT: Muon weight decay 0 (as nanochat's SFT and our RL; pretraining ends with it at 0), the
    recipe's AdamW groups and NorMuon beta2, and each stage's own schedule from its config section."""
    cfg = load_config(preset=preset)
    mid = MidStage.optim_config(SimpleNamespace(cfg=cfg, stage_cfg=cfg.mid))
    sft = SFTStage.optim_config(SimpleNamespace(cfg=cfg, stage_cfg=cfg.sft))
    for ocfg, stage in ((mid, cfg.mid), (sft, cfg.sft)):
        assert ocfg.weight_decay == 0.0 and ocfg.recipe == cfg.train.recipe
        assert ocfg.muon_beta2 == MUON_BETA2[cfg.train.recipe]
        assert ocfg.matrix_lr == pytest.approx(cfg.train.matrix_lr * stage.lr_frac)
    assert (mid.warmup_ratio, mid.warmdown_ratio, mid.final_lr_frac) == (0.0, 0.2, 0.0)
    assert (sft.warmup_ratio, sft.warmdown_ratio, sft.final_lr_frac) == (0.0, 1.0, 0.0)
    assert rl_optim_config(cfg).weight_decay == 0.0


def test_d20_fixes_a_device_batch_for_80_gb_and_d24_d26_measure_theirs():
    """d20 at nanochat's 32 rows measured 86 GiB on one H200: 16 rows in 4 micro-steps; the larger presets
    choose on the GPU they get (trainer/batch_size.py)."""
    d20 = load_config(preset="d20").train
    assert (d20.device_batch_size, grad_accum_steps(d20.total_batch_size, 16, d20.seq_len, d20.workers)) == (16, 4)
    assert [load_config(preset=p).train.device_batch_size for p in ("d24", "d26")] == [0, 0]
