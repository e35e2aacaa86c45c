"""
Tasks: data sets of conversations, with the rule that grades an answer, and mixtures of them.

Notable:
- a conversation is {"messages": [{"role", "content"}, ...]} plus task-specific keys the grader needs
  ("letters" for multiple choice, "test"/"entry_point" for HumanEval); the assistant content is a str or
  a list of parts {"type": "text" | "python" | "python_output", "text"} (calculator calls), as nanochat
- `RowTask` serves a dataset's rows in one fixed shuffled order (seed 42, as nanochat's
  `.shuffle(seed=42)`), so that `max_examples` takes a fair sample, the same on every worker and run
- categorical tasks (ARC, MMLU) render nanochat's multiple-choice prompt (`render_mc`): the letter comes
  after each choice with no space before it, because the answer is the bare letter's token
- `TaskMixture`: a weight w puts each example of a task floor(w) times into an epoch, plus a seeded
  fraction of them once more (2 = twice, 0.5 = a random half); the whole index is shuffled with a seed.
  Its conversations carry "task" (the source task's name) so that evaluate/reward reach the right grader
- `TaskUnavailable` is the one error a missing data set raises: the stage or eval that wanted it reports
  the task as skipped with the reason
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

SHUFFLE_SEED = 42  # nanochat shuffles every dataset once with this seed


class TaskUnavailable(RuntimeError):
    """The task's data cannot be had (offline and not cached, download failed); str(e) says why."""

    def __init__(self, task: str, reason: str):
        super().__init__(f"{task}: {reason}")
        self.task = task
        self.reason = reason


class Task:
    name: str = "task"
    eval_type: str = "generative"  # "categorical": scored by the answer letters' logits; "generative": sampled

    def __len__(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):  # IndexError also ends `for conversation in task`
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} examples")
        return self.get_example(index)

    def evaluate(self, conversation: dict, response: str) -> bool:
        raise NotImplementedError(f"{self.name} has no grader: it is a training-only task")

    def reward(self, conversation: dict, response: str) -> float:
        return float(self.evaluate(conversation, response))


class Rows(Protocol):
    """A dataset's rows, possibly not yet in memory: `subset` materialises the ones a task keeps."""

    def __len__(self) -> int: ...

    def subset(self, indices: list[int]) -> Sequence[dict]: ...


class ListRows:
    def __init__(self, rows: Sequence[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: list[int]) -> Sequence[dict]:
        return [self.rows[i] for i in indices]


class RowTask(Task):
    """A task over a dataset's rows; subclasses turn one row into a conversation (`to_conversation`)."""

    def __init__(self, rows: Rows | Sequence[dict], max_examples: int = -1, seed: int = SHUFFLE_SEED):
        if not hasattr(rows, "subset"):
            rows = ListRows(rows)
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        if max_examples >= 0:
            order = order[:max_examples]
        # materialise only the kept rows, in file order (cheap to read), then serve them shuffled
        kept = sorted(order)
        self.rows = rows.subset(kept)
        position = {row: i for i, row in enumerate(kept)}
        self.order = [position[row] for row in order]

    def __len__(self) -> int:
        return len(self.order)

    def get_example(self, index: int) -> dict:
        return self.to_conversation(self.rows[self.order[index]])

    def to_conversation(self, row: dict) -> dict:
        raise NotImplementedError


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """nanochat's multiple-choice prompt. The letter follows its choice ("- choice=A"): small models bind
    it better that way; and no space before the letter, since "A" and " A" are different tokens and the
    answer is the bare "A"."""
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    query += "\nRespond only with the letter of the correct answer."
    return query


def exchange(user: Any, assistant: Any, **extra: Any) -> dict:
    """A one-turn conversation (a user message, the assistant's answer) and the task's own fields."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def mc_conversation(question: str, letters: Sequence[str], choices: Sequence[str], answer: str, **extra: Any) -> dict:
    # letters: the eval compares the logits of exactly these tokens
    return exchange(render_mc(question, letters, choices), answer, letters=list(letters), **extra)


class CategoricalTask(RowTask):
    eval_type = "categorical"

    def evaluate(self, conversation: dict, response: str) -> bool:
        return response.strip() == conversation["messages"][-1]["content"]


class TaskMixture(Task):
    def __init__(self, tasks: Sequence[Task], weights: Sequence[float] | None = None, seed: int = SHUFFLE_SEED):
        weights = [1.0] * len(tasks) if weights is None else list(weights)
        if len(weights) != len(tasks):
            raise ValueError(f"{len(tasks)} tasks but {len(weights)} weights")
        if any(w < 0 for w in weights):
            raise ValueError(f"task weights must be >= 0, got {weights}")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"a mixture needs distinct task names, got {names}")
        self.tasks = list(tasks)
        self.weights = weights
        self.by_name = {t.name: t for t in tasks}
        self.name = "+".join(names)
        types = {t.eval_type for t in tasks}
        self.eval_type = types.pop() if len(types) == 1 else "mixed"
        rng = np.random.default_rng(seed)
        task_ids, local_ids = [], []
        for task_id, (task, weight) in enumerate(zip(tasks, weights)):
            n = len(task)
            whole, frac = int(math.floor(weight)), weight - math.floor(weight)
            picks = [np.arange(n)] * whole
            if frac > 0:  # a seeded subset of the task for the fractional part of its weight
                picks.append(np.sort(rng.permutation(n)[: round(frac * n)]))
            ids = np.concatenate(picks) if picks else np.empty(0, dtype=np.int64)
            local_ids.append(ids.astype(np.int64))
            task_ids.append(np.full(len(ids), task_id, dtype=np.int32))
        perm = rng.permutation(sum(len(ids) for ids in local_ids))
        self.task_ids = np.concatenate(task_ids)[perm] if task_ids else np.empty(0, dtype=np.int32)
        self.local_ids = np.concatenate(local_ids)[perm] if local_ids else np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.local_ids)

    def get_example(self, index: int) -> dict:
        task = self.tasks[int(self.task_ids[index])]
        return {**task.get_example(int(self.local_ids[index])), "task": task.name}

    def counts(self) -> dict[str, int]:
        """Examples per task in one epoch of the mixture."""
        ids, n = np.unique(self.task_ids, return_counts=True)
        return {self.tasks[int(i)].name: int(c) for i, c in zip(ids, n)}

    def _task_of(self, conversation: dict) -> Task:
        return self.by_name[conversation["task"]]

    def evaluate(self, conversation: dict, response: str) -> bool:
        return self._task_of(conversation).evaluate(conversation, response)

    def reward(self, conversation: dict, response: str) -> float:
        return self._task_of(conversation).reward(conversation, response)
