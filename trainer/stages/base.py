"""
Base pretraining: next-token prediction on the corpus, from freshly initialised weights.

Notable:
- the horizon comes from the depth dial (tokens = train.target_param_data_ratio x scaling params, as nanochat)
  unless train.max_steps is set; gradient accumulation fills train.total_batch_size
- data: the resumable best-fit packing loader over this rank's share of the corpus' row groups; on a GPU
  it makes the next TRAIN_PREFETCH batches in a background thread while the GPU computes (on a CPU the
  step itself uses the cores, so there is nothing to overlap with)
- validation bits per byte every train.eval_every steps and at the end
- train.recipe = record: nanochat's transfer from its d12 tuning (depth_scaling): learning rates x
  sqrt(B / 2**19), Muon weight decay x sqrt(B / 2**19) x D_d12 / D, with D the horizon in tokens at
  train.target_param_data_ratio; the GPU presets' total_batch_size is nanochat's optimum for their depth
- train.device_batch_size = 0: the rows per micro-step are measured on the GPU once the model is wrapped
  (trainer/batch_size.py), the same on every rank; gradient accumulation follows from them
- train.fp8: the Linear layers become torchao Float8Linear before compile and DDP (trainer/fp8.py); a worker
  without an FP8-capable GPU stops at once, naming its device. In-training validation runs through the same
  FP8 matmuls; `eval loss` on the checkpoint (plain weights) does not
The loop itself (DDP, checkpoints, resume, metrics) is trainer/stages/loop.py.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nanochat.config import Config
from nanochat.gpt import GPT, GPTConfig
from trainer import fp8
from trainer.batch_size import choose_rows, fallback_rows, rows_per_worker
from trainer.data.corpus import list_shards, split_shards
from trainer.data.loader import DataLoader, token_bytes
from trainer.evals.loss import evaluate_bpb
from trainer.optim import (
    OptimConfig,
    batch_lr_scale,
    grad_accum_steps,
    num_scaling_params,
    optim_config,
    optimal_batch_size,
    scaled_weight_decay,
    training_horizon,
)
from trainer.stages.loop import Stage, train_stage
from trainer.worker import WorkerSettings

log = logging.getLogger(__name__)

# batches the training loader makes ahead on a GPU: a whole step's micro-batches at the presets' two
# micro-steps, so the first one is ready when the step's sync point returns
TRAIN_PREFETCH = 2

REFERENCE_DEPTH = 12  # nanochat tuned its learning rates, weight decay and batch size at d12


def model_config(cfg: Config, vocab_size: int, depth: int | None = None) -> GPTConfig:
    """The model section as a GPTConfig (at another depth of the same dial when depth is given)."""
    m = cfg.model
    return GPTConfig.from_depth(
        depth or m.depth, vocab_size=vocab_size, sequence_len=cfg.train.seq_len, head_dim=m.head_dim,
        aspect_ratio=m.aspect_ratio, n_kv_head=m.n_kv_head, window_pattern=m.window_pattern,
        softcap=m.softcap, rope_base=m.rope_base, qk_scale=m.qk_scale, norm=m.norm, activation=m.activation,
        qk_norm=m.qk_norm, attention=m.attention, smear=m.smear, backout=m.backout,
    )


class DepthScaling(NamedTuple):
    """nanochat's transfer of its d12 settings to another depth (train.recipe = record)."""

    optimal_batch_size: int  # tokens per step nanochat would choose for this horizon
    lr_scale: float  # every learning rate is multiplied by it
    weight_decay: float  # Muon's weight decay at step 0


def depth_scaling(cfg: Config, vocab_size: int) -> DepthScaling:
    """The batch size, learning-rate factor and weight decay nanochat derives for cfg's depth from its d12
    reference: D and D_ref are each model's horizon at train.target_param_data_ratio (so the ratio cancels
    out of the batch size and the decay), B is train.total_batch_size."""
    t = cfg.train

    def horizon_tokens(depth: int) -> float:
        with torch.device("meta"):  # shapes only: counting parameters allocates nothing
            return t.target_param_data_ratio * num_scaling_params(GPT(model_config(cfg, vocab_size, depth)))

    target, reference = horizon_tokens(cfg.model.depth), horizon_tokens(REFERENCE_DEPTH)
    return DepthScaling(
        optimal_batch_size(target, reference),
        batch_lr_scale(t.total_batch_size),
        scaled_weight_decay(t.weight_decay, t.total_batch_size, target, reference),
    )


class BaseStage(Stage):
    name = "base"

    def __init__(self, *args: Any):
        super().__init__(*args)
        if self.cfg.train.fp8:
            fp8.require_device(self.worker.device)  # before anything is loaded
        shards = list_shards(self.storage, self.cfg.data.corpus_name)
        self.train_shards, self.val_shards = split_shards(shards, self.cfg.data.val_shards)
        self.rows = self.cfg.train.device_batch_size  # rows per micro-step; 0 (auto) until size_batch

    def build_model(self) -> GPT:
        model = GPT(model_config(self.cfg, self.tokenizer.vocab_size))
        model.init_weights()
        return model

    def optim_config(self) -> OptimConfig:
        if self.cfg.train.recipe == "classic":
            return optim_config(self.cfg)
        scaling = depth_scaling(self.cfg, self.tokenizer.vocab_size)
        if self.worker.is_main:
            log.info("recipe record: learning rates x %.4f, Muon weight decay %.4f (from %.2f at d%d); "
                     "%d tokens per step (nanochat's optimum for this depth: %d)", scaling.lr_scale,
                     scaling.weight_decay, self.cfg.train.weight_decay, REFERENCE_DEPTH,
                     self.cfg.train.total_batch_size, scaling.optimal_batch_size)
        return optim_config(self.cfg, lr_frac=scaling.lr_scale, weight_decay=scaling.weight_decay)

    def wrap(self, model: GPT) -> nn.Module:
        if self.cfg.train.fp8:
            if self.cfg.train.compile is False:
                log.warning("train.fp8 without torch.compile: the float8 casts run as separate kernels, slower than bf16")
            fp8.convert(model)
        return super().wrap(model)

    def size_batch(self, forward: nn.Module, model: GPT) -> None:
        if self.rows:
            return
        t, w = self.cfg.train, self.worker
        per_step = rows_per_worker(t.total_batch_size, t.seq_len, w.world_size)
        if w.device.type == "cuda":
            module = forward.module if isinstance(forward, DistributedDataParallel) else forward
            rows = choose_rows(module, model, t.seq_len, self.tokenizer.vocab_size, per_step, w.device,
                               w.autocast, ddp=w.world_size > 1)
        else:
            rows = fallback_rows(per_step)
        self.rows = min(w.all_gather(rows))  # ranks whose GPUs differ train at the smallest choice
        if w.is_main:
            log.info("train.device_batch_size auto: %d rows of %d tokens per worker per micro-step, %d micro-steps",
                     self.rows, t.seq_len, self.micro_steps())

    def _loader(self, shards: list[str], cursor: dict | None, loop: bool, prefetch: int = 0) -> DataLoader:
        t, w = self.cfg.train, self.worker
        return DataLoader(self.storage, shards, self.tokenizer, batch_size=self.rows, seq_len=t.seq_len,
                          rank=w.rank, world_size=w.world_size, device=w.device, state=cursor, loop=loop,
                          prefetch=prefetch)

    def make_loader(self, cursor: dict | None) -> DataLoader:
        prefetch = TRAIN_PREFETCH if self.worker.device.type == "cuda" else 0
        return self._loader(self.train_shards, cursor, loop=True, prefetch=prefetch)

    def horizon(self, model: GPT) -> int:
        t = self.cfg.train
        if t.max_steps > 0:
            return t.max_steps
        return training_horizon(num_scaling_params(model), t.target_param_data_ratio, t.total_batch_size).num_steps

    def micro_steps(self) -> int:
        t = self.cfg.train
        return grad_accum_steps(t.total_batch_size, self.rows, t.seq_len, self.worker.world_size)

    def eval_every(self) -> int:
        return self.cfg.train.eval_every

    def evaluate(self, model: GPT) -> dict[str, float]:
        t, w = self.cfg.train, self.worker
        steps = max(1, t.eval_tokens // (self.rows * t.seq_len * w.world_size))
        val = self._loader(self.val_shards, None, loop=False)
        with w.autocast():
            bpb = evaluate_bpb(model, iter(val), steps, token_bytes(self.tokenizer).to(w.device))
        return {"val_bpb": bpb}


def train_base(settings: WorkerSettings) -> None:
    """Ray Train's train_loop_per_worker for `nanochat train base`."""
    train_stage(settings, BaseStage)


