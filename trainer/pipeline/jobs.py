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

import functools
import importlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nanochat.config import Config
from services.checkpoints import CheckpointManager
from services.layout import DONE, eval_result_key, stage_prefix, tensorboard_path
from services.ray_cluster import connect
from services.settings import default_storage_uri
from services.storage import LocalStorage, Storage
from trainer.pipeline.progress import ProgressBar
from trainer.stages.table import STAGES, StageFailed, stage_backend
from trainer.worker import WorkerSettings

log = logging.getLogger(__name__)


def tensorboard_dir(storage: Storage, cfg: Config, stage: str) -> Path:
    """Event files live beside the checkpoints when storage is a local folder, else in the local cache."""
    if isinstance(storage, LocalStorage):
        return storage.root / tensorboard_path(cfg.run, stage)
    return Path(default_storage_uri()).expanduser() / "tensorboard" / cfg.run / stage


def stage_function(stage: str, cfg: Config) -> Callable[[WorkerSettings], None]:
    """The Ray Train worker function of a stage on its configured backend, imported on demand. For JAX it
    first checks what the driver can (JAX installed, the batch splits over the devices): before Ray starts."""
    backend = stage_backend(stage, cfg.train.backend)
    if backend == "jax":
        from trainer.jaxgpt.train import preflight

        preflight(cfg)
    module, _, name = STAGES[stage].workers[backend].partition(":")
    return getattr(importlib.import_module(module), name)


def worker_count(cfg: Config, backend: str) -> int:
    """Ray Train workers of a stage: train.workers, except JAX on CPU, where one worker drives the devices."""
    if backend == "jax" and cfg.jax.platform not in ("gpu", "tpu"):
        return 1
    return cfg.train.workers


def check_resumable(stage: str, cfg: Config, storage: Storage, backend: str) -> None:
    """Refuse before Ray starts what the workers would refuse after theirs have started (and again on every
    restart): resuming a stage whose newest checkpoint another backend or another number of workers wrote."""
    from trainer.stages.loop import resume_problem

    found = CheckpointManager(storage, cfg.run, stage).newest_meta()
    if found is not None and (problem := resume_problem(*found, backend, worker_count(cfg, backend))):
        raise StageFailed(f"{stage}: {problem}")


def _trainer(train_fn: Callable[[WorkerSettings], None], settings: WorkerSettings, cfg: Config, backend: str,
             run_config):
    """TorchTrainer (DDP over train.workers) or JaxTrainer (one worker per host; on CPU a single worker
    drives jax.cpu_devices virtual devices, and jax.distributed joins the hosts of a GPU or TPU slice)."""
    import ray.train

    t = cfg.train
    if backend == "jax":
        from ray.train.v2.jax import JaxTrainer

        platform = cfg.jax.platform
        workers = worker_count(cfg, backend)
        if workers != t.workers:
            log.info("jax on CPU: one worker drives %d devices (train.workers=%d applies to GPU/TPU hosts)",
                     cfg.jax.cpu_devices, t.workers)
        resources = {"CPU": 1, **({"GPU": t.gpus_per_worker} if platform == "gpu" else {})}
        tpu = dict(use_tpu=True, topology=cfg.jax.tpu_topology, accelerator_type=cfg.jax.tpu_accelerator) \
            if platform == "tpu" else {}
        scaling = ray.train.ScalingConfig(num_workers=workers, use_gpu=platform == "gpu",
                                          resources_per_worker=None if tpu else resources, **tpu)
        return JaxTrainer(train_fn, train_loop_config=settings, scaling_config=scaling, run_config=run_config)

    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": 1, **({"GPU": t.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_fn,
        train_loop_config=settings,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=run_config,
    )


def _with_ray_train_log_level(train_fn: Callable[[WorkerSettings], None], settings: WorkerSettings) -> None:
    """train_fn in a worker, with Ray Train's console level (log.ray_train) on the one logger LoggingConfig
    misses: Ray 2.60 logs every report at INFO through a logger named by its file path, not under `ray.train`."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(settings.config.log.ray_train)
    train_fn(settings)


def configured_threads(cfg: Config) -> int:
    """Torch threads per CPU worker: train.threads_per_worker, else this command's OMP_NUM_THREADS (read here:
    Ray sets its own in every worker), else 0, each worker's share of its node's CPUs."""
    if cfg.train.threads_per_worker > 0:
        return cfg.train.threads_per_worker
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() and int(omp) > 0 else 0


def worker_env() -> dict[str, str]:
    """Settings the workers must share with the driver: object-storage credentials and endpoint."""
    keys = [k for k in os.environ if k.startswith("AWS_")] + ["NANOCHAT_STORAGE", "OMP_NUM_THREADS", "JAX_PLATFORMS"]
    return {k: os.environ[k] for k in keys if k in os.environ}


def _fit(
    name: str,
    train_fn: Callable[[WorkerSettings], None],
    cfg: Config,
    storage: Storage,
    *,
    ray_address: str | None,
    show_progress: bool,
    backend: str = "torch",
    **job: Any,
) -> None:
    """One Ray Train fit(): Ray Train state and checkpoints under runs/<run>/<name>/. job: the
    WorkerSettings fields of this kind of job (stage, evaluations, kind, ...)."""
    import ray.train

    t = cfg.train
    connect(ray_address, dashboard=False)  # an embedded cluster: its CPUs are the workers'
    fs, storage_path, ray_name = CheckpointManager(storage, cfg.run, name).ray_run_location()
    progress_actor = f"nanochat-progress-{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(config=cfg, storage=storage.uri, threads_per_worker=configured_threads(cfg),
                              progress_actor=progress_actor if show_progress else None, **job)
    run_config = ray.train.RunConfig(
        name=ray_name,
        storage_path=storage_path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
        logging_config=ray.train.LoggingConfig(log_level=cfg.log.ray_train),
        worker_runtime_env={"env_vars": worker_env()},
    )
    trainer = _trainer(functools.partial(_with_ray_train_log_level, train_fn), settings, cfg, backend, run_config)
    log.info("%s: %d workers, storage %s/%s", name, t.workers, storage.uri, stage_prefix(cfg.run, name))
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
    train_fn: Callable[[WorkerSettings], None],
    cfg: Config,
    storage: Storage,
    *,
    ray_address: str | None = None,
    fail_at_step: int | None = None,
    show_progress: bool = True,
    evaluations: Sequence[str] = (),
) -> dict[str, Any]:
    """Run one training stage to completion (or resume it) and return the summary its rank 0 recorded.
    evaluations (loss, core, chat; torch stages) then run in the same job on the checkpoint it ends with."""
    started = time.time()
    backend = stage_backend(stage, cfg.train.backend)
    check_resumable(stage, cfg, storage, backend)
    if evaluations:
        if backend != "torch":
            raise ValueError(f"evaluations run in torch training jobs only, not in {stage}'s {backend} job")
        from trainer.stages.evaluate import train_then_evaluate

        train_fn = functools.partial(train_then_evaluate, train_fn)
    _fit(stage, train_fn, cfg, storage, ray_address=ray_address, show_progress=show_progress, backend=backend,
         stage=stage, fail_at_step=fail_at_step, evaluations=tuple(evaluations),
         tensorboard_dir=str(tensorboard_dir(storage, cfg, stage)) if cfg.log.tensorboard else None)
    summary = CheckpointManager(storage, cfg.run, stage).done_summary()
    if summary is None:
        raise StageFailed(f"{stage} ended without recording its summary ({stage_prefix(cfg.run, stage)}{DONE})")
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
    from trainer.stages.evaluate import eval_worker

    key = eval_result_key(cfg.run, stage, kind)
    storage.delete(key)
    _fit(f"eval-{stage}-{kind}", eval_worker, cfg, storage, ray_address=ray_address, show_progress=False,
         stage=stage, kind=kind, tasks=tuple(tasks) if tasks else None)
    return json.loads(storage.read_text(key))
