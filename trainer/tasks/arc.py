"""
ARC (AI2 Reasoning Challenge), Easy and Challenge: grade-school science questions with 3-5 choices.
https://huggingface.co/datasets/allenai/ai2_arc

Notable:
- a categorical task: the user message is nanochat's multiple-choice prompt, the assistant answers with
  the letter; the letters are the data set's own labels (a few questions use "1".."4")
- rows in the hub's schema {"question", "choices": {"text", "label"}, "answerKey"}, or in llm-foundry's
  multiple-choice format {"query": "Question: ...", "choices", "gold"} (the CORE bundle's arc files),
  whose letters are A, B, C, ...
"""

from __future__ import annotations

import string

from nanochat.config import Config
from trainer.tasks.base import CategoricalTask, mc_conversation
from trainer.tasks.hub import HubSource, task_rows

SUBSETS = {"arc-easy": "ARC-Easy", "arc-challenge": "ARC-Challenge"}


def hub_source(subset: str) -> HubSource:
    return HubSource(
        "allenai/ai2_arc",
        {split: (f"{subset}/{split}-00000-of-00001.parquet",) for split in ("train", "validation", "test")},
    )


class ARC(CategoricalTask):
    def __init__(self, name: str, rows, max_examples: int = -1):
        super().__init__(rows, max_examples)
        self.name = name

    def to_conversation(self, row: dict) -> dict:
        if "query" in row:  # llm-foundry
            question = row["query"].strip().removeprefix("Question:").strip()
            choices = list(row["choices"])
            letters = list(string.ascii_uppercase[: len(choices)])
            answer = letters[row["gold"]]
        else:
            question = row["question"]
            choices, letters = list(row["choices"]["text"]), list(row["choices"]["label"])
            answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"{self.name}: answer {answer!r} is not one of the letters {letters}")
        return mc_conversation(question, letters, choices, answer)


def build(name: str, cfg: Config, split: str, storage=None, max_examples: int = -1) -> ARC:
    stem = name.replace("-", "_")  # arc_easy, arc_challenge: the CORE bundle's file names
    rows = task_rows(name, stem, hub_source(SUBSETS[name]), cfg.data, split, storage)
    return ARC(name, rows, max_examples)
