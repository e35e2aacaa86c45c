"""
Conversations as training batches: the chat stages' data loader.

Notable:
- conversations are rendered with the special tokens (nanochat/tokenizer.py); the loss falls on assistant
  tokens only (tool outputs excluded), padding and user turns get target -1
- a task (or a weighted mixture of tasks) is served in its fixed order; rank r takes every world_size-th
  conversation, and the cursor is the next index (plus one conversation carried over to the next batch),
  so resume is exact
- whole conversations are packed into rows of a fixed length, so a step's tokens stay near its budget
"""

from __future__ import annotations

import torch

from nanochat.tokenizer import Tokenizer
from trainer.tasks.base import Task


class ConversationLoader:
    """This rank's conversations packed into rows, batch_size rows a batch, resumable to the conversation.

    A row holds max_len + 1 tokens (inputs and targets are its two shifted views) and takes whole
    conversations in order while they fit; one that does not fit opens the next row (carried into the next
    batch if this one is full), one longer than a row is cut to it. Packing keeps a step's tokens near its
    budget whatever the conversations' lengths, where a row per conversation is mostly padding. A row's
    unused tail is padding with target -1; a batch is as wide as its longest row.
    """

    def __init__(self, task: Task, tokenizer: Tokenizer, batch_size: int, max_len: int, rank: int, world_size: int,
                 device: torch.device, state: dict | None = None, loop: bool = True):
        self.task, self.tokenizer, self.batch_size, self.max_len = task, tokenizer, batch_size, max_len
        self.world_size, self.device, self.loop = world_size, device, loop
        self.index = state["index"] if state else rank  # the next conversation this rank renders
        self.epoch = state["epoch"] if state else 0
        self.carry: int | None = state.get("carry") if state else None  # rendered, but did not fit the last batch
        self.pad_id = tokenizer.get_bos_token_id()

    def state_dict(self) -> dict:
        return {"index": self.index, "epoch": self.epoch, "carry": self.carry}

    def __iter__(self) -> ConversationLoader:
        return self

    def _next_index(self) -> int:
        if self.carry is not None:
            index, self.carry = self.carry, None
            return index
        if self.index >= len(self.task):
            if not self.loop:
                raise StopIteration
            self.index -= len(self.task)
            self.epoch += 1
        index = self.index
        self.index += self.world_size
        return index

    def _render(self, index: int) -> tuple[list[int], list[int]]:
        return self.tokenizer.render_conversation(self.task[index], max_tokens=self.max_len + 1)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows: list[tuple[list[int], list[int]]] = [([], [])]
        while True:
            try:
                index = self._next_index()
            except StopIteration:
                break
            ids, mask = self._render(index)
            row_ids, row_mask = rows[-1]
            if len(row_ids) + len(ids) > self.max_len + 1:
                if len(rows) == self.batch_size:
                    self.carry = index
                    break
                rows.append(([], []))
                row_ids, row_mask = rows[-1]
            row_ids.extend(ids)
            row_mask.extend(mask)
        rows = [row for row in rows if row[0]]
        if not rows:
            raise StopIteration
        width = max(len(ids) for ids, _ in rows) - 1
        inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, (ids, mask) in enumerate(rows):
            inputs[i, : len(ids) - 1] = torch.tensor(ids[:-1])
            targets[i, : len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
        return inputs.to(self.device), targets.to(self.device)


def mixture_tokens(mixture: Task, tokenizer: Tokenizer, max_len: int, sample: int = 256) -> int:
    """Tokens in one pass over the mixture, estimated from an evenly spaced sample of its conversations
    (rendering all of SmolTalk only to count it would take minutes)."""
    picks = range(0, len(mixture), max(1, len(mixture) // sample))
    lengths = [len(tokenizer.render_conversation(mixture[i], max_tokens=max_len + 1)[0]) for i in picks]
    return round(sum(lengths) / len(lengths) * len(mixture))
