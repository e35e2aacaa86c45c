"""
The speedrun: every stage in order, each skipped when its output already exists and verifies.

Notable:
- one embedded Ray for the whole pipeline (started on the first Ray stage), so start-up is paid once
- a training job also runs the evaluation listed after it (base: loss; mid, sft, rl: chat) on its final
  checkpoint, so that evaluation's stage finds it complete: each Ray Train start saved is ~10 s of a tiny run
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
from trainer.stages.evaluate import core_bundle_dir, result_key

log = logging.getLogger(__name__)

class SpeedrunFailed(RuntimeError):
    pass


def stage_data(cfg: Config, storage: Storage, ray_address: str | None) -> str:
    from trainer.data.corpus import prepare_corpus

    summary = prepare_corpus(cfg.data, storage)
    return "skipped (complete)" if summary.get("skipped") else "done"


def stage_tokenizer(cfg: Config, storage: Storage, ray_address: str | None) -> str:
    from trainer.data.tokenizer import tokenizer_is_current, train_tokenizer

    if tokenizer_is_current(cfg, storage):
        return "skipped (current)"
    train_tokenizer(cfg, storage)
    return "done"


def _train_stage(name: str, evaluation: str | None = None) -> Callable[[Config, Storage, str | None], str]:
    """A training stage; on the torch backend its job then runs `evaluation` too, which the evaluation's own
    stage then finds complete: one Ray Train start fewer (~10 s of a tiny run's stage)."""

    def stage(cfg: Config, storage: Storage, ray_address: str | None) -> str:
        from trainer.pipeline.jobs import run_stage, stage_backend, stage_function

        if CheckpointManager(storage, cfg.run, name).done_summary() is not None:
            return "skipped (complete)"
        evaluations = [evaluation] if evaluation and stage_backend(name, cfg) == "torch" else []
        run_stage(name, stage_function(name, cfg), cfg, storage, ray_address=ray_address, evaluations=evaluations)
        return f"done (and its {evaluation} evaluation)" if evaluations else "done"

    return stage


def _eval_stage(kind: str, of: str) -> Callable[[Config, Storage, str | None], str]:
    """An evaluation of stage `of`, skipped when its result is for that stage's final step."""

    def stage(cfg: Config, storage: Storage, ray_address: str | None) -> str:
        from trainer.pipeline.jobs import run_eval

        done = CheckpointManager(storage, cfg.run, of).done_summary()
        key = result_key(cfg.run, of, kind)
        result = json.loads(storage.read_text(key)) if storage.exists(key) else {}
        if done and result.get("step") == done["steps"]:
            return f"done in the {result['evaluated_in']}" if result.get("evaluated_in") else "skipped (complete)"
        if kind == "core":
            try:
                core_bundle_dir(cfg, storage, attempts=2)
            except Exception as e:  # noqa: BLE001 - offline machines have no bundle: skip, say why
                return f"skipped: CORE eval bundle unavailable ({type(e).__name__}: {e})"
        result = run_eval(kind, cfg, storage, stage=of, ray_address=ray_address)
        skipped = result.get("skipped") or {}
        return f"done ({len(skipped)} task(s) skipped: {', '.join(sorted(skipped))})" if skipped else "done"

    return stage


def _report(cfg: Config, storage: Storage, ray_address: str | None) -> str:
    from trainer.pipeline.report import write_report

    return f"done ({write_report(cfg, storage)})"


def stages(with_rl: bool) -> list[tuple[str, Callable[[Config, Storage, str | None], str]]]:
    pipeline = [
        ("data", stage_data),
        ("tokenizer", stage_tokenizer),
        ("base", _train_stage("base", "loss")),
        ("base loss", _eval_stage("loss", "base")),
        ("base core", _eval_stage("core", "base")),
        ("mid", _train_stage("mid", "chat")),
        ("mid chat eval", _eval_stage("chat", "mid")),
        ("sft", _train_stage("sft", "chat")),
        ("sft chat eval", _eval_stage("chat", "sft")),
    ]
    if with_rl:
        pipeline += [("rl", _train_stage("rl", "chat")), ("rl chat eval", _eval_stage("chat", "rl"))]
    return pipeline


def speedrun(cfg: Config, storage: Storage, ray_address: str | None = None, with_rl: bool = False) -> dict[str, Any]:
    """Run every stage, then the report; returns {stage: outcome}. Raises SpeedrunFailed naming the stage
    that failed. The outcomes are kept in runs/<run>/speedrun.json for the report."""
    outcomes: dict[str, Any] = {}
    record = f"runs/{cfg.run}/speedrun.json"
    for name, stage in [*stages(with_rl), ("report", _report)]:
        started = time.time()
        print(f"speedrun: {name} ...", flush=True)
        try:
            outcome = stage(cfg, storage, ray_address)
        except Exception as e:
            raise SpeedrunFailed(f"stage {name!r} failed: {type(e).__name__}: {e}") from e
        outcomes[name] = {"outcome": outcome, "seconds": round(time.time() - started, 1)}
        storage.write_text(record, json.dumps({"stages": outcomes}, indent=2))
        print(f"speedrun: {name}: {outcome} ({outcomes[name]['seconds']} s)", flush=True)
    return outcomes
