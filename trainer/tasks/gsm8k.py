"""
GSM8K: grade-school math word problems, solved step by step with calculator calls.
https://huggingface.co/datasets/openai/gsm8k

Notable:
- the reference solutions mark each calculation as <<expr=value>>; the assistant message becomes a list
  of parts, each span turned into a {"type": "python", "text": expr} call and a {"type": "python_output",
  "text": value} result, so the model learns to call the calculator and is handed its output (not
  trained on it)
- the final answer follows "#### "; evaluate and reward compare the number after it in the response
  with the reference's, with commas removed (the normalisation of OpenAI's grade-school-math code)
- rows {"question", "answer"}; splits train and test
"""

from __future__ import annotations

import re

from nanochat.config import Config
from trainer.tasks.base import RowTask, exchange
from trainer.tasks.hub import HubSource, task_rows

SOURCE = HubSource(
    "openai/gsm8k",
    {split: (f"main/{split}-00000-of-00001.parquet",) for split in ("train", "test")},
)
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
CALC_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(text: str) -> str | None:
    """The number after the "#### " marker, without thousands separators; None if there is none."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def solution_parts(answer: str) -> list[dict]:
    """A reference solution as assistant parts: text, and a python call + output for each <<expr=value>>."""
    parts = []
    for piece in CALC_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, value = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": value})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def final_answer(conversation: dict) -> str | None:
    """The reference's final number: in the last text part of the last (assistant) message."""
    content = conversation["messages"][-1]["content"]
    text = content if isinstance(content, str) else next(p["text"] for p in reversed(content) if p["type"] == "text")
    return extract_answer(text)


class GSM8K(RowTask):
    name = "gsm8k"
    eval_type = "generative"

    def to_conversation(self, row: dict) -> dict:
        return exchange(row["question"], solution_parts(row["answer"]))

    def evaluate(self, conversation: dict, response: str) -> bool:
        reference = final_answer(conversation)
        return reference is not None and extract_answer(response) == reference


def build(cfg: Config, split: str, storage=None, max_examples: int = -1) -> GSM8K:
    return GSM8K(task_rows("gsm8k", "gsm8k", SOURCE, cfg.data, split, storage), max_examples)
