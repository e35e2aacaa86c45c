"""
Base pretraining: the function every Ray Train worker runs.

Notable:
- plain DDP data parallelism applied from outside the model: gloo on CPU, NCCL on GPU; bf16 autocast on GPU,
  fp32 on CPU; every rank holds the full model and optimizer state and applies the same update
- gradient accumulation fills the configured total batch; the horizon comes from the depth dial
  (tokens = train.target_param_data_ratio x scaling params) unless train.max_steps is set
- resumable to the step: a checkpoint holds weights, optimizer state, every rank's data-loader cursor and
  RNG state, and the metric history; on (re)start each worker loads the newest *valid* checkpoint, so a
  worker crash restarted by Ray Train and a second run of the same command both continue exactly
- per-step metrics go to Ray Train, TensorBoard, W&B (if configured) and Prometheus gauges; rank 0 also
  feeds the driver's progress bar
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanochat.checkpoint import capture_rng_state, read_checkpoint, restore_rng_state, write_checkpoint
from nanochat.config import Config
from nanochat.gpt import GPT, GPTConfig
from services.checkpoints import CheckpointManager
from services.storage import Storage, open_storage
from services.telemetry import TrainTelemetry
from trainer.data import list_shards, split_shards
from trainer.dataloader import DataLoader, token_bytes
from trainer.loss_eval import evaluate_bpb
from trainer.optim import (
    OptimConfig,
    apply_schedule,
    build_optimizers,
    grad_accum_steps,
    load_optimizers_state_dict,
    num_scaling_params,
    optimizers_state_dict,
    training_horizon,
)
from trainer.tok import load_tokenizer

log = logging.getLogger(__name__)

STAGE = "base"
WARMUP_STEPS_EXCLUDED = 3  # first steps of each attempt are excluded from steady-state throughput

# bf16 dense peak FLOP/s per device, for MFU; unknown devices (CPUs included) report no MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12, "B200": 2250e12}


# ---------------------------------------------------------------------------
# building blocks


def model_config(cfg: Config, vocab_size: int) -> GPTConfig:
    m = cfg.model
    return GPTConfig.from_depth(
        m.depth, vocab_size=vocab_size, sequence_len=cfg.train.seq_len, head_dim=m.head_dim,
        aspect_ratio=m.aspect_ratio, n_kv_head=m.n_kv_head, window_pattern=m.window_pattern,
        softcap=m.softcap, rope_base=m.rope_base, norm=m.norm, activation=m.activation, qk_norm=m.qk_norm,
    )


def optim_config(cfg: Config) -> OptimConfig:
    t = cfg.train
    return OptimConfig(
        embedding_lr=t.embedding_lr, unembedding_lr=t.unembedding_lr, matrix_lr=t.matrix_lr, scalar_lr=t.scalar_lr,
        weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio, warmdown_ratio=t.warmdown_ratio,
        final_lr_frac=t.final_lr_frac,
    )


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


@dataclass
class Worker:
    """Where this process stands in the worker group."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def mean(self, value: torch.Tensor) -> float:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value.item()


def current_worker(threads: int) -> Worker:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(threads)  # oversubscribed cores make every step slower (STACK-NOTES)
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), device)


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
    manager: CheckpointManager, worker: Worker, model: GPT, optimizers, loader: DataLoader,
    progress: Progress, cfg: Config, metrics: dict[str, float],
) -> float:
    """All ranks contribute cursor and RNG; rank 0 writes the folder and Ray Train uploads it."""
    import ray.train

    started = time.time()
    cursors = worker.all_gather(loader.state_dict())
    rngs = worker.all_gather(capture_rng_state())
    with tempfile.TemporaryDirectory(prefix="nanochat-ckpt-") as tmp:
        checkpoint = None
        if worker.is_main:
            write_checkpoint(
                Path(tmp), model_state=model.state_dict(), optimizer_state={"optimizers": optimizers_state_dict(optimizers)},
                cursor=cursors, config=cfg.model_dump(), rng={"ranks": rngs},
                meta={"stage": STAGE, "world_size": worker.world_size, "model_config": vars(model.config),
                      **progress.__dict__},
            )
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{progress.step:06d}")
        if worker.is_main:
            manager.mark_latest(progress.step)
    return time.time() - started


def restore_checkpoint(
    manager: CheckpointManager, worker: Worker, model: GPT, optimizers
) -> tuple[Progress, dict | None]:
    """Load the newest valid checkpoint into model and optimizers; returns progress and this rank's cursor."""
    with tempfile.TemporaryDirectory(prefix=f"nanochat-restore-{worker.rank}-") as tmp:
        found = manager.latest_valid(Path(tmp))
        if found is None:
            return Progress(), None
        step, folder = found
        ckpt = read_checkpoint(folder, map_location=worker.device)
    saved_world = ckpt.meta["world_size"]
    if saved_world != worker.world_size:
        raise RuntimeError(
            f"checkpoint step {step} was written by {saved_world} workers; resume with --workers {saved_world} "
            f"or start a new run (--run NAME)"
        )
    model.load_state_dict(ckpt.model_state)
    load_optimizers_state_dict(optimizers, ckpt.optimizer_state["optimizers"])
    restore_rng_state(ckpt.rng["ranks"][worker.rank])
    fields = {k: ckpt.meta[k] for k in Progress.__dataclass_fields__}
    progress = Progress(**fields)
    progress.resumed_from.append(step)
    log.info("rank %d resumed from step %d", worker.rank, step)
    return progress, ckpt.cursor[worker.rank]


# ---------------------------------------------------------------------------
# the loop


def _maybe_inject_fault(job: dict[str, Any], storage: Storage, step: int, worker: Worker, stage_prefix: str) -> None:
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


def evaluate(model: GPT, cfg: Config, storage: Storage, tokenizer, worker: Worker, val_shards: list[str]) -> float:
    t = cfg.train
    steps = max(1, t.eval_tokens // (t.device_batch_size * t.seq_len * worker.world_size))
    val = DataLoader(storage, val_shards, tokenizer, batch_size=t.device_batch_size, seq_len=t.seq_len,
                     rank=worker.rank, world_size=worker.world_size, device=worker.device, loop=False)
    model.eval()
    with worker.autocast():
        bpb = evaluate_bpb(model, iter(val), steps, token_bytes(tokenizer).to(worker.device))
    model.train()
    return bpb


def train_base(job: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker for `nanochat train base`."""
    import ray.train
    from torch.nn.parallel import DistributedDataParallel

    cfg = Config.model_validate(job["config"])
    t = cfg.train
    worker = current_worker(job.get("threads_per_worker", 1))
    storage = open_storage(job["storage"])
    manager = CheckpointManager(storage, cfg.run, STAGE)
    tokenizer = load_tokenizer(storage)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = GPT(model_config(cfg, tokenizer.vocab_size)).to(worker.device)
    model.init_weights()
    optimizers = build_optimizers(model, optim_config(cfg))
    progress, cursor = restore_checkpoint(manager, worker, model, optimizers)
    if cursor is None:
        torch.manual_seed(t.seed + worker.rank)

    horizon = t.max_steps if t.max_steps > 0 else training_horizon(
        num_scaling_params(model), t.target_param_data_ratio, t.total_batch_size).num_steps
    accum = grad_accum_steps(t.total_batch_size, t.device_batch_size, t.seq_len, worker.world_size)
    train_shards, val_shards = split_shards(list_shards(storage, cfg.data.corpus_name), cfg.data.val_shards)
    loader = DataLoader(storage, train_shards, tokenizer, batch_size=t.device_batch_size, seq_len=t.seq_len,
                        rank=worker.rank, world_size=worker.world_size, device=worker.device, state=cursor)
    ddp = DistributedDataParallel(model) if worker.world_size > 1 else model
    flops_per_token, peak = model.estimate_flops(), peak_flops(worker.device)
    tensorboard_dir = Path(job["tensorboard_dir"]) if worker.is_main and job.get("tensorboard_dir") else None
    telemetry = TrainTelemetry(
        cfg.run, STAGE, tensorboard_dir=tensorboard_dir,
        wandb_mode=cfg.log.wandb if worker.is_main else "disabled", wandb_project=cfg.log.wandb_project,
        config=cfg.model_dump(),
    )
    tracker = _progress_tracker(job) if worker.is_main else None
    if worker.is_main:
        log.info("base: %s params, %d steps of %d tokens, %d micro-steps per step, %d workers",
                 f"{model.num_params():,}", horizon, t.total_batch_size, accum, worker.world_size)

    steps_this_attempt = 0
    while progress.step < horizon:
        _maybe_inject_fault(job, storage, progress.step, worker, manager.stage_prefix)
        schedule = apply_schedule(optimizers, progress.step, horizon, optim_config(cfg))
        started = time.time()
        loss_sum = torch.zeros((), device=worker.device)
        for micro in range(accum):
            inputs, targets = next(loader)
            sync = ddp.no_sync() if worker.world_size > 1 and micro < accum - 1 else nullcontext()
            with sync, worker.autocast():
                loss = ddp(inputs, targets)
            (loss / accum).backward()
            loss_sum += loss.detach()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss_value = worker.mean(loss_sum / accum)
        if worker.device.type == "cuda":
            torch.cuda.synchronize()
        step_seconds = time.time() - started
        progress.step += 1
        progress.tokens += t.total_batch_size
        steps_this_attempt += 1
        if steps_this_attempt > WARMUP_STEPS_EXCLUDED:
            progress.train_seconds += step_seconds
            progress.train_tokens_timed += t.total_batch_size
        tokens_per_second = t.total_batch_size / step_seconds
        metrics = {"loss": loss_value, "lr_multiplier": schedule["lr_multiplier"], "step_seconds": step_seconds,
                   "tokens_per_second": tokens_per_second}
        if peak:
            metrics["mfu"] = 100 * flops_per_token * tokens_per_second / (peak * worker.world_size)
        progress.history.append({"step": progress.step, "loss": loss_value, "lr_multiplier": schedule["lr_multiplier"]})

        last = progress.step == horizon
        if (t.eval_every > 0 and progress.step % t.eval_every == 0) or last:
            metrics["val_bpb"] = evaluate(model, cfg, storage, tokenizer, worker, val_shards)
            progress.evals.append({"step": progress.step, "val_bpb": metrics["val_bpb"]})
        if progress.step % t.checkpoint_every == 0 or last:
            metrics["checkpoint_seconds"] = save_checkpoint(manager, worker, model, optimizers, loader, progress, cfg,
                                                            {**metrics, "step": progress.step})
        elif progress.step % cfg.log.every == 0:
            ray.train.report({**metrics, "step": progress.step})
        if worker.is_main:
            telemetry.log(progress.step, metrics)
            if tracker is not None:
                tracker.update.remote(progress.step, horizon, metrics)

    if worker.is_main:
        manager.mark_done(_summary(progress, model, cfg, horizon))
    telemetry.close()


def _summary(progress: Progress, model: GPT, cfg: Config, horizon: int) -> dict[str, Any]:
    return {
        "stage": STAGE, "run": cfg.run, "steps": progress.step, "tokens": progress.tokens,
        "seconds": progress.train_seconds, "tokens_per_second": progress.tokens_per_second(),
        "metrics": {
            "final_loss": progress.history[-1]["loss"] if progress.history else None,
            "val_bpb": progress.evals[-1]["val_bpb"] if progress.evals else None,
            "params": model.num_params(), "horizon": horizon, "resumed_from": progress.resumed_from,
        },
    }


def _progress_tracker(job: dict[str, Any]):
    import ray

    name = job.get("progress_actor")
    if not name:
        return None
    try:
        return ray.get_actor(name)
    except ValueError:
        return None
