"""
The step loop every trainer runs (base, mid, SFT, RL, the JAX base stage, a sweep's variants), and the torch
stages' worker function around it, run inside each Ray Train worker.

Notable:
- `step_loop` is the loop: schedule, one optimizer step, the step's accounting (tokens, steady-state time,
  history), evaluation, publishing. What differs plugs in through `StepHooks`: RL its rollouts and
  policy-gradient loss, JAX its jitted step, a sweep variant its evaluation points and no checkpoints
- a torch stage supplies its parts (model, optimizers, data loader, horizon, evaluation, its step) through
  `Stage`; `train_stage` owns everything else: DDP, the schedule, metrics, checkpoints and resume
- plain DDP applied from outside the model: gloo on CPU, NCCL on GPU; every rank holds the full model and
  optimizer state and applies the same update. With train.shard_optimizer (and several workers) no DDP:
  trainer/optim.py's ZeroSharding reduces the gradients onto the rank owning each parameter's optimizer
  state and broadcasts the updated parameters; its checkpoints gather the state into the same format
- on GPUs the model is torch.compile'd before DDP wraps it (train.compile): eager, the softcapped float32
  logits and their intermediates take far more memory at nanochat's batch, and run slower.
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
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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
    ZeroSharding,
    apply_schedule,
    build_optimizers,
    load_optimizers_state_dict,
    optimizers_state_dict,
    state_bytes,
    step_optimizers,
)
from trainer.worker import Worker, WorkerSettings, current_worker, peak_flops

log = logging.getLogger(__name__)

WARMUP_STEPS_EXCLUDED = 3  # first steps of each attempt are excluded from steady-state throughput


class Loader(Protocol):
    def __next__(self) -> Any: ...
    def state_dict(self) -> dict: ...


@dataclass
class TrainState:
    """What a checkpoint carries besides tensors: where the run is and what it has measured."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # steady-state step time only (no start-up, eval or checkpointing)
    train_tokens_timed: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    optimizer_from: str | None = None  # the checkpoint whose optimizer state step 1 started from; None: fresh

    def tokens_per_second(self) -> float:
        return self.train_tokens_timed / self.train_seconds if self.train_seconds > 0 else 0.0


# ---------------------------------------------------------------------------
# the step loop


@dataclass
class StepResult:
    """What one optimizer step measured, over all ranks."""

    metrics: dict[str, float]  # its history entry (loss; RL: reward, pass@k, sequence length, loss)
    tokens: int  # tokens it trained on


def _nothing(step: int) -> None:
    return None


def _no_metrics(tokens_per_second: float) -> dict[str, float]:
    return {}


@dataclass
class StepHooks:
    """What a trainer plugs into the step loop."""

    schedule: Callable[[int], dict[str, float]]  # sets the step's schedule and returns it (lr_multiplier, ...)
    train: Callable[[dict[str, float]], StepResult]  # one optimizer step under that schedule
    evaluates_at: Callable[[int], bool]  # whether to evaluate after this (1-based) step
    evaluate: Callable[[], dict[str, float]]
    publish: Callable[[dict[str, float]], None]  # after every step: report, checkpoint, telemetry
    before: Callable[[int], None] = _nothing  # before a step (fault injection)
    throughput: Callable[[float], dict[str, float]] = _no_metrics  # metrics from tokens per second (MFU)
    warmup_steps: int = WARMUP_STEPS_EXCLUDED  # steps of each attempt left out of the steady-state time


def step_loop(state: TrainState, horizon: int, hooks: StepHooks) -> None:
    """Train from state.step to horizon, keeping state's accounting: tokens, steady-state time, per-step
    history and evaluations."""
    steps_this_attempt = 0
    while state.step < horizon:
        hooks.before(state.step)
        schedule = hooks.schedule(state.step)
        started = time.time()
        result = hooks.train(schedule)
        step_seconds = time.time() - started
        state.step += 1
        state.tokens += result.tokens
        steps_this_attempt += 1
        if steps_this_attempt > hooks.warmup_steps:
            state.train_seconds += step_seconds
            state.train_tokens_timed += result.tokens
        tokens_per_second = result.tokens / step_seconds
        lr_multiplier = schedule["lr_multiplier"]
        metrics = {**result.metrics, "lr_multiplier": lr_multiplier, "step_seconds": step_seconds,
                   "tokens_per_second": tokens_per_second, **hooks.throughput(tokens_per_second)}
        state.history.append({"step": state.step, **result.metrics, "lr_multiplier": lr_multiplier})
        if hooks.evaluates_at(state.step):
            results = hooks.evaluate()
            metrics.update(results)
            if results:
                state.evals.append({"step": state.step, **results})
        hooks.publish(metrics)


def accumulating(forward: nn.Module, last: bool):
    """The context of one micro-step's backward: DDP's no_sync() on all but the last, so that gradients are
    all-reduced once per optimizer step; nothing without DDP (one worker, or sharded optimizer state)."""
    return forward.no_sync() if isinstance(forward, DistributedDataParallel) and not last else nullcontext()


def optimizer_step(forward, model: GPT, optimizers, loader: Loader, accum: int, worker: Worker,
                   sharding: ZeroSharding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `accum` micro-batches: gradients accumulate (DDP, as `forward`, synchronises
    only on the last), every optimizer steps (through the sharding when given), gradients are cleared.
    Returns this rank's mean micro-batch loss and its target-token count, as tensors on the device (reading
    them is the caller's sync point)."""
    loss_sum = torch.zeros((), device=worker.device)
    tokens = torch.zeros((), device=worker.device, dtype=torch.long)
    for micro in range(accum):
        inputs, targets = next(loader)
        last = micro == accum - 1
        with accumulating(forward, last), worker.autocast():
            loss = forward(inputs, targets)
        with sharding.last_backward() if sharding is not None and last else nullcontext():
            (loss / accum).backward()  # sharded: the gradients' reduces start as they become final
        loss_sum += loss.detach()
        tokens += (targets >= 0).sum()
    step_optimizers(optimizers, sharding)
    model.zero_grad(set_to_none=True)
    return loss_sum / accum, tokens


def shard_optimizers(enabled: bool, optimizers: list[torch.optim.Optimizer], worker: Worker, overlap: bool = True
                     ) -> ZeroSharding | None:
    """The ZeroSharding of train.shard_optimizer; None when it is off or there is one worker to hold it all.
    overlap: ZeroSharding's (off only to measure what it gains, bench/train_throughput.py)."""
    if not enabled:
        return None
    if worker.world_size == 1:
        log.info("train.shard_optimizer: one worker holds all optimizer state; nothing to shard")
        return None
    sharding = ZeroSharding(optimizers, worker.rank, worker.world_size, overlap)
    log.info("rank %d owns the optimizer state of %d of %d parameter elements", worker.rank,
             sharding.owned_elements(), sum(p.numel() for p in sharding.params))
    return sharding


def compiled(model: GPT, compile: bool | None, device: torch.device) -> torch.nn.Module:
    """The module the loop calls forward on: the model under torch.compile if asked (by default on GPUs)."""
    if compile if compile is not None else device.type == "cuda":
        return torch.compile(model)
    return model


# ---------------------------------------------------------------------------
# a torch stage


class Stage(ABC):
    """What differs between torch training stages. Built once per worker process."""

    name: str
    reports_mfu = True  # whether its tokens per second make a model FLOPs utilisation
    sharding: ZeroSharding | None = None  # train.shard_optimizer's, set by train_stage once optimizers exist

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

    def wrap(self, model: GPT) -> nn.Module:
        """The module the step calls: the model compiled (train.compile), data-parallel."""
        return self.data_parallel(compiled(model, self.cfg.train.compile, self.worker.device))

    def data_parallel(self, module: nn.Module, **ddp_args: Any) -> nn.Module:
        """module under DDP when several workers all-reduce their gradients; as it is with one worker or
        with sharded optimizer state, whose ZeroSharding moves the gradients itself."""
        if self.worker.world_size == 1 or self.sharding is not None:
            return module
        return DistributedDataParallel(module, **ddp_args)

    def warm_start(self, optimizers: list[torch.optim.Optimizer], resumed: bool) -> str | None:
        """Once the stage's own checkpoint is restored (resumed) or not: on a fresh start, load whatever
        optimizer state the stage starts from and name where it came from. None by default: fresh optimizers."""
        return None

    def size_batch(self, forward: nn.Module, model: GPT) -> None:
        """After wrap, before the first batch: settle what the batch size depends on (base pretraining: an
        automatic device batch is measured on the wrapped model). The other stages' batches are set."""
        return None

    def train_step(self, forward: nn.Module, model: GPT, optimizers: list, loader: Loader) -> StepResult:
        """One optimizer step: next-token loss over micro_steps() batches, the loss averaged over ranks."""
        loss, tokens = optimizer_step(forward, model, optimizers, loader, self.micro_steps(), self.worker,
                                      self.sharding)
        loss_value = self.worker.mean(loss)
        step_tokens = int(self.worker.sum(tokens).item())  # also a sync point, so the step time is honest on GPU
        return StepResult({"loss": loss_value}, step_tokens)

    def evaluate(self, model: GPT) -> dict[str, float]:
        """Validation metrics, called every eval_every steps and at the end (model in eval mode)."""
        return {}

    def eval_every(self) -> int:
        return -1

    def evaluates_at(self, step: int, horizon: int) -> bool:
        every = self.eval_every()
        return (every > 0 and step % every == 0) or step == horizon

    def describe(self, model: GPT, horizon: int) -> str:
        """The line rank 0 logs before the first step."""
        return (f"{self.name}: {model.num_params():,} params, {horizon} steps, {self.micro_steps()} micro-steps "
                f"per step, {self.worker.world_size} workers")

    def summary_extra(self, state: TrainState) -> dict[str, Any]:
        """Stage-specific facts for the stage's summary (DONE.json)."""
        return {}


def evaluated(evaluate: Callable[[GPT], dict[str, float]], model: GPT) -> dict[str, float]:
    """evaluate(model) in eval mode without gradients; the model back in training mode after."""
    model.eval()
    with torch.no_grad():
        result = evaluate(model)
    model.train()
    return result


# ---------------------------------------------------------------------------
# checkpoints


def publish_checkpoint(worker: Worker, manager: CheckpointManager, step: int, metrics: dict[str, float],
                       write: Callable[[Path], None], barrier: Callable[[], object] | None = None) -> float:
    """Rank 0 writes the step's checkpoint folder with write(folder); Ray Train uploads it with the metrics
    (every rank reports), then rank 0 marks it latest. Returns the seconds it took. Both backends save
    through here; what each has to gather from every rank it gathers before.

    Every rank then waits at `barrier` (default: the worker's) for rank 0 to be done: the other ranks'
    report returns while rank 0 still uploads, and a rank that died then would take the group, and the
    half-uploaded checkpoint, down with it. After the barrier a reported checkpoint is a resumable one."""
    import ray.train

    started = time.time()
    with checkpoint_scratch() as tmp:
        checkpoint = None
        if worker.is_main:
            write(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=step_dir_name(step))
        if worker.is_main:
            manager.mark_latest(step)
    (barrier or worker.barrier)()
    return time.time() - started


SCRATCH_PREFIX = "nanochat-ckpt-"


def checkpoint_scratch(root: Path | None = None) -> tempfile.TemporaryDirectory:
    """A temporary folder (in root, default the system's) for rank 0 to write a checkpoint in before Ray Train
    uploads it, named after this process; first removes the folders there of processes that no longer run. A
    worker killed mid-save never runs TemporaryDirectory's cleanup, and a large model's checkpoint left behind
    at every crash would fill the node's disk: the restarted worker's first save clears it."""
    root = Path(root or tempfile.gettempdir())
    for left in root.glob(f"{SCRATCH_PREFIX}*-*"):
        pid = left.name.removeprefix(SCRATCH_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _process_runs(int(pid)):
            log.info("removing %s, the checkpoint folder of a process that no longer runs", left)
            shutil.rmtree(left, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=root)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_checkpoint(stage: Stage, manager: CheckpointManager, model: GPT, optimizers, loader: Loader,
                    state: TrainState, metrics: dict[str, float]) -> float:
    """A torch stage's checkpoint: weights, optimizer state, every rank's cursor and RNG state, the progress."""
    worker = stage.worker
    cursors = worker.all_gather(loader.state_dict())
    rngs = worker.all_gather(capture_rng_state())
    # sharded: every rank sends rank 0 its part, and the checkpoint holds the whole state as unsharded runs do
    optimizer_state = stage.sharding.gathered_state_dict(optimizers) if stage.sharding else None
    return publish_checkpoint(worker, manager, state.step, metrics, lambda folder: write_checkpoint(
        folder, model_state=model.state_dict(),
        optimizer_state={"optimizers": optimizer_state or optimizers_state_dict(optimizers)},
        cursor=cursors, config=stage.cfg.model_dump(), rng={"ranks": rngs},
        meta={"stage": stage.name, "backend": "torch", "world_size": worker.world_size,
              "model_config": vars(model.config), **state.__dict__},
    ))


def load_latest(manager: CheckpointManager, worker: Worker, backend: str,
                map_location: str | torch.device | None = None) -> tuple[int, Checkpoint] | None:
    """The stage's newest valid checkpoint, refused unless this backend and worker group wrote it; its tensors
    on map_location (default: the worker's device)."""
    with tempfile.TemporaryDirectory(prefix=f"nanochat-restore-{worker.rank}-") as tmp:
        found = manager.latest_valid(Path(tmp))
        if found is None:
            return None
        step, folder = found
        ckpt = read_checkpoint(folder, map_location=map_location or worker.device)
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


def resumed_state(step: int, ckpt: Checkpoint) -> TrainState:
    # a field the checkpoint's writer did not have keeps its default
    state = TrainState(**{k: ckpt.meta[k] for k in TrainState.__dataclass_fields__ if k in ckpt.meta})
    state.resumed_from.append(step)
    return state


def restore_checkpoint(manager: CheckpointManager, worker: Worker, model: GPT, optimizers,
                       sharding: ZeroSharding | None = None) -> tuple[TrainState, dict | None]:
    """Load the stage's newest valid checkpoint into model and optimizers (with a sharding, only the state
    this rank owns); returns the state and this rank's cursor."""
    # sharded: read into host memory, so that only this rank's share of the optimizer state reaches its device
    found = load_latest(manager, worker, "torch", "cpu" if sharding else None)
    if found is None:
        return TrainState(), None
    step, ckpt = found
    model.load_state_dict(ckpt.model_state)
    load_optimizers_state_dict(optimizers, ckpt.optimizer_state["optimizers"], sharding)
    restore_rng_state(ckpt.rng["ranks"][worker.rank])
    log.info("rank %d resumed from step %d", worker.rank, step)
    return resumed_state(step, ckpt), ckpt.cursor[worker.rank]


# ---------------------------------------------------------------------------
# publishing: what every Ray Train stage (torch or JAX) does after a step and at the end


def maybe_inject_fault(settings: WorkerSettings, storage: Storage, step: int, worker: Worker, stage_prefix: str) -> None:
    """Test hook: kill the last worker process once at a chosen step, as a crashed node would."""
    if settings.fail_at_step is None or step != settings.fail_at_step or worker.rank != worker.world_size - 1:
        return
    marker = f"{stage_prefix}fault_injected_at_{step}"
    if storage.exists(marker):
        return
    storage.write_text(marker, "")
    log.warning("fault injection: rank %d exits at step %d", worker.rank, step)
    os._exit(1)


def progress_tracker(settings: WorkerSettings):
    """The driver's progress board, if it asked for one and it is still there."""
    import ray

    try:
        return ray.get_actor(settings.progress_actor) if settings.progress_actor else None
    except ValueError:
        return None


def make_telemetry(settings: WorkerSettings, name: str, worker: Worker) -> TrainTelemetry:
    main, cfg = worker.is_main, settings.config
    tensorboard_dir = Path(settings.tensorboard_dir) if main and settings.tensorboard_dir else None
    return TrainTelemetry(cfg.run, name, tensorboard_dir=tensorboard_dir,
                          wandb_mode=cfg.log.wandb if main else "disabled", wandb_project=cfg.log.wandb_project,
                          config=cfg.model_dump())


@dataclass
class Publisher:
    """Where a Ray Train stage's steps go: Ray Train (reports and checkpoints), telemetry, the progress bar,
    and at the end the stage's summary (DONE.json)."""

    name: str
    cfg: Config
    worker: Worker
    manager: CheckpointManager
    state: TrainState
    horizon: int
    telemetry: TrainTelemetry
    tracker: Any
    save: Callable[[dict[str, float]], float]  # checkpoint and report to Ray Train; returns its seconds

    @classmethod
    def open(cls, settings: WorkerSettings, name: str, worker: Worker, manager: CheckpointManager,
             state: TrainState, horizon: int, save: Callable[[dict[str, float]], float]) -> Publisher:
        return cls(name, settings.config, worker, manager, state, horizon, make_telemetry(settings, name, worker),
                   progress_tracker(settings) if worker.is_main else None, save)

    def step(self, metrics: dict[str, float]) -> None:
        """After an optimizer step: checkpoint (every checkpoint_every steps and at the end) through save, which
        reports to Ray Train, or just report; then publish the metrics."""
        import ray.train

        step, cfg = self.state.step, self.cfg
        if step % cfg.train.checkpoint_every == 0 or step == self.horizon:
            metrics["checkpoint_seconds"] = self.save({**metrics, "step": step})
        elif step % cfg.log.every == 0:
            ray.train.report({**metrics, "step": step})
        if self.worker.is_main:
            self.telemetry.log(step, metrics)
            if self.tracker is not None:
                self.tracker.update.remote(step, self.horizon, metrics)

    def finish(self, model: GPT, extra: dict[str, Any]) -> None:
        """Record the stage as done (DONE.json, rank 0) with its summary."""
        if self.worker.is_main:
            record = summary(self.name, self.state, model, self.cfg, self.horizon)
            record["metrics"].update(extra)
            self.manager.mark_done(record)
        self.telemetry.close()


def summary(name: str, state: TrainState, model: GPT, cfg: Config, horizon: int) -> dict[str, Any]:
    """The stage's record in DONE.json and its JSON line."""
    last_eval = state.evals[-1] if state.evals else {}
    return {
        "stage": name, "run": cfg.run, "steps": state.step, "tokens": state.tokens,
        "seconds": state.train_seconds, "tokens_per_second": state.tokens_per_second(),
        "metrics": {
            "final_loss": state.history[-1]["loss"] if state.history else None,
            **{k: v for k, v in last_eval.items() if k != "step"},
            "params": model.num_params(), "horizon": horizon, "resumed_from": state.resumed_from,
            "optimizer_from": state.optimizer_from,
        },
    }


# ---------------------------------------------------------------------------
# a torch stage's worker function


def train_stage(settings: WorkerSettings, stage_class: type[Stage]) -> None:
    """Ray Train's train_loop_per_worker body for any torch stage: set up (restored from the stage's newest
    valid checkpoint when there is one), then the step loop, then the summary."""
    cfg = settings.config
    worker = current_worker(settings.threads_per_worker)
    storage = open_storage(settings.storage)
    stage = stage_class(cfg, worker, storage, load_tokenizer(storage))
    manager = CheckpointManager(storage, cfg.run, stage.name)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = stage.build_model().to(worker.device).train()
    optim_cfg = stage.optim_config()
    optimizers = build_optimizers(model, optim_cfg)
    stage.sharding = shard_optimizers(cfg.train.shard_optimizer, optimizers, worker)
    state, cursor = restore_checkpoint(manager, worker, model, optimizers, stage.sharding)
    warm_from = stage.warm_start(optimizers, resumed=bool(state.resumed_from))
    if warm_from is not None:
        state.optimizer_from = warm_from  # saved with every checkpoint, so a resumed stage still knows
    if cursor is None:
        torch.manual_seed(cfg.train.seed + worker.rank)
    forward = stage.wrap(model)
    stage.size_batch(forward, model)
    loader, horizon = stage.make_loader(cursor), stage.horizon(model)
    publisher = Publisher.open(settings, stage.name, worker, manager, state, horizon,
                               lambda m: save_checkpoint(stage, manager, model, optimizers, loader, state, m))
    flops_per_token, peak = model.estimate_flops(), peak_flops(worker.device)

    def mfu(tokens_per_second: float) -> dict[str, float]:
        if not (peak and stage.reports_mfu):
            return {}
        return {"mfu": 100 * flops_per_token * tokens_per_second / (peak * worker.world_size)}

    if worker.is_main:
        log.info("%s", stage.describe(model, horizon))
    step_loop(state, horizon, StepHooks(
        schedule=lambda step: apply_schedule(optimizers, step, horizon, optim_cfg),
        train=lambda schedule: stage.train_step(forward, model, optimizers, loader),
        evaluates_at=lambda step: stage.evaluates_at(step, horizon),
        evaluate=lambda: evaluated(stage.evaluate, model),
        publish=publisher.step,
        before=lambda step: maybe_inject_fault(settings, storage, step, worker, manager.stage_prefix),
        throughput=mfu,
    ))
    # every rank's optimizer state, so DONE.json shows what train.shard_optimizer saves
    state_sizes = worker.all_gather(state_bytes(optimizers))
    publisher.finish(model, {**stage.summary_extra(state), "optimizer_state_bytes": state_sizes})
