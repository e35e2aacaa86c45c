"""
MMLU: four-choice questions over 57 subjects.
https://huggingface.co/datasets/cais/mmlu

Notable:
- a categorical task like ARC; conversations keep "subject" for per-subject results
- splits: train is the "auxiliary_train" set (~100K questions from other MC data sets, what nanochat
  trains on), validation, dev (the 5-shot examples) and test, all from the hub's "all" configuration
- rows {"question", "choices": [4], "answer": int, "subject"}; an auxiliary_train row wrapped in
  {"train": {...}} (the hub's separate auxiliary_train configuration) is unwrapped
"""

from __future__ import annotations

from nanochat.config import Config
from trainer.tasks.base import CategoricalTask, mc_conversation
from trainer.tasks.hub import HubSource, task_rows

LETTERS = ("A", "B", "C", "D")
SOURCE = HubSource(
    "cais/mmlu",
    {
        "train": ("all/auxiliary_train-00000-of-00001.parquet",),
        "validation": ("all/validation-00000-of-00001.parquet",),
        "dev": ("all/dev-00000-of-00001.parquet",),
        "test": ("all/test-00000-of-00001.parquet",),
    },
)


class MMLU(CategoricalTask):
    name = "mmlu"

    def to_conversation(self, row: dict) -> dict:
        if isinstance(row.get("train"), dict):
            row = row["train"]
        choices = list(row["choices"])
        if len(choices) != len(LETTERS):
            raise ValueError(f"mmlu: expected {len(LETTERS)} choices, got {len(choices)}")
        return mc_conversation(row["question"], LETTERS, choices, LETTERS[row["answer"]], subject=row.get("subject", ""))


def build(cfg: Config, split: str, storage=None, max_examples: int = -1) -> MMLU:
    return MMLU(task_rows("mmlu", "mmlu", SOURCE, cfg.data, split, storage), max_examples)
