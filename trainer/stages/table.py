"""
The training stages, in pipeline order: the one list the command line, the speedrun, the report and the
driver's checks read.

Notable:
- a stage's worker function is named per backend as "module:function" and imported only when a job starts,
  so reading the table imports neither torch nor JAX
- `evaluations` are the evaluation kinds the speedrun runs on a stage's final checkpoint (and the report
  expects); the first of them runs inside the stage's own training job on the torch backend, which saves
  one Ray Train start
- `optional` stages run in the speedrun only when asked (`--rl`)
"""

from __future__ import annotations

from dataclasses import dataclass


class StageFailed(RuntimeError):
    """A pipeline step (a training stage, an evaluation, a speedrun step, a sweep variant) failed; the message
    names it and its cause."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    title: str  # the report's heading
    description: str  # the command line's help
    starts_from: tuple[str, ...]  # the stages whose newest checkpoint it starts from, in order of preference
    workers: dict[str, str]  # backend -> "module:function", the Ray Train worker function
    evaluations: tuple[str, ...]  # evaluation kinds (loss, core, chat) of its final checkpoint
    optional: bool = False


STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("base", "Base training", "base pretraining", (),
              {"torch": "trainer.stages.base:train_base", "jax": "trainer.jaxgpt.train:train_base_jax"},
              ("loss", "core")),
    StageSpec("mid", "Midtraining", "midtraining", ("base",),
              {"torch": "trainer.stages.chat:train_mid"}, ("chat",)),
    StageSpec("sft", "Supervised fine-tuning", "supervised fine-tuning", ("mid", "base"),
              {"torch": "trainer.stages.chat:train_sft"}, ("chat",)),
    StageSpec("rl", "Reinforcement learning", "reinforcement learning on GSM8K", ("sft",),
              {"torch": "trainer.stages.rl:train_rl"}, ("chat",), optional=True),
)}


def stage_backend(stage: str, backend: str) -> str:
    """The backend a stage runs on when train.backend is `backend`: torch for stages that have no other."""
    return backend if backend in STAGES[stage].workers else "torch"
