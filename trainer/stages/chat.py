"""
Chat stages: midtraining and supervised fine-tuning on conversations, from the previous stage's weights.

Notable:
- the data: a task mixture (mid.tasks / sft.tasks, with weights) in one fixed shuffled order, packed into
  rows by trainer/data/conversations.py (the loss on assistant tokens only; exact resume)
- a step is a token budget (tokens_per_step), not a count of conversations: whole conversations are packed
  into rows of train.seq_len tokens, and the rows per worker and micro-steps follow from the budget and
  the worker count (chat_batch_plan), so every preset's stages run at its own worker count
- tasks whose data cannot be had (offline, no local files) are left out with the reason logged and recorded
- mid starts from base; sft from mid (or base when there is no mid); the optimizers from the state that
  checkpoint saved (momentum and moments: fresh ones would spend their first steps estimating them again),
  or fresh ones with warm_start_optimizer false or when the state is not the same optimizers'; learning rates
  are the base ones times lr_frac (not the batch-scaled ones of recipe record: nanochat's SFT takes the
  base run's unscaled settings too), on the stage's own schedule (warmup, warmdown, final_lr_frac; mid
  holds them and falls over its last 20%, sft falls linearly to zero), Muon weight decay 0 by default
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from nanochat.checkpoint import model_from_checkpoint
from nanochat.config import ChatStageConfig, Config
from nanochat.gpt import GPT
from services.checkpoints import CheckpointManager
from services.layout import run_prefix
from trainer.data.conversations import ConversationLoader, mixture_tokens
from trainer.optim import OptimConfig, optim_config, warm_start_optimizers
from trainer.stages.loop import Stage, TrainState, train_stage
from trainer.stages.table import STAGES
from trainer.tasks import build_mixture
from trainer.tasks.base import TaskMixture, TaskUnavailable
from trainer.worker import WorkerSettings

log = logging.getLogger(__name__)

VAL_CONVERSATIONS = 32  # per task per evaluation, across all ranks


def stage_mixture(stage_cfg: ChatStageConfig, cfg: Config, split: str, storage, max_examples: int = -1
                  ) -> tuple[TaskMixture, dict[str, str]]:
    """The stage's weighted mixture of the tasks that can be had, and {task: reason} for those that cannot."""
    cap = max_examples if max_examples >= 0 else stage_cfg.max_examples
    mixture, skipped = build_mixture(stage_cfg.tasks, cfg, split, storage, cap)
    if not mixture.tasks:
        raise TaskUnavailable(",".join(stage_cfg.tasks), f"no task of the mixture is available: {skipped}")
    return mixture, skipped


@dataclass(frozen=True)
class ChatBatchPlan:
    """How a chat stage fills its token budget per optimizer step with the workers it has."""

    rows: int  # packed rows of seq_len tokens per worker per micro-step
    micro_steps: int  # gradient accumulation
    tokens_per_step: int  # what a step holds: rows x seq_len x workers x micro_steps (padding included)


def chat_batch_plan(stage_cfg: ChatStageConfig, seq_len: int, world_size: int) -> ChatBatchPlan:
    """The budget (tokens_per_step) split over world_size workers in micro-steps of at most device_batch_size
    rows each; a budget that does not split evenly is rounded to whole rows, at least one per worker, so any
    worker count works."""
    rows_per_step = max(1, round(stage_cfg.tokens_per_step / (seq_len * world_size)))  # per worker
    micro_steps = math.ceil(rows_per_step / stage_cfg.device_batch_size)
    rows = math.ceil(rows_per_step / micro_steps)
    return ChatBatchPlan(rows, micro_steps, rows * micro_steps * seq_len * world_size)


class ChatStage(Stage):
    """Midtraining or SFT; `name` is set by the subclass."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.stage_cfg: ChatStageConfig = getattr(self.cfg, self.name)
        self.started_from: tuple[str, int] | None = None  # (stage, step) of the checkpoint build_model loaded
        self.saved_optimizers: list[dict] | None = None  # that checkpoint's torch optimizer state, until warm_start
        self.mixture, self.skipped = stage_mixture(self.stage_cfg, self.cfg, "train", self.storage)
        self.plan = chat_batch_plan(self.stage_cfg, self.cfg.train.seq_len, self.worker.world_size)
        if self.worker.is_main and self.plan.tokens_per_step != self.stage_cfg.tokens_per_step:
            log.info("%s: %d tokens per step (%d rows x %d tokens x %d workers x %d micro-steps), the nearest "
                     "to %s.tokens_per_step=%d", self.name, self.plan.tokens_per_step, self.plan.rows,
                     self.cfg.train.seq_len, self.worker.world_size, self.plan.micro_steps, self.name,
                     self.stage_cfg.tokens_per_step)

    def build_model(self) -> GPT:
        """The previous stage's newest checkpoint; read with its optimizer state for warm_start when the stage
        warm-starts, so the checkpoint is downloaded and verified once."""
        sources = STAGES[self.name].starts_from
        for previous in sources:
            checkpoints = CheckpointManager(self.storage, self.cfg.run, previous)
            if checkpoints.latest_step() is not None:
                ckpt, step = checkpoints.load_checkpoint(load_optimizer=self.stage_cfg.warm_start_optimizer)
                log.info("%s starts from %s step %d", self.name, previous, step)
                self.started_from = previous, step
                if ckpt.meta.get("backend", "torch") == "torch" and ckpt.optimizer_state is not None:
                    self.saved_optimizers = ckpt.optimizer_state["optimizers"]
                return model_from_checkpoint(ckpt, torch.device("cpu"))
        raise FileNotFoundError(f"{self.name} needs a checkpoint of {' or '.join(sources)} in {run_prefix(self.cfg.run)}")

    def warm_start(self, optimizers: list[torch.optim.Optimizer], resumed: bool) -> str | None:
        """On a fresh start, the optimizer state saved with the checkpoint build_model started from, this
        stage's own settings kept; fresh optimizers, with the reason logged, when it is a JAX run's or other
        optimizers'."""
        saved, self.saved_optimizers = self.saved_optimizers, None  # not needed past this, either way
        if resumed or not self.stage_cfg.warm_start_optimizer or self.started_from is None:
            return None
        previous, step = self.started_from
        try:
            if saved is None:
                raise ValueError("it saved no torch optimizer state")
            warm_start_optimizers(optimizers, saved, self.sharding)
        except ValueError as e:
            log.warning("%s: fresh optimizers, not %s step %d's (%s)", self.name, previous, step, e)
            return None
        log.info("%s: optimizer state from %s step %d", self.name, previous, step)
        return f"{previous} step {step}"

    def optim_config(self) -> OptimConfig:
        s = self.stage_cfg
        return optim_config(self.cfg, lr_frac=s.lr_frac, weight_decay=s.weight_decay, warmup_ratio=s.warmup_ratio,
                            warmdown_ratio=s.warmdown_ratio, final_lr_frac=s.final_lr_frac)

    def make_loader(self, cursor: dict | None) -> ConversationLoader:
        w = self.worker
        return ConversationLoader(self.mixture, self.tokenizer, self.plan.rows, self.cfg.train.seq_len,
                                  w.rank, w.world_size, w.device, state=cursor)

    def horizon(self, model: GPT) -> int:
        if self.stage_cfg.max_steps > 0:
            return self.stage_cfg.max_steps
        tokens = mixture_tokens(self.mixture, self.tokenizer, self.cfg.train.seq_len)
        return max(1, round(tokens / self.plan.tokens_per_step))

    def micro_steps(self) -> int:
        return self.plan.micro_steps

    def eval_every(self) -> int:
        return self.stage_cfg.eval_every

    def summary_extra(self, state: TrainState) -> dict[str, Any]:
        return {"mixture": self.mixture.counts(), "skipped_tasks": self.skipped}

    def evaluate(self, model: GPT) -> dict[str, float]:
        """Mean loss on assistant tokens of held-out conversations (the tasks' test splits where they exist)."""
        try:
            val, _ = stage_mixture(self.stage_cfg, self.cfg, "test", self.storage, VAL_CONVERSATIONS)
        except TaskUnavailable:
            return {}
        w = self.worker
        loader = ConversationLoader(val, self.tokenizer, self.plan.rows, self.cfg.train.seq_len, w.rank,
                                    w.world_size, w.device, loop=False)
        loss_sum = torch.zeros((), device=w.device, dtype=torch.float64)
        count = torch.zeros((), device=w.device, dtype=torch.float64)
        with w.autocast():
            for inputs, targets in loader:
                losses = model(inputs, targets, loss_reduction="none").reshape(-1)
                keep = targets.reshape(-1) >= 0
                loss_sum += losses[keep].double().sum()
                count += keep.sum()
        total = w.sum(torch.stack([loss_sum, count]))
        return {"val_loss": (total[0] / total[1]).item()} if total[1] > 0 else {}


class MidStage(ChatStage):
    name = "mid"


class SFTStage(ChatStage):
    name = "sft"


def train_mid(settings: WorkerSettings) -> None:
    """Ray Train's train_loop_per_worker for `nanochat train mid`."""
    train_stage(settings, MidStage)


def train_sft(settings: WorkerSettings) -> None:
    """Ray Train's train_loop_per_worker for `nanochat train sft`."""
    train_stage(settings, SFTStage)
