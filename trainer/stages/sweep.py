"""
One variant of an architecture sweep, trained in its own Ray task: base pretraining from fresh weights for a
fixed number of steps, through the shared step loop.

Notable:
- base training's parts (model, packing loader, bits per byte) with the classic optimizer settings of the
  variant's config; one process, no DDP, no Ray Train, no checkpoints: a variant is short
- validation bits per byte at `eval_points` evenly spaced steps, the last at the end (the curve the sweep's
  plot draws against FLOPs); tokens per second in steady state (first steps and evaluations excluded)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from nanochat.config import Config
from services.storage import open_storage
from trainer.data.tokenizer import load_tokenizer
from trainer.optim import OptimConfig, apply_schedule, build_optimizers, optim_config
from trainer.stages.base import BaseStage
from trainer.stages.loop import WARMUP_STEPS_EXCLUDED, StepHooks, TrainState, evaluated, step_loop
from trainer.worker import Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariantSettings:
    """What the sweep's driver hands the Ray task of one variant."""

    name: str
    config: Config  # the variant's config: the sweep's with its overrides
    storage: str  # the storage URI
    steps: int  # its share of the FLOPs budget
    eval_points: int
    gpus: float  # GPUs the task reserved (0: it runs on CPU)
    threads: int  # torch threads on CPU: the CPUs Ray reserved for it, no more


def eval_steps(steps: int, points: int) -> list[int]:
    """`points` steps evenly spaced over 1..steps, the last one at the end (fewer if steps are fewer)."""
    return sorted({max(1, round(k * steps / points)) for k in range(1, points + 1)})


class VariantStage(BaseStage):
    """Base pretraining for a fixed number of steps, evaluated at chosen steps, at the config's own (classic)
    learning rates whatever train.recipe says: variants compare architectures, not recipes."""

    def __init__(self, settings: VariantSettings, worker: Worker):
        storage = open_storage(settings.storage)
        super().__init__(settings.config, worker, storage, load_tokenizer(storage))
        self.steps = settings.steps
        self.evaluate_at = set(eval_steps(settings.steps, settings.eval_points))

    def optim_config(self) -> OptimConfig:
        return optim_config(self.cfg)

    def horizon(self, model) -> int:
        return self.steps

    def evaluates_at(self, step: int, horizon: int) -> bool:
        return step in self.evaluate_at


def train_variant(settings: VariantSettings) -> dict[str, Any]:
    """Train one variant from fresh weights for settings.steps steps in this process; returns its results."""
    started = time.time()
    t, steps = settings.config.train, settings.steps
    worker = Worker(0, 1, torch.device("cuda" if settings.gpus > 0 and torch.cuda.is_available() else "cpu"))
    if worker.device.type == "cpu":
        torch.set_num_threads(settings.threads)
    stage = VariantStage(settings, worker)

    torch.manual_seed(t.seed)  # every variant starts from the same seed
    model = stage.build_model().to(worker.device).train()
    optim_cfg = stage.optim_config()
    optimizers = build_optimizers(model, optim_cfg)
    stage.size_batch(model, model)
    loader = stage.make_loader(None)
    flops_per_token = model.estimate_flops()
    state = TrainState()

    def logged(metrics: dict[str, float]) -> None:
        if "val_bpb" in metrics:
            log.info("variant %s: step %d/%d, val bpb %.4f", settings.name, state.step, steps, metrics["val_bpb"])

    step_loop(state, steps, StepHooks(
        schedule=lambda step: apply_schedule(optimizers, step, steps, optim_cfg),
        train=lambda schedule: stage.train_step(model, model, optimizers, loader),
        evaluates_at=lambda step: stage.evaluates_at(step, steps),
        evaluate=lambda: evaluated(stage.evaluate, model),
        publish=logged,
        warmup_steps=min(WARMUP_STEPS_EXCLUDED, steps - 1),  # a short variant still has a timed step
    ))
    tokens = steps * t.total_batch_size
    curve = [{"step": e["step"], "flops": e["step"] * t.total_batch_size * flops_per_token, "val_bpb": e["val_bpb"]}
             for e in state.evals]
    return {
        "params": model.num_params(), "flops_per_token": flops_per_token, "steps": steps, "tokens": tokens,
        "flops": tokens * flops_per_token, "val_bpb": curve[-1]["val_bpb"], "train_loss": state.history[-1]["loss"],
        "tokens_per_second": state.tokens_per_second(), "seconds": round(time.time() - started, 3), "curve": curve,
    }
