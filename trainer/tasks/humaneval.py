"""
HumanEval: 164 Python functions to complete from their signature and docstring, graded by unit tests.
https://huggingface.co/datasets/openai/openai_humaneval

Notable:
- the user message is the prompt (imports, signature, docstring); the reference assistant message is the
  whole function (prompt + canonical solution), as nanochat
- evaluate runs the prompt's imports + the response's code (the first ``` block if it has one) + the
  tests + check(entry_point) in the sandbox (trainer/tasks/sandbox.py: time and memory limits, no network, a
  throwaway directory); a response passes when that program runs to its end
- rows {"task_id", "prompt", "canonical_solution", "test", "entry_point"}: the hub's parquet or
  llm-foundry's code-eval jsonl (the same fields and a few more); only a test split exists
"""

from __future__ import annotations

import re

from nanochat.config import Config
from trainer.tasks.base import RowTask, exchange
from trainer.tasks.hub import HubSource, task_rows
from trainer.tasks.sandbox import run_program

SOURCE = HubSource("openai/openai_humaneval", {"test": ("openai_humaneval/test-00000-of-00001.parquet",)})
CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)
TIMEOUT_S = 5.0
MEMORY_MB = 256


def extract_imports(prompt: str) -> str:
    """The import lines at the top of the prompt: responses often restate the function without them."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(response: str) -> str:
    """The first fenced code block of the response, or the whole response when it has none."""
    match = CODE_BLOCK_RE.search(response)
    return (match.group(1) if match else response).strip()


def program_for(conversation: dict, response: str) -> str:
    prompt = conversation["messages"][0]["content"]
    return "\n\n".join([
        extract_imports(prompt),
        extract_program(response),
        conversation["test"],
        f"check({conversation['entry_point']})\n",
    ])


class HumanEval(RowTask):
    name = "humaneval"
    eval_type = "generative"

    def to_conversation(self, row: dict) -> dict:
        return exchange(row["prompt"], f"{row['prompt']}\n{row['canonical_solution']}", entry_point=row["entry_point"],
                        test=row["test"], task_id=row.get("task_id", ""))

    def evaluate(self, conversation: dict, response: str) -> bool:
        ok, _ = run_program(program_for(conversation, response), timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
        return ok


def build(cfg: Config, split: str, storage=None, max_examples: int = -1) -> HumanEval:
    return HumanEval(task_rows("humaneval", "humaneval", SOURCE, cfg.data, split, storage), max_examples)
