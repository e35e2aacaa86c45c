"""
Evaluations of a trained checkpoint, run as Ray Train jobs so they spread over the same workers as training,
or in the training job itself, after its last step (the speedrun: one Ray Train start fewer per evaluation).

Notable:
- `eval loss`: bits per byte on the train and validation splits (nanochat's base_loss), each rank
  evaluating its own share of row groups and the sums all-reduced
- `eval core`: the CORE metric over the DCLM task bundle, items split across ranks
- `eval chat`: the chat tasks and ChatCORE (trainer/evals/chat.py); tasks without data are listed as skipped
- results go to runs/<run>/evals/<stage>_<kind>.json, which the report and the speedrun read
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from nanochat.config import Config
from services.checkpoints import CheckpointManager
from services.layout import eval_result_key
from services.storage import Storage, open_storage
from trainer.batch_size import FALLBACK_ROWS
from trainer.data.corpus import list_shards, split_shards
from trainer.data.loader import DataLoader, token_bytes
from trainer.data.tokenizer import load_tokenizer
from trainer.evals.chat import run_chat_eval
from trainer.evals.core import core_bundle_dir, evaluate_core
from trainer.evals.loss import evaluate_bpb
from trainer.worker import WorkerSettings, current_worker

log = logging.getLogger(__name__)


def _bpb(model, cfg: Config, storage: Storage, tokenizer, worker, shards: list[str]) -> float:
    t = cfg.train
    rows = t.device_batch_size or FALLBACK_ROWS  # auto measures a training step; evaluation takes less
    steps = max(1, cfg.eval.loss_tokens // (rows * t.seq_len * worker.world_size))
    loader = DataLoader(storage, shards, tokenizer, batch_size=rows, seq_len=t.seq_len,
                        rank=worker.rank, world_size=worker.world_size, device=worker.device, loop=False)
    with worker.autocast():
        return evaluate_bpb(model, iter(loader), steps, token_bytes(tokenizer).to(worker.device))


def eval_worker(settings: WorkerSettings) -> None:
    """Ray Train's train_loop_per_worker for `nanochat eval loss|core|chat`."""
    cfg, kind, stage = settings.config, settings.kind, settings.stage
    tasks = list(settings.tasks) if settings.tasks else None
    worker = current_worker(settings.threads_per_worker)
    storage = open_storage(settings.storage)
    tokenizer = load_tokenizer(storage)
    model, step = CheckpointManager(storage, cfg.run, stage).load_model(worker.device)
    result: dict[str, Any] = {"stage": stage, "step": step, "kind": kind}
    if settings.evaluated_in:
        result["evaluated_in"] = settings.evaluated_in  # the speedrun says where its evaluation stage was done
    with torch.no_grad():
        if kind == "loss":
            train, val = split_shards(list_shards(storage, cfg.data.corpus_name), cfg.data.val_shards)
            result["train_bpb"] = _bpb(model, cfg, storage, tokenizer, worker, train)
            result["val_bpb"] = _bpb(model, cfg, storage, tokenizer, worker, val)
        elif kind == "core":
            limit = cfg.eval.core_max_per_task if cfg.eval.core_max_per_task > 0 else None
            with worker.autocast():
                result.update(evaluate_core(model, tokenizer, core_bundle_dir(cfg, storage), tasks=tasks,
                                            max_per_task=limit, device=worker.device))
        elif kind == "chat":
            result.update(run_chat_eval(model, tokenizer, cfg, storage, worker, tasks=tasks))
        else:
            raise ValueError(f"unknown evaluation {kind!r}")
    if worker.is_main:
        import json

        storage.write_text(eval_result_key(cfg.run, stage, kind), json.dumps(result, indent=2))


def train_then_evaluate(train_fn: Callable[[WorkerSettings], None], settings: WorkerSettings) -> None:
    """Ray Train's train_loop_per_worker for a training stage followed by evaluations (settings.evaluations)
    of the checkpoint it ends with, in the same workers. An evaluation that fails fails the job, as a crash
    would: a rank that skipped ahead would leave the others waiting in a collective."""
    train_fn(settings)
    for kind in settings.evaluations:
        try:
            eval_worker(replace(settings, kind=kind, evaluated_in=f"{settings.stage} training job"))
        except Exception as e:
            raise RuntimeError(f"{settings.stage} trained, then its {kind} evaluation failed: {e}") from e
