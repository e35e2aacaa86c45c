"""
The steps before training: the corpus and the tokenizer, each skipped when what storage holds is current.
The speedrun and the architecture sweeps both start with them.
"""

from __future__ import annotations

from nanochat.config import Config
from services.storage import Storage


def prepare_data(cfg: Config, storage: Storage) -> str:
    """The corpus in storage; the outcome in words."""
    from trainer.data.corpus import prepare_corpus

    summary = prepare_corpus(cfg.data, storage)
    return "skipped (complete)" if summary.get("skipped") else "done"


def prepare_tokenizer(cfg: Config, storage: Storage) -> str:
    """The tokenizer trained on the corpus unless the one in storage is current; the outcome in words."""
    from trainer.data.tokenizer import tokenizer_is_current, train_tokenizer

    if tokenizer_is_current(cfg, storage):
        return "skipped (current)"
    train_tokenizer(cfg, storage)
    return "done"
