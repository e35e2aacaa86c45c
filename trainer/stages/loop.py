"""
The training loop every stage shares (base, mid, sft), run inside each Ray Train worker.

Notable:
- a stage supplies its parts (model, optimizers, data loader, horizon, evaluation) through `Stage`; the loop
  owns everything else: DDP, gradient accumulation, the schedule, metrics, checkpoints and resume
- plain DDP applied from outside the model: gloo on CPU, NCCL on GPU; every rank holds the full model and
  optimizer state and applies the same update
- on GPUs the model is torch.compile'd before DDP wraps it (train.compile): eager, the softcapped float32
  logits and their intermediates alone take tens of GiB at nanochat's batch, and a d20 at 32 rows of 2048
  tokens does not fit in 141 GiB; compiled it takes 86 GiB at twice the speed (bench/gpu.py on an H200).
  Checkpoints, evaluation and sampling use the plain model, which shares the compiled one's parameters.
- resumable to the step: a checkpoint holds weights, optimizer state, every rank's data-loader cursor and RNG
  state, and the metric history; on (re)start each worker loads the stage's newest *valid* checkpoint, so a
  worker crash restarted by Ray Train and a second run of the same command both continue exactly
- per-step metrics go to Ray Train, TensorBoard, W&B (if configured) and Prometheus gauges; rank 0 also
  feeds the driver's progress bar
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from nanochat.checkpoint import (
    Checkpoint,
    capture_rng_state,
    read_checkpoint,
    restore_rng_state,
    write_checkpoint,
)
from nanochat.config import Config
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from services.checkpoints import CheckpointManager
from services.layout import step_dir_name
from services.storage import Storage, open_storage
from services.telemetry import TrainTelemetry
from trainer.data.tokenizer import load_tokenizer
from trainer.optim import (
    OptimConfig,
    apply_schedule,
    build_optimizers,
    load_optimizers_state_dict,
    optimizers_state_dict,
)
from trainer.worker import Worker, current_worker, peak_flops

log = logging.getLogger(__name__)

WARMUP_STEPS_EXCLUDED = 3  # first steps of each attempt are excluded from steady-state throughput


class Loader(Protocol):
    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...


class Stage(ABC):
    """What differs between training stages. Built once per worker process."""

    name: str

    def __init__(self, cfg: Config, worker: Worker, storage: Storage, tokenizer: Tokenizer):
        self.cfg, self.worker, self.storage, self.tokenizer = cfg, worker, storage, tokenizer

    @abstractmethod
    def build_model(self) -> GPT:
        """The weights the stage starts from: fresh (base) or the previous stage's (chat stages)."""

    @abstractmethod
    def optim_config(self) -> OptimConfig: ...

    @abstractmethod
    def make_loader(self, cursor: dict | None) -> Loader:
        """This rank's training batches, continuing from a saved cursor when given."""

    @abstractmethod
    def horizon(self, model: GPT) -> int:
        """Optimizer steps of the whole stage."""

    @abstractmethod
    def micro_steps(self) -> int:
        """Micro-batches per optimizer step on each rank (gradient accumulation)."""

    def evaluate(self, model: GPT) -> dict[str, float]:
        """Validation metrics, called every eval_every steps and at the end (model in eval mode)."""
        return {}

    def eval_every(self) -> int:
        return -1

    def summary_extra(self) -> dict[str, Any]:
        """Stage-specific facts for the stage's summary (DONE.json)."""
        return {}


@dataclass
class Progress:
    """What a checkpoint carries besides tensors: where the run is and what it has measured."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # steady-state step time only (no start-up, eval or checkpointing)
    train_tokens_timed: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)

    def tokens_per_second(self) -> float:
        return self.train_tokens_timed / self.train_seconds if self.train_seconds > 0 else 0.0


# ---------------------------------------------------------------------------
# checkpoints


def save_checkpoint(
    stage: Stage, manager: CheckpointManager, model: GPT, optimizers, loader: Loader, progress: Progress,
    metrics: dict[str, float],
) -> float:
    """All ranks contribute cursor and RNG; rank 0 writes the folder and Ray Train uploads it."""
    import ray.train

    worker, started = stage.worker, time.time()
    cursors = worker.all_gather(loader.state_dict())
    rngs = worker.all_gather(capture_rng_state())
    with tempfile.TemporaryDirectory(prefix="nanochat-ckpt-") as tmp:
        checkpoint = None
        if worker.is_main:
            write_checkpoint(
                Path(tmp), model_state=model.state_dict(), optimizer_state={"optimizers": optimizers_state_dict(optimizers)},
                cursor=cursors, config=stage.cfg.model_dump(), rng={"ranks": rngs},
                meta={"stage": stage.name, "backend": "torch", "world_size": worker.world_size,
                      "model_config": vars(model.config),
                      **progress.__dict__},
            )
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=step_dir_name(progress.step))
        if worker.is_main:
            manager.mark_latest(progress.step)
    return time.time() - started


def load_latest(manager: CheckpointManager, worker: Worker, backend: str) -> tuple[int, Checkpoint] | None:
    """The stage's newest valid checkpoint, refused unless this backend and worker group wrote it."""
    with tempfile.TemporaryDirectory(prefix=f"nanochat-restore-{worker.rank}-") as tmp:
        found = manager.latest_valid(Path(tmp))
        if found is None:
            return None
        step, folder = found
        ckpt = read_checkpoint(folder, map_location=worker.device)
    problem = resume_problem(step, ckpt.meta, backend, worker.world_size)
    if problem:
        raise RuntimeError(problem)
    return step, ckpt


def resume_problem(step: int, meta: dict[str, Any], backend: str, world_size: int) -> str | None:
    """Why a checkpoint with this meta.json cannot be resumed by this backend and number of workers; None if
    it can. The driver asks first (trainer/pipeline/jobs.py), the workers again on the checkpoint they load."""
    written_by = meta.get("backend", "torch")
    if written_by != backend:
        return (f"checkpoint step {step} was written by the {written_by} backend; resume with "
                f"--backend {written_by} or start a new run (--run NAME)")
    saved_world = meta.get("world_size")
    if saved_world != world_size:
        return (f"checkpoint step {step} was written by {saved_world} workers; resume with --workers {saved_world} "
                f"or start a new run (--run NAME)")
    return None


def resumed_progress(step: int, ckpt: Checkpoint) -> Progress:
    progress = Progress(**{k: ckpt.meta[k] for k in Progress.__dataclass_fields__})
    progress.resumed_from.append(step)
    return progress


def restore_checkpoint(manager: CheckpointManager, worker: Worker, model: GPT, optimizers) -> tuple[Progress, dict | None]:
    """Load the stage's newest valid checkpoint into model and optimizers; returns progress and this rank's cursor."""
    found = load_latest(manager, worker, "torch")
    if found is None:
        return Progress(), None
    step, ckpt = found
    model.load_state_dict(ckpt.model_state)
    load_optimizers_state_dict(optimizers, ckpt.optimizer_state["optimizers"])
    restore_rng_state(ckpt.rng["ranks"][worker.rank])
    log.info("rank %d resumed from step %d", worker.rank, step)
    return resumed_progress(step, ckpt), ckpt.cursor[worker.rank]


# ---------------------------------------------------------------------------
# the loop


def maybe_inject_fault(job: dict[str, Any], storage: Storage, step: int, worker: Worker, stage_prefix: str) -> None:
    """Test hook: kill one worker process once at a chosen step, as a crashed node would."""
    fault = job.get("fail_at_step")
    if fault is None or step != fault or worker.rank != job.get("fail_rank", worker.world_size - 1):
        return
    marker = f"{stage_prefix}fault_injected_at_{step}"
    if storage.exists(marker):
        return
    storage.write_text(marker, "")
    log.warning("fault injection: rank %d exits at step %d", worker.rank, step)
    os._exit(1)


def progress_tracker(job: dict[str, Any]):
    import ray

    try:
        return ray.get_actor(job["progress_actor"]) if job.get("progress_actor") else None
    except ValueError:
        return None


def make_telemetry(job: dict[str, Any], stage: Stage) -> TrainTelemetry:
    main, cfg = stage.worker.is_main, stage.cfg
    tensorboard_dir = Path(job["tensorboard_dir"]) if main and job.get("tensorboard_dir") else None
    return TrainTelemetry(cfg.run, stage.name, tensorboard_dir=tensorboard_dir,
                          wandb_mode=cfg.log.wandb if main else "disabled", wandb_project=cfg.log.wandb_project,
                          config=cfg.model_dump())


def _evaluate(stage: Stage, model: GPT) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        result = stage.evaluate(model)
    model.train()
    return result


@dataclass
class Setup:
    """A stage ready to train in this worker: restored from its newest valid checkpoint when there is one."""

    stage: Stage
    manager: CheckpointManager
    model: GPT
    optim_cfg: OptimConfig
    optimizers: list
    progress: Progress
    loader: Loader
    horizon: int
    telemetry: TrainTelemetry
    tracker: Any


def set_up(job: dict[str, Any], stage_class: type[Stage]) -> Setup:
    """What every stage's worker function does first: config, storage, model, optimizers, resume, data."""
    cfg = Config.model_validate(job["config"])
    worker = current_worker(job["threads_per_worker"])
    storage = open_storage(job["storage"])
    stage = stage_class(cfg, worker, storage, load_tokenizer(storage))
    manager = CheckpointManager(storage, cfg.run, stage.name)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = stage.build_model().to(worker.device).train()
    optim_cfg = stage.optim_config()
    optimizers = build_optimizers(model, optim_cfg)
    progress, cursor = restore_checkpoint(manager, worker, model, optimizers)
    if cursor is None:
        torch.manual_seed(cfg.train.seed + worker.rank)
    return Setup(stage, manager, model, optim_cfg, optimizers, progress, stage.make_loader(cursor),
                 stage.horizon(model), make_telemetry(job, stage),
                 progress_tracker(job) if worker.is_main else None)


def train_stage(job: dict[str, Any], stage_class: type[Stage]) -> None:
    """Ray Train's train_loop_per_worker body for any stage."""
    from torch.nn.parallel import DistributedDataParallel

    run = set_up(job, stage_class)
    stage, manager, model, optim_cfg, optimizers = run.stage, run.manager, run.model, run.optim_cfg, run.optimizers
    progress, loader, horizon, telemetry, tracker = run.progress, run.loader, run.horizon, run.telemetry, run.tracker
    worker, storage = stage.worker, stage.storage
    accum = stage.micro_steps()
    forward = compiled(model, stage.cfg.train.compile, worker.device)
    ddp = DistributedDataParallel(forward) if worker.world_size > 1 else forward
    flops_per_token, peak = model.estimate_flops(), peak_flops(worker.device)
    if worker.is_main:
        log.info("%s: %s params, %d steps, %d micro-steps per step, %d workers",
                 stage.name, f"{model.num_params():,}", horizon, accum, worker.world_size)

    steps_this_attempt, eval_every = 0, stage.eval_every()
    while progress.step < horizon:
        maybe_inject_fault(job, storage, progress.step, worker, manager.stage_prefix)
        schedule = apply_schedule(optimizers, progress.step, horizon, optim_cfg)
        started = time.time()
        loss, tokens = optimizer_step(ddp, model, optimizers, loader, accum, worker)
        loss_value = worker.mean(loss)
        step_tokens = int(worker.sum(tokens).item())  # also a sync point, so the step time is honest on GPU
        step_seconds = time.time() - started
        progress.step += 1
        progress.tokens += step_tokens
        steps_this_attempt += 1
        if steps_this_attempt > WARMUP_STEPS_EXCLUDED:
            progress.train_seconds += step_seconds
            progress.train_tokens_timed += step_tokens
        tokens_per_second = step_tokens / step_seconds
        metrics = {"loss": loss_value, "lr_multiplier": schedule["lr_multiplier"], "step_seconds": step_seconds,
                   "tokens_per_second": tokens_per_second}
        if peak:
            metrics["mfu"] = 100 * flops_per_token * tokens_per_second / (peak * worker.world_size)
        progress.history.append({"step": progress.step, "loss": loss_value, "lr_multiplier": schedule["lr_multiplier"]})

        last = progress.step == horizon
        if (eval_every > 0 and progress.step % eval_every == 0) or last:
            results = _evaluate(stage, model)
            metrics.update(results)
            if results:
                progress.evals.append({"step": progress.step, **results})
        publish_step(stage, progress, metrics, horizon, telemetry, tracker,
                     lambda m: save_checkpoint(stage, manager, model, optimizers, loader, progress, m))
    finish_stage(stage, manager, model, progress, horizon, telemetry, stage.summary_extra())


def compiled(model: GPT, compile: bool | None, device: torch.device) -> torch.nn.Module:
    """The module the loop calls forward on: the model under torch.compile if asked (by default on GPUs)."""
    if compile if compile is not None else device.type == "cuda":
        return torch.compile(model)
    return model


def optimizer_step(forward, model: GPT, optimizers, loader: Loader, accum: int, worker: Worker
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `accum` micro-batches: gradients accumulate (DDP, as `forward`, synchronises
    only on the last), every optimizer steps, gradients are cleared. Returns this rank's mean micro-batch
    loss and its target-token count, as tensors on the device (reading them is the caller's sync point)."""
    loss_sum = torch.zeros((), device=worker.device)
    tokens = torch.zeros((), device=worker.device, dtype=torch.long)
    for micro in range(accum):
        inputs, targets = next(loader)
        sync = forward.no_sync() if worker.world_size > 1 and micro < accum - 1 else nullcontext()
        with sync, worker.autocast():
            loss = forward(inputs, targets)
        (loss / accum).backward()
        loss_sum += loss.detach()
        tokens += (targets >= 0).sum()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum / accum, tokens


def publish_step(stage: Stage, progress: Progress, metrics: dict[str, float], horizon: int,
                 telemetry: TrainTelemetry, tracker, save: Callable[[dict[str, float]], float]) -> None:
    """After an optimizer step: checkpoint (every checkpoint_every steps and at the end) through save(metrics),
    which reports to Ray Train and returns its seconds, or just report; then publish the metrics."""
    import ray.train

    cfg = stage.cfg
    if progress.step % cfg.train.checkpoint_every == 0 or progress.step == horizon:
        metrics["checkpoint_seconds"] = save({**metrics, "step": progress.step})
    elif progress.step % cfg.log.every == 0:
        ray.train.report({**metrics, "step": progress.step})
    if stage.worker.is_main:
        telemetry.log(progress.step, metrics)
        if tracker is not None:
            tracker.update.remote(progress.step, horizon, metrics)


def finish_stage(stage: Stage, manager: CheckpointManager, model: GPT, progress: Progress, horizon: int,
                 telemetry: TrainTelemetry, extra: dict[str, Any]) -> None:
    """Record the stage as done (DONE.json, rank 0) with its summary."""
    if stage.worker.is_main:
        record = summary(stage.name, progress, model, stage.cfg, horizon)
        record["metrics"].update(extra)
        manager.mark_done(record)
    telemetry.close()


def summary(name: str, progress: Progress, model: GPT, cfg: Config, horizon: int) -> dict[str, Any]:
    """The stage's record in DONE.json and its JSON line (SPEC.md)."""
    last_eval = progress.evals[-1] if progress.evals else {}
    return {
        "stage": name, "run": cfg.run, "steps": progress.step, "tokens": progress.tokens,
        "seconds": progress.train_seconds, "tokens_per_second": progress.tokens_per_second(),
        "metrics": {
            "final_loss": progress.history[-1]["loss"] if progress.history else None,
            **{k: v for k, v in last_eval.items() if k != "step"},
            "params": model.num_params(), "horizon": horizon, "resumed_from": progress.resumed_from,
        },
    }
