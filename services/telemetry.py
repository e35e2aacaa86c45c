"""
Telemetry: one place where training and serving publish numbers.

Notable:
- Prometheus metrics use vLLM-style names (`nanochat:train_loss`); inside a Ray process they go through
  `ray.util.metrics`, so Ray's metrics agent exports them from every worker and replica (on Kubernetes the
  same endpoint Ray's own metrics are scraped from) as `ray_nanochat_train_loss` (Ray allows no ':');
  outside Ray they are plain `prometheus_client` metrics under their own names
- TensorBoard via tensorboardX (event files in a local folder; callers upload them to storage)
- Weights & Biases only when asked; "offline" mode needs no account or network
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAIN_METRICS = {
    "loss": ("nanochat:train_loss", "training loss (nats per token) at the last step"),
    "tokens_per_second": ("nanochat:train_tokens_per_second", "training throughput over all workers"),
    "mfu": ("nanochat:train_mfu", "model FLOPs utilisation, percent of the accelerator's peak"),
    "lr_multiplier": ("nanochat:train_lr_multiplier", "learning-rate schedule multiplier"),
    "step": ("nanochat:train_step", "optimizer steps completed"),
    "step_seconds": ("nanochat:train_step_seconds", "wall time of the last optimizer step"),
    "checkpoint_seconds": ("nanochat:train_checkpoint_seconds", "wall time of the last checkpoint"),
    "val_bpb": ("nanochat:train_val_bpb", "validation bits per byte"),
}


def _in_ray() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


class Gauges:
    """A set of gauges labelled with run and stage, backed by Ray's metrics in Ray, prometheus_client outside."""

    _local: dict[str, Any] = {}  # prometheus_client refuses to register a name twice per process

    def __init__(self, specs: dict[str, tuple[str, str]], labels: dict[str, str], use_ray: bool | None = None):
        self.labels = labels
        self.gauges: dict[str, Any] = {}
        keys = tuple(labels)
        use_ray = _in_ray() if use_ray is None else use_ray
        for key, (name, description) in specs.items():
            if use_ray:
                from ray.util.metrics import Gauge

                # Ray's exporter refuses ':' and adds its own prefix: nanochat:x -> ray_nanochat_x
                gauge = Gauge(name.replace(":", "_"), description=description, tag_keys=keys)
                gauge.set_default_tags(labels)
                self.gauges[key] = gauge
            else:
                from prometheus_client import Gauge

                if name not in Gauges._local:
                    Gauges._local[name] = Gauge(name, description, keys)
                self.gauges[key] = Gauges._local[name].labels(**labels)

    def set(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            gauge = self.gauges.get(key)
            if gauge is not None and value is not None and math.isfinite(value):
                gauge.set(value)


class TrainTelemetry:
    """Publishes a training stage's per-step metrics to Prometheus, TensorBoard and (optionally) W&B."""

    def __init__(
        self,
        run: str,
        stage: str,
        *,
        tensorboard_dir: Path | None,
        wandb_mode: str = "disabled",
        wandb_project: str = "nanochat",
        config: dict[str, Any] | None = None,
        use_ray: bool | None = None,
    ):
        self.gauges = Gauges(TRAIN_METRICS, {"run": run, "stage": stage}, use_ray)
        self.writer = None
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            tensorboard_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(logdir=str(tensorboard_dir), flush_secs=10)
        self.wandb_run = None
        if wandb_mode != "disabled":
            self.wandb_run = _start_wandb(
                run, stage, wandb_mode, wandb_project, config or {}, tensorboard_dir
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.gauges.set({**metrics, "step": step})
        if self.writer is not None:
            for key, value in metrics.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb(run: str, stage: str, mode: str, project: str, config: dict[str, Any], log_dir: Path | None):
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(
            "log.wandb is set but wandb is not installed: pip install 'nanochat[wandb]'"
        ) from e
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise RuntimeError(
            "log.wandb=online needs WANDB_API_KEY; use log.wandb=offline to log without an account"
        )
    directory = str(log_dir.parent if log_dir else Path.cwd())
    return wandb.init(
        project=project,
        name=f"{run}-{stage}",
        group=run,
        mode=mode,
        config=config,
        dir=directory,
        settings=wandb.Settings(silent=True, console="off"),
    )
