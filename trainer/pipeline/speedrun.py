"""
The speedrun: every stage in order, each skipped when its output already exists and verifies.

Notable:
- one embedded Ray for the whole pipeline (started on the first Ray stage), so start-up is paid once
- the steps come from the stage table (trainer/stages/table.py): each stage, then its evaluations
- a training job also runs the stage's first evaluation (base: loss; mid, sft, rl: chat) on its final
  checkpoint, so that evaluation's step finds it complete: one Ray Train start fewer per stage
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
from services.layout import eval_result_key, speedrun_record_key
from services.storage import Storage
from trainer.evals.core import core_bundle_dir
from trainer.pipeline.prepare import prepare_data, prepare_tokenizer
from trainer.stages.table import STAGES, StageFailed, stage_backend

log = logging.getLogger(__name__)

Step = Callable[[Config, Storage, str | None], str]


def _data(cfg: Config, storage: Storage, ray_address: str | None) -> str:
    return prepare_data(cfg, storage)


def _tokenizer(cfg: Config, storage: Storage, ray_address: str | None) -> str:
    return prepare_tokenizer(cfg, storage)


def _train_stage(name: str, evaluation: str | None = None) -> Step:
    """A training stage; on the torch backend its job then runs `evaluation` too, which the evaluation's own
    step then finds complete: one Ray Train start fewer."""

    def stage(cfg: Config, storage: Storage, ray_address: str | None) -> str:
        from trainer.pipeline.jobs import run_stage, stage_function

        if CheckpointManager(storage, cfg.run, name).done_summary() is not None:
            return "skipped (complete)"
        evaluations = [evaluation] if evaluation and stage_backend(name, cfg.train.backend) == "torch" else []
        run_stage(name, stage_function(name, cfg), cfg, storage, ray_address=ray_address, evaluations=evaluations)
        return f"done (and its {evaluation} evaluation)" if evaluations else "done"

    return stage


def _eval_stage(kind: str, of: str) -> Step:
    """An evaluation of stage `of`, skipped when its result is for that stage's final step."""

    def stage(cfg: Config, storage: Storage, ray_address: str | None) -> str:
        from trainer.pipeline.jobs import run_eval

        done = CheckpointManager(storage, cfg.run, of).done_summary()
        key = eval_result_key(cfg.run, of, kind)
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


def eval_step_name(stage: str, kind: str) -> str:
    """The speedrun's name for an evaluation step (its key in speedrun.json): "base loss", "sft chat eval"."""
    return f"{stage} chat eval" if kind == "chat" else f"{stage} {kind}"


def stages(with_rl: bool) -> list[tuple[str, Step]]:
    """The speedrun's steps in order: data, tokenizer, then each stage of the table followed by its
    evaluations (the optional stages only with_rl)."""
    pipeline: list[tuple[str, Step]] = [("data", _data), ("tokenizer", _tokenizer)]
    for spec in STAGES.values():
        if spec.optional and not with_rl:
            continue
        pipeline.append((spec.name, _train_stage(spec.name, spec.evaluations[0])))
        pipeline += [(eval_step_name(spec.name, kind), _eval_stage(kind, spec.name)) for kind in spec.evaluations]
    return pipeline


def speedrun(cfg: Config, storage: Storage, ray_address: str | None = None, with_rl: bool = False) -> dict[str, Any]:
    """Run every stage, then the report; returns {stage: outcome}. Raises StageFailed naming the stage
    that failed. The outcomes are kept in runs/<run>/speedrun.json for the report."""
    outcomes: dict[str, Any] = {}
    record = speedrun_record_key(cfg.run)
    for name, stage in [*stages(with_rl), ("report", _report)]:
        started = time.time()
        print(f"speedrun: {name} ...", flush=True)
        try:
            outcome = stage(cfg, storage, ray_address)
        except Exception as e:
            raise StageFailed(f"stage {name!r} failed: {type(e).__name__}: {e}") from e
        outcomes[name] = {"outcome": outcome, "seconds": round(time.time() - started, 1)}
        storage.write_text(record, json.dumps({"stages": outcomes}, indent=2))
        print(f"speedrun: {name}: {outcome} ({outcomes[name]['seconds']} s)", flush=True)
    return outcomes
