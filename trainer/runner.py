"""
Runs a training stage as a Ray Train job: the driver side of every `nanochat train <stage>`.

Notable:
- ScalingConfig from train.workers / train.gpus_per_worker; RunConfig storage on the project's storage, so
  Ray Train itself uploads each checkpoint to runs/<run>/<stage>/step_XXXXXX/ (an S3 prefix through a
  pyarrow S3FileSystem with the endpoint override, or a local folder)
- FailureConfig(max_failures) restarts a crashed worker group, which resumes from the newest valid checkpoint;
  CheckpointConfig(num_to_keep) prunes old ones
- the same call against `--ray-address` runs on an existing cluster (multi-node, KubeRay)
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanochat.config import Config
from services.checkpoints import CheckpointManager
from services.ray_cluster import connect
from services.settings import default_storage_uri
from services.storage import LocalStorage, Storage
from trainer.progress import ProgressBar

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    pass


def tensorboard_dir(storage: Storage, cfg: Config, stage: str) -> Path:
    """Event files live beside the checkpoints when storage is a local folder, else in the local cache."""
    if isinstance(storage, LocalStorage):
        return storage.root / "runs" / cfg.run / "tensorboard" / stage
    return Path(default_storage_uri()).expanduser() / "tensorboard" / cfg.run / stage


STAGE_FUNCTIONS = {
    "base": "trainer.base_train:train_base",
    "mid": "trainer.chat_train:train_mid",
    "sft": "trainer.chat_train:train_sft",
    "rl": "trainer.rl_train:train_rl",
}


# the stages whose newest checkpoint a stage starts from, in order of preference
STARTS_FROM = {"base": [], "mid": ["base"], "sft": ["mid", "base"], "rl": ["sft"]}


def stage_function(stage: str) -> Callable[[dict[str, Any]], None]:
    """The Ray Train worker function of a stage, imported on demand."""
    module, _, name = STAGE_FUNCTIONS[stage].partition(":")
    return getattr(importlib.import_module(module), name)


def worker_env() -> dict[str, str]:
    """Settings the workers must share with the driver: object-storage credentials and endpoint."""
    keys = [k for k in os.environ if k.startswith("AWS_")] + ["NANOCHAT_STORAGE", "OMP_NUM_THREADS"]
    return {k: os.environ[k] for k in keys if k in os.environ}


def _fit(
    name: str,
    train_fn: Callable[[dict[str, Any]], None],
    job: dict[str, Any],
    cfg: Config,
    storage: Storage,
    *,
    ray_address: str | None,
    show_progress: bool,
) -> None:
    """One TorchTrainer.fit(): Ray Train state and checkpoints under runs/<run>/<name>/."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    connect(ray_address)
    fs, storage_path, ray_name = CheckpointManager(storage, cfg.run, name).ray_run_location()
    progress_actor = f"nanochat-progress-{uuid.uuid4().hex[:8]}"
    job = {**job, "config": cfg.model_dump(), "storage": storage.uri,
           "progress_actor": progress_actor if show_progress else None}
    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": 1, **({"GPU": t.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=job,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=ray_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )
    log.info("%s: %d workers, storage %s/runs/%s/%s", name, t.workers, storage.uri, cfg.run, name)
    try:
        if show_progress:
            with ProgressBar(progress_actor, name):
                trainer.fit()
        else:
            trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise StageFailed(f"{name} failed after {t.max_failures} restarts: {e}") from e


def run_stage(
    stage: str,
    train_fn: Callable[[dict[str, Any]], None],
    cfg: Config,
    storage: Storage,
    *,
    ray_address: str | None = None,
    fail_at_step: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run one training stage to completion (or resume it) and return the summary its rank 0 recorded."""
    started = time.time()
    job = {"stage": stage, "fail_at_step": fail_at_step,
           "tensorboard_dir": str(tensorboard_dir(storage, cfg, stage)) if cfg.log.tensorboard else None}
    _fit(stage, train_fn, job, cfg, storage, ray_address=ray_address, show_progress=show_progress)
    summary = CheckpointManager(storage, cfg.run, stage).done_summary()
    if summary is None:
        raise StageFailed(f"{stage} ended without recording its summary (runs/{cfg.run}/{stage}/DONE.json)")
    # the workers measured steady-state step time; the caller wants this command's wall time too
    summary["metrics"]["train_seconds"] = summary["seconds"]
    summary["seconds"] = round(time.time() - started, 3)
    return summary


def run_eval(
    kind: str,
    cfg: Config,
    storage: Storage,
    *,
    stage: str = "base",
    tasks: list[str] | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """`eval loss|core|chat` of a stage's newest checkpoint, spread over the workers; returns the saved result."""
    from trainer.evaluate import eval_worker, result_key

    key = result_key(cfg.run, stage, kind)
    storage.delete(key)
    job = {"kind": kind, "stage": stage, "tasks": tasks}
    _fit(f"eval-{stage}-{kind}", eval_worker, job, cfg, storage, ray_address=ray_address, show_progress=False)
    return json.loads(storage.read_text(key))
