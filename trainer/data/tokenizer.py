"""
The tokenizer stage: `nanochat tok train` and `nanochat tok eval`.

Notable:
- trains on the corpus' training split, streamed: at most tokenizer.max_chars characters, each document
  cut to tokenizer.doc_cap (nanochat's knobs), so one huge document cannot dominate the merges
- tokenizer/meta.json (written after tokenizer.json) holds a hash of everything the tokenizer depends on:
  its settings, the validation split size and the corpus' fingerprint; `tokenizer_is_current` compares it,
  so the speedrun skips an unchanged tokenizer and redoes one whose corpus was re-prepared
- eval reports bytes per token (higher: better compression) for kinds of text x tokenizers: ours, plus
  one trained at each requested vocabulary size on the same characters (capped, so the table stays
  quick at large presets), so that across those columns only the vocabulary size differs. The held-out
  row is a slice of the validation split, which no tokenizer trained on
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from nanochat.config import Config
from nanochat.tokenizer import Tokenizer
from services.layout import TOKENIZER_EVAL_KEY, TOKENIZER_KEY, TOKENIZER_META_KEY
from trainer.data.corpus import CorpusNotReady, corpus_fingerprint, iter_documents
from trainer.data.samples import SAMPLES

log = logging.getLogger(__name__)

EVAL_TRAIN_CHARS = 20_000_000  # cap for the comparison tokenizers: enough for stable merges, seconds each
HELD_OUT_CHARS = 16_000  # the validation slice in the eval table, a few documents
HELD_OUT_DOC_CAP = 4_000  # several documents rather than the head of one


class TokenizerNotFound(FileNotFoundError):
    """No trained tokenizer in storage."""


def _settings_hash(cfg: Config, storage) -> str:
    """Everything the trained tokenizer depends on; raises CorpusNotReady without a prepared corpus."""
    t = cfg.tokenizer
    settings = {
        "vocab_size": t.vocab_size,
        "max_chars": t.max_chars,
        "doc_cap": t.doc_cap,
        "corpus": cfg.data.corpus_name,
        "val_shards": cfg.data.val_shards,  # moves the train/val boundary
        "corpus_fingerprint": corpus_fingerprint(storage, cfg.data.corpus_name),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class _CharCounter:
    """Counts what a streaming consumer (the BPE trainer) takes from an iterator."""

    def __init__(self) -> None:
        self.chars = 0
        self.documents = 0

    def wrap(self, texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            self.chars += len(text)
            self.documents += 1
            yield text


def _train_documents(cfg: Config, storage, max_chars: int) -> Iterator[str]:
    return iter_documents(
        storage, cfg.data.corpus_name, "train", max_chars=max_chars, doc_cap=cfg.tokenizer.doc_cap,
        val_shards=cfg.data.val_shards,
    )


def train_tokenizer(cfg: Config, storage) -> dict[str, Any]:
    """Train the BPE tokenizer on the corpus and store it; returns the stage summary."""
    t0 = time.time()
    digest = _settings_hash(cfg, storage)
    counter = _CharCounter()
    texts = counter.wrap(_train_documents(cfg, storage, cfg.tokenizer.max_chars))
    tokenizer = Tokenizer.train_from_iterator(texts, cfg.tokenizer.vocab_size)
    seconds = time.time() - t0
    log.info("trained a %d-token tokenizer on %d characters in %.1fs", tokenizer.vocab_size, counter.chars, seconds)

    # meta.json marks a complete tokenizer: gone while tokenizer.json is being replaced
    storage.delete(TOKENIZER_META_KEY)
    storage.write_text(TOKENIZER_KEY, tokenizer.to_json())
    meta = {
        "vocab_size": tokenizer.vocab_size,
        "chars": counter.chars,
        "documents": counter.documents,
        "seconds": round(seconds, 3),
        "corpus": cfg.data.corpus_name,
        "settings_hash": digest,
    }
    storage.write_text(TOKENIZER_META_KEY, json.dumps(meta, indent=1))
    metrics = {k: meta[k] for k in ("vocab_size", "chars", "documents")}
    metrics["chars_per_second"] = round(counter.chars / max(seconds, 1e-9))
    return {"stage": "tok_train", "seconds": round(seconds, 3), "metrics": metrics}


def tokenizer_is_current(cfg: Config, storage) -> bool:
    """True when storage holds a complete tokenizer trained with these settings on this corpus."""
    if not (storage.exists(TOKENIZER_META_KEY) and storage.exists(TOKENIZER_KEY)):
        return False
    try:
        digest = _settings_hash(cfg, storage)
    except CorpusNotReady:
        return False
    return json.loads(storage.read_text(TOKENIZER_META_KEY)).get("settings_hash") == digest


def load_tokenizer(storage) -> Tokenizer:
    try:
        text = storage.read_text(TOKENIZER_KEY)
    except FileNotFoundError:
        raise TokenizerNotFound(
            f"no tokenizer at {storage.uri}/{TOKENIZER_KEY}; run `nanochat tok train` first"
        ) from None
    return Tokenizer.from_json(text)


# -----------------------------------------------------------------------------
# eval


def bytes_per_token(tokenizer: Tokenizer, text: str) -> float:
    return len(text.encode("utf-8")) / max(len(tokenizer.encode(text)), 1)


def _eval_texts(cfg: Config, storage) -> dict[str, str]:
    held_out = iter_documents(
        storage, cfg.data.corpus_name, "val", max_chars=HELD_OUT_CHARS, doc_cap=HELD_OUT_DOC_CAP,
        val_shards=cfg.data.val_shards,
    )
    return {**SAMPLES, f"{cfg.data.corpus_name} (val)": "\n\n".join(held_out)}


def evaluate_tokenizer(cfg: Config, storage, vocab_sizes: list[int] | None = None) -> tuple[str, dict[str, Any]]:
    """Bytes per token for each kind of text, for our tokenizer and one per extra vocabulary size.
    Returns (markdown table, results) and stores the results at tokenizer/eval.json."""
    t0 = time.time()
    texts = _eval_texts(cfg, storage)
    tokenizers: dict[str, tuple[Tokenizer, int | None]] = {}
    ours = load_tokenizer(storage)
    meta = json.loads(storage.read_text(TOKENIZER_META_KEY)) if storage.exists(TOKENIZER_META_KEY) else {}
    tokenizers[f"ours ({ours.vocab_size})"] = (ours, meta.get("chars"))

    if vocab_sizes:
        # read once, train many: the comparison tokenizers see exactly the same characters
        chars = min(cfg.tokenizer.max_chars, EVAL_TRAIN_CHARS)
        docs = list(_train_documents(cfg, storage, chars))
        trained_chars = sum(map(len, docs))
        for vocab_size in sorted(set(vocab_sizes)):
            log.info("training a comparison tokenizer with %d tokens", vocab_size)
            tokenizers[str(vocab_size)] = (Tokenizer.train_from_iterator(docs, vocab_size), trained_chars)

    results: dict[str, Any] = {
        "corpus": cfg.data.corpus_name,
        "text_bytes": {kind: len(text.encode("utf-8")) for kind, text in texts.items()},
        "tokenizers": {
            label: {
                "vocab_size": tok.vocab_size,
                "trained_chars": trained,
                "bytes_per_token": {kind: round(bytes_per_token(tok, text), 4) for kind, text in texts.items()},
            }
            for label, (tok, trained) in tokenizers.items()
        },
    }
    results["seconds"] = round(time.time() - t0, 3)
    storage.write_text(TOKENIZER_EVAL_KEY, json.dumps(results, indent=1))
    return format_table(results), results


def format_table(results: dict[str, Any]) -> str:
    """Markdown: a row per kind of text, a column per tokenizer, cells in bytes per token."""
    labels = list(results["tokenizers"])
    lines = [
        "| text | bytes | " + " | ".join(labels) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in labels) + " |",
    ]
    for kind, n_bytes in results["text_bytes"].items():
        cells = [f"{results['tokenizers'][label]['bytes_per_token'][kind]:.2f}" for label in labels]
        lines.append(f"| {kind} | {n_bytes:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
