"""
SmolTalk: general conversations for small models (HuggingFaceTB's smol-smoltalk, as nanochat).
https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk

Notable:
- rows {"messages": [{"role", "content"}, ...]}: an optional system message, then user and assistant in
  turn; checked when a conversation is served, so a malformed row fails loudly (ValueError)
- splits train (~460K conversations in 4 parquet files) and test (~24K); a training-only task (no grader)
- no offline fallback here: offline, build_task("smoltalk") raises TaskUnavailable, and "stdlib-docs"
  (trainer/tasks/stdlib_docs.py) is the conversation source that needs no download
"""

from __future__ import annotations

from nanochat.config import Config
from trainer.tasks.base import RowTask
from trainer.tasks.hub import HubSource, task_rows

SOURCE = HubSource(
    "HuggingFaceTB/smol-smoltalk",
    {
        "train": tuple(f"data/train-{i:05d}-of-00004.parquet" for i in range(4)),
        "test": ("data/test-00000-of-00001.parquet",),
    },
)


def check_messages(messages: list[dict]) -> None:
    """An optional system message, then user/assistant alternating, at least one of each, str contents."""
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if len(rest) < 2:
        raise ValueError(f"a conversation needs a user and an assistant message, got {len(rest)} messages")
    for i, message in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"message {i} has role {message['role']!r}, expected {expected!r}")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i}: content must be a str")


class SmolTalk(RowTask):
    name = "smoltalk"

    def to_conversation(self, row: dict) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        check_messages(messages)
        return {"messages": messages}


def build(cfg: Config, split: str, storage=None, max_examples: int = -1) -> SmolTalk:
    return SmolTalk(task_rows("smoltalk", "smoltalk", SOURCE, cfg.data, split, storage), max_examples)
