"""
Chat stages: midtraining and supervised fine-tuning on conversations, from the previous stage's weights.

Notable:
- conversations are rendered with the special tokens (nanochat/tokenizer.py); the loss falls on assistant
  tokens only (tool outputs excluded), padding and user turns get target -1
- a task mixture (mid.tasks / sft.tasks, with weights) is served in one fixed shuffled order; rank r takes
  every world_size-th conversation, and the cursor is just the next index, so resume is exact
- tasks whose data cannot be had (offline, no local files) are left out with the reason logged and recorded
- mid starts from base; sft from mid (or base when there is no mid); optimizers start fresh, as nanochat's;
  learning rates are the base ones times lr_frac; sft decays them linearly to zero
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from nanochat.config import ChatStageConfig, Config
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from services.checkpoints import CheckpointManager
from trainer.base_train import optim_config
from trainer.evaluate import load_stage_model
from trainer.loop import Stage, train_stage
from trainer.optim import OptimConfig
from trainer.runner import STARTS_FROM
from trainer.tasks import build_mixture
from trainer.tasks.base import Task, TaskMixture, TaskUnavailable

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


class ConversationLoader:
    """This rank's conversations as padded (inputs, targets) batches, resumable to the conversation."""

    def __init__(self, task: Task, tokenizer: Tokenizer, batch_size: int, max_len: int, rank: int, world_size: int,
                 device: torch.device, state: dict | None = None, loop: bool = True):
        self.task, self.tokenizer, self.batch_size, self.max_len = task, tokenizer, batch_size, max_len
        self.world_size, self.device, self.loop = world_size, device, loop
        self.index = state["index"] if state else rank  # the next conversation this rank renders
        self.epoch = state["epoch"] if state else 0
        self.pad_id = tokenizer.get_bos_token_id()

    def state_dict(self) -> dict:
        return {"index": self.index, "epoch": self.epoch}

    def __iter__(self) -> ConversationLoader:
        return self

    def _next_conversation(self) -> dict:
        if self.index >= len(self.task):
            if not self.loop:
                raise StopIteration
            self.index -= len(self.task)
            self.epoch += 1
        conversation = self.task[self.index]
        self.index += self.world_size
        return conversation

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            try:
                conversation = self._next_conversation()
            except StopIteration:
                break
            ids, mask = self.tokenizer.render_conversation(conversation, max_tokens=self.max_len + 1)
            targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
            rows.append((ids[:-1], targets))
        if not rows:
            raise StopIteration
        width = max(len(ids) for ids, _ in rows)
        inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, (ids, tgt) in enumerate(rows):
            inputs[i, : len(ids)] = torch.tensor(ids)
            targets[i, : len(tgt)] = torch.tensor(tgt)
        return inputs.to(self.device), targets.to(self.device)


class ChatStage(Stage):
    """Midtraining or SFT; `name` is set by the subclass."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.stage_cfg: ChatStageConfig = getattr(self.cfg, self.name)
        self.mixture, self.skipped = stage_mixture(self.stage_cfg, self.cfg, "train", self.storage)
        self.worker_batch = self.stage_cfg.device_batch_size
        if self.worker_batch == 0 or self.stage_cfg.examples_per_step % (self.worker_batch * self.worker.world_size):
            raise ValueError(
                f"{self.name}.examples_per_step ({self.stage_cfg.examples_per_step}) must be a multiple of "
                f"{self.name}.device_batch_size x workers ({self.worker_batch} x {self.worker.world_size})"
            )

    def build_model(self) -> GPT:
        for previous in STARTS_FROM[self.name]:
            if CheckpointManager(self.storage, self.cfg.run, previous).latest_step() is not None:
                model, step = load_stage_model(self.storage, self.cfg.run, previous, torch.device("cpu"))
                log.info("%s starts from %s step %d", self.name, previous, step)
                return model
        raise FileNotFoundError(f"{self.name} needs a checkpoint of {' or '.join(STARTS_FROM[self.name])} in runs/{self.cfg.run}/")

    def optim_config(self) -> OptimConfig:
        return optim_config(self.cfg, lr_frac=self.stage_cfg.lr_frac, **self.schedule())

    def schedule(self) -> dict[str, float]:
        return {}

    def make_loader(self, cursor: dict | None) -> ConversationLoader:
        w = self.worker
        return ConversationLoader(self.mixture, self.tokenizer, self.worker_batch, self.cfg.train.seq_len,
                                  w.rank, w.world_size, w.device, state=cursor)

    def horizon(self, model: GPT) -> int:
        if self.stage_cfg.max_steps > 0:
            return self.stage_cfg.max_steps
        return max(1, len(self.mixture) // self.stage_cfg.examples_per_step)

    def micro_steps(self) -> int:
        return self.stage_cfg.examples_per_step // (self.worker_batch * self.worker.world_size)

    def eval_every(self) -> int:
        return self.stage_cfg.eval_every

    def summary_extra(self) -> dict[str, Any]:
        return {"mixture": self.mixture.counts(), "skipped_tasks": self.skipped}

    def evaluate(self, model: GPT) -> dict[str, float]:
        """Mean loss on assistant tokens of held-out conversations (the tasks' test splits where they exist)."""
        try:
            val, _ = stage_mixture(self.stage_cfg, self.cfg, "test", self.storage, VAL_CONVERSATIONS)
        except TaskUnavailable:
            return {}
        w = self.worker
        loader = ConversationLoader(val, self.tokenizer,
                                    self.worker_batch, self.cfg.train.seq_len, w.rank, w.world_size, w.device, loop=False)
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

    def schedule(self) -> dict[str, float]:
        return {"warmup_ratio": 0.0, "warmdown_ratio": 0.2, "final_lr_frac": 0.0}


class SFTStage(ChatStage):
    name = "sft"

    def schedule(self) -> dict[str, float]:
        return {"warmup_ratio": 0.0, "warmdown_ratio": 1.0, "final_lr_frac": 0.0}  # linear decay to zero


def train_mid(job: dict[str, Any]) -> None:
    train_stage(job, MidStage)


def train_sft(job: dict[str, Any]) -> None:
    train_stage(job, SFTStage)
