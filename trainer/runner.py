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

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanochat.config import Config
from services.ray_cluster import connect
from services.settings import default_storage_uri
from services.storage import LocalStorage, Storage
from trainer.checkpoints import CheckpointManager
from trainer.progress import ProgressBar

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    pass


def tensorboard_dir(storage: Storage, cfg: Config, stage: str) -> Path:
    """Event files live beside the checkpoints when storage is a local folder, else in the local cache."""
    if isinstance(storage, LocalStorage):
        return storage.root / "runs" / cfg.run / "tensorboard" / stage
    return Path(default_storage_uri()).expanduser() / "tensorboard" / cfg.run / stage


def worker_env() -> dict[str, str]:
    """Settings the workers must share with the driver: object-storage credentials and endpoint."""
    keys = [k for k in os.environ if k.startswith("AWS_")] + ["NANOCHAT_STORAGE", "OMP_NUM_THREADS"]
    return {k: os.environ[k] for k in keys if k in os.environ}


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
    """Run one stage to completion (or resume it) and return the summary its rank 0 recorded."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    connect(ray_address)
    fs, storage_path, name = CheckpointManager(storage, cfg.run, stage).ray_run_location()
    progress_actor = f"nanochat-progress-{uuid.uuid4().hex[:8]}"
    job = {
        "config": cfg.model_dump(), "storage": storage.uri, "stage": stage, "fail_at_step": fail_at_step,
        "progress_actor": progress_actor if show_progress else None,
        "tensorboard_dir": str(tensorboard_dir(storage, cfg, stage)) if cfg.log.tensorboard else None,
    }
    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": 1, **({"GPU": t.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=job,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )
    log.info("%s: %d workers, checkpoints in %s/runs/%s/%s", stage, t.workers, storage.uri, cfg.run, stage)
    try:
        if show_progress:
            with ProgressBar(progress_actor, f"train {stage}"):
                trainer.fit()
        else:
            trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise StageFailed(f"{stage} training failed after {t.max_failures} restarts: {e}") from e
    summary = CheckpointManager(storage, cfg.run, stage).done_summary()
    if summary is None:
        raise StageFailed(f"{stage} ended without recording its summary (runs/{cfg.run}/{stage}/DONE.json)")
    return summary
