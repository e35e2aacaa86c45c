"""
The chat tasks by name: `build_task("gsm8k", cfg, "test")`, and weighted mixtures of them.

Notable:
- names: arc-easy, arc-challenge, mmlu, gsm8k, humaneval, smoltalk (Hugging Face downloads, or files in
  data.tasks_dir), identity, spelling, simple-spelling, stdlib-docs (generated offline)
- a task whose data cannot be had raises TaskUnavailable (offline and not cached, download failed);
  `build_mixture` leaves such tasks out and returns why, so a stage can report them as skipped
- an unknown task name or split is a ValueError: a configuration mistake, not missing data
- max_examples caps each task (a fair sample: tasks serve their rows in a seeded shuffled order)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial

from nanochat.config import Config
from trainer.tasks import arc, gsm8k, humaneval, identity, mmlu, smoltalk, spelling, stdlib_docs
from trainer.tasks.base import SHUFFLE_SEED, Task, TaskMixture, TaskUnavailable

log = logging.getLogger(__name__)

__all__ = ["TASKS", "Task", "TaskMixture", "TaskUnavailable", "build_mixture", "build_task"]

# name -> build(cfg, split, storage, max_examples)
TASKS: dict[str, Callable[..., Task]] = {
    "arc-easy": partial(arc.build, "arc-easy"),
    "arc-challenge": partial(arc.build, "arc-challenge"),
    "mmlu": mmlu.build,
    "gsm8k": gsm8k.build,
    "humaneval": humaneval.build,
    "smoltalk": smoltalk.build,
    "identity": identity.build,
    "spelling": spelling.build_bee,
    "simple-spelling": spelling.build_simple,
    "stdlib-docs": stdlib_docs.build,
}


def build_task(name: str, cfg: Config, split: str = "train", storage=None, max_examples: int = -1) -> Task:
    """One task's split. storage, when given, shares downloads between workers (tasks/ in storage)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name](cfg, split, storage, max_examples)


def build_mixture(
    weights: Mapping[str, float],
    cfg: Config,
    split: str = "train",
    storage=None,
    max_examples: int = -1,
    seed: int = SHUFFLE_SEED,
) -> tuple[TaskMixture, dict[str, str]]:
    """(mixture of the tasks with weight > 0 that could be built, {task: reason} for those skipped)."""
    tasks, kept, skipped = [], [], {}
    for name, weight in weights.items():
        if weight <= 0:
            continue
        try:
            tasks.append(build_task(name, cfg, split, storage, max_examples))
        except TaskUnavailable as e:
            log.warning("task %s skipped: %s", name, e.reason)
            skipped[name] = e.reason
            continue
        kept.append(weight)
    return TaskMixture(tasks, kept, seed), skipped
