"""
The speedrun: every stage in order, each skipped when its output already exists and verifies.

Notable:
- one embedded Ray for the whole pipeline (started on the first Ray stage), so start-up is paid once
- a stage that fails stops the run with the stage and cause named; running again continues where it stopped
  (the corpus and tokenizer are not redone, training resumes from its newest valid checkpoint)
- evaluations whose data cannot be had offline are skipped with the reason, not failed
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from nanochat.config import Config
from services.checkpoints import CheckpointManager
from services.storage import Storage
from trainer.evaluate import core_bundle_dir, result_key

log = logging.getLogger(__name__)

NOT_BUILT = ["train mid", "eval chat", "train sft", "train rl", "report"]


class SpeedrunFailed(RuntimeError):
    pass


def _stage_data(cfg: Config, storage: Storage, ray_address: str | None) -> str:
    from trainer.data import prepare_corpus

    summary = prepare_corpus(cfg.data, storage)
    return "skipped (complete)" if summary.get("skipped") else "done"


def _stage_tokenizer(cfg: Config, storage: Storage, ray_address: str | None) -> str:
    from trainer.tok import tokenizer_is_current, train_tokenizer

    if tokenizer_is_current(cfg, storage):
        return "skipped (current)"
    train_tokenizer(cfg, storage)
    return "done"


def _stage_base(cfg: Config, storage: Storage, ray_address: str | None) -> str:
    from trainer.base_train import train_base
    from trainer.runner import run_stage

    if CheckpointManager(storage, cfg.run, "base").done_summary() is not None:
        return "skipped (complete)"
    run_stage("base", train_base, cfg, storage, ray_address=ray_address)
    return "done"


def _eval_stage(kind: str) -> Callable[[Config, Storage, str | None], str]:
    def stage(cfg: Config, storage: Storage, ray_address: str | None) -> str:
        from trainer.runner import run_eval

        done = CheckpointManager(storage, cfg.run, "base").done_summary()
        key = result_key(cfg.run, "base", kind)
        if storage.exists(key) and done and json.loads(storage.read_text(key)).get("step") == done["steps"]:
            return "skipped (complete)"
        if kind == "core":
            try:
                core_bundle_dir(cfg, storage, attempts=2)
            except Exception as e:  # noqa: BLE001 - offline machines have no bundle: skip, say why
                return f"skipped: CORE eval bundle unavailable ({type(e).__name__}: {e})"
        run_eval(kind, cfg, storage, stage="base", ray_address=ray_address)
        return "done"

    return stage


STAGES: list[tuple[str, Callable[[Config, Storage, str | None], str]]] = [
    ("data", _stage_data),
    ("tokenizer", _stage_tokenizer),
    ("base", _stage_base),
    ("eval loss", _eval_stage("loss")),
    ("eval core", _eval_stage("core")),
]


def speedrun(cfg: Config, storage: Storage, ray_address: str | None = None) -> dict[str, Any]:
    """Run every stage; returns {stage: outcome}. Raises SpeedrunFailed naming the stage that failed."""
    outcomes: dict[str, Any] = {}
    for name, stage in STAGES:
        started = time.time()
        print(f"speedrun: {name} ...", flush=True)
        try:
            outcome = stage(cfg, storage, ray_address)
        except Exception as e:
            raise SpeedrunFailed(f"stage {name!r} failed: {type(e).__name__}: {e}") from e
        outcomes[name] = {"outcome": outcome, "seconds": round(time.time() - started, 1)}
        print(f"speedrun: {name}: {outcome} ({outcomes[name]['seconds']} s)", flush=True)
    for name in NOT_BUILT:
        outcomes[name] = {"outcome": "not built yet in this version"}
    print(f"speedrun: not built yet in this version: {', '.join(NOT_BUILT)}", flush=True)
    return outcomes
