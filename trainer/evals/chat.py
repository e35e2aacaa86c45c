"""
Chat evaluations: how well a chat model answers the tasks of trainer/tasks/, and ChatCORE.

Notable:
- categorical tasks (ARC, MMLU) are not sampled: one forward over a batch of prompts (each ending with
  <|assistant_start|>, right-padded), and the answer is the problem's letter with the highest logit at the
  prompt's last position. Only the problem's own letters compete, as in nanochat: a small model need not
  also have learnt to answer with a letter at all
- generative tasks (GSM8K, HumanEval, spelling) are sampled with the shared generate function (calculator
  tool included): num_samples completions per problem, each problem seeded with its index so the samples
  do not depend on the number of workers. A problem passes if any sample is right (pass@k, the accuracy);
  pass@1 is the fraction of right samples
- rank r of a worker group takes problems r, r + world, ...; the counts are summed over ranks
- ChatCORE as nanochat defines it: the mean over tasks of (accuracy - baseline) / (1 - baseline), baseline
  0.25 for the 4-way multiple choice tasks and 0 for the open-ended ones; here over the tasks that ran
- a task whose data cannot be had (TaskUnavailable) is skipped with the reason, on every rank alike
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nanochat.config import Config
from nanochat.generate import generate_batch
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from trainer.tasks import build_task
from trainer.tasks.base import Task, TaskUnavailable
from trainer.worker import Worker

log = logging.getLogger(__name__)

# accuracy of guessing: nanochat counts every multiple choice task as 4-way; open-ended tasks are 0
BASELINES = {"arc-easy": 0.25, "arc-challenge": 0.25, "mmlu": 0.25}
EVAL_SPLIT = "test"
BATCH_SIZE = 8  # categorical prompts per forward


@dataclass
class Score:
    """Counts of one task's evaluation; sums over ranks."""

    problems: int = 0
    passed: int = 0  # problems with at least one right sample
    samples: int = 0
    right: int = 0  # right samples

    @property
    def accuracy(self) -> float:
        """pass@k: the fraction of problems that some sample got right (k = 1: plain accuracy)."""
        return self.passed / self.problems

    @property
    def pass_at_1(self) -> float:
        return self.right / self.samples

    def add(self, outcomes: list[bool]) -> None:
        """One problem's outcome per sample."""
        self.problems += 1
        self.passed += int(any(outcomes))
        self.samples += len(outcomes)
        self.right += sum(outcomes)

    def reduced(self, worker: Worker) -> Score:
        counts = torch.tensor([self.problems, self.passed, self.samples, self.right], dtype=torch.long,
                              device=worker.device)
        return Score(*(int(c) for c in worker.sum(counts).tolist()))


def response_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """A completion as the graders read it: its text without special tokens (tool calls and outputs keep
    their text; the closing <|assistant_end|> would break a HumanEval program)."""
    special = {tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
    return tokenizer.decode([t for t in ids if t not in special])


def letter_token_ids(tokenizer: Tokenizer, letters: list[str]) -> list[int]:
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens; it must be exactly one")
        ids.append(encoded[0])
    return ids


def _problems(task: Task, max_problems: int, worker: Worker) -> range:
    n = len(task) if max_problems < 0 else min(len(task), max_problems)
    return range(worker.rank, n, worker.world_size)


@torch.no_grad()
def score_categorical(model: nn.Module, tokenizer: Tokenizer, task: Task, indices: range, worker: Worker,
                      batch_size: int = BATCH_SIZE) -> Score:
    """This rank's problems, batch_size prompts per forward; the answer is the likeliest of the letters."""
    score, pad = Score(), tokenizer.get_bos_token_id()  # pad positions come after the answer position
    for start in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[start:start + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], dtype=torch.long, device=worker.device)
        with worker.autocast():
            logits = model(ids)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            focus = logits[row, len(prompt) - 1, letter_token_ids(tokenizer, letters)]
            predicted = letters[int(focus.argmax())]
            score.add([predicted == conversation["messages"][-1]["content"]])
    return score


def score_generative(model: nn.Module, tokenizer: Tokenizer, task: Task, indices: range, num_samples: int,
                     max_new_tokens: int, temperature: float, top_k: int | None) -> Score:
    """This rank's problems, num_samples completions each, graded by the task."""
    score = Score()
    for i in indices:
        conversation = task[i]
        completions, _ = generate_batch(model, tokenizer, tokenizer.render_for_completion(conversation),
                                        num_samples, max_tokens=max_new_tokens, temperature=temperature,
                                        top_k=top_k, seed=i)
        score.add([task.evaluate(conversation, response_text(tokenizer, c)) for c in completions])
    return score


def score_task(model: nn.Module, tokenizer: Tokenizer, task: Task, max_problems: int, num_samples: int,
               max_new_tokens: int, temperature: float, top_k: int | None, worker: Worker,
               batch_size: int = BATCH_SIZE) -> Score:
    """The task's counts over all ranks (every rank must call it: the counts are all-reduced)."""
    indices = _problems(task, max_problems, worker)
    model.eval()
    if task.eval_type == "categorical":
        score = score_categorical(model, tokenizer, task, indices, worker, batch_size)
    elif task.eval_type == "generative":
        score = score_generative(model, tokenizer, task, indices, num_samples, max_new_tokens, temperature,
                                 top_k or None)
    else:
        raise ValueError(f"{task.name}: cannot evaluate a task of eval_type {task.eval_type!r}")
    score = score.reduced(worker)
    if score.problems == 0:
        raise ValueError(f"{task.name}: no problems to evaluate (max_problems={max_problems}, {len(task)} in the task)")
    return score


def evaluate_chat(model: nn.Module, tokenizer: Tokenizer, task: Task, max_problems: int, num_samples: int,
                  max_new_tokens: int, temperature: float, top_k: int | None, worker: Worker,
                  batch_size: int = BATCH_SIZE) -> float:
    """The task's accuracy (pass@num_samples for generative tasks) over all ranks."""
    return score_task(model, tokenizer, task, max_problems, num_samples, max_new_tokens, temperature, top_k,
                      worker, batch_size).accuracy


def chatcore(results: dict[str, float]) -> float | None:
    """Mean centered accuracy: 0 at chance, 1 when every answer is right; None if no task ran."""
    if not results:
        return None
    centered = [(acc - BASELINES.get(name, 0.0)) / (1.0 - BASELINES.get(name, 0.0)) for name, acc in results.items()]
    return sum(centered) / len(centered)


def _build_everywhere(name: str, cfg: Config, storage: Any, worker: Worker) -> tuple[Task | None, str | None]:
    """The task, or the reason it is unavailable; if any rank lacks it, every rank skips it (a rank that
    went on alone would wait forever for the others in the all-reduce)."""
    task, reason = None, None
    try:
        # the first max_problems of the task's shuffled order, the ones score_task takes
        task = build_task(name, cfg, EVAL_SPLIT, storage, max_examples=cfg.chat_eval.max_problems)
    except TaskUnavailable as e:
        reason = e.reason
    reasons = [r for r in worker.all_gather(reason) if r is not None]
    return (None, reasons[0]) if reasons else (task, None)


def run_chat_eval(model: nn.Module, tokenizer: Tokenizer, cfg: Config, storage: Any, worker: Worker,
                  tasks: list[str] | None = None) -> dict[str, Any]:
    """Every task of chat_eval.tasks (or `tasks`) on its test split: accuracies, what was skipped and why,
    and ChatCORE over the tasks that ran."""
    ce = cfg.chat_eval
    results: dict[str, float] = {}
    pass_at_1: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in tasks or ce.tasks:
        task, reason = _build_everywhere(name, cfg, storage, worker)
        if task is None:
            log.warning("chat eval: skipping %s: %s", name, reason)
            skipped[name] = reason
            continue
        score = score_task(model, tokenizer, task, ce.max_problems, ce.num_samples, ce.max_new_tokens,
                           ce.temperature, ce.top_k, worker)
        results[name] = score.accuracy
        if task.eval_type == "generative":
            pass_at_1[name] = score.pass_at_1
        log.info("chat eval: %s %.4f (%d problems)", name, score.accuracy, score.problems)
    return {"results": results, "pass_at_1": pass_at_1, "num_samples": ce.num_samples, "skipped": skipped,
            "chatcore": chatcore(results)}
