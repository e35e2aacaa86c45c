"""The tokenizer stage: training from the corpus in storage, loading, staleness, and the compression table."""

import json

import pytest

from nanochat.config import load_config
from services.storage import open_storage
from trainer.data.corpus import prepare_corpus
from trainer.data.samples import SAMPLES
from trainer.data.tokenizer import (
    TokenizerNotFound,
    evaluate_tokenizer,
    load_tokenizer,
    tokenizer_is_current,
    train_tokenizer,
)

SMALL = [
    "tokenizer.vocab_size=512",
    "tokenizer.max_chars=300000",
    "tokenizer.doc_cap=10000",
    "data.docs_per_shard=40",
    "data.row_group_size=16",
]


def small_config(*extra: str):
    return load_config("tiny-cpu", overrides=[*SMALL, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 120-document stdlib corpus (3 shards, the last for validation) and a 512-token tokenizer."""
    storage = open_storage(str(tmp_path_factory.mktemp("tok") / "storage"))
    cfg = small_config()
    prepare_corpus(cfg.data, storage, limit=120)
    summary = train_tokenizer(cfg, storage)
    return cfg, storage, summary


def test_train_stores_the_tokenizer_and_its_metadata(trained):
    cfg, storage, summary = trained
    assert summary["stage"] == "tok_train" and summary["seconds"] > 0
    assert summary["metrics"]["vocab_size"] == 512
    # the training split holds far more than max_chars: exactly max_chars are used
    assert summary["metrics"]["chars"] == 300_000
    meta = json.loads(storage.read_text("tokenizer/meta.json"))
    assert meta["vocab_size"] == 512 and meta["chars"] == 300_000 and meta["corpus"] == "stdlib"
    assert json.loads(storage.read_text("tokenizer/tokenizer.json"))["model"]["type"] == "BPE"


def test_loaded_tokenizer_round_trips_text(trained):
    _, storage, _ = trained
    tokenizer = load_tokenizer(storage)
    assert tokenizer.vocab_size == 512
    for text in SAMPLES.values():
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text.encode("utf-8"))  # merges were learned


def test_load_without_a_tokenizer_says_what_to_run(local_storage):
    with pytest.raises(TokenizerNotFound, match="run `nanochat tok train` first"):
        load_tokenizer(local_storage)


def test_tokenizer_is_current_follows_settings_and_corpus(trained, tmp_path):
    cfg, storage, _ = trained
    assert tokenizer_is_current(cfg, storage)
    assert not tokenizer_is_current(small_config("tokenizer.vocab_size=1024"), storage)
    assert not tokenizer_is_current(small_config("tokenizer.max_chars=200000"), storage)
    assert not tokenizer_is_current(small_config("data.val_shards=2"), storage)
    assert tokenizer_is_current(small_config(), storage)

    # a copy of the corpus re-prepared with other settings makes the same tokenizer stale
    other = open_storage(str(tmp_path / "other"))
    for key in storage.list("tokenizer/"):
        other.write_bytes(key, storage.read_bytes(key))
    assert not tokenizer_is_current(cfg, other)  # no corpus there at all
    prepare_corpus(cfg.data, other, limit=100)
    assert not tokenizer_is_current(cfg, other)


def test_eval_table_has_a_row_per_text_kind_and_a_column_per_vocab_size(trained):
    cfg, storage, _ = trained
    table, results = evaluate_tokenizer(cfg, storage, [300, 1024])

    columns = ["ours (512)", "300", "1024"]
    kinds = [*SAMPLES, "stdlib (val)"]
    lines = table.splitlines()
    assert lines[0] == "| text | bytes | " + " | ".join(columns) + " |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == kinds
    assert list(results["tokenizers"]) == columns
    assert json.loads(storage.read_text("tokenizer/eval.json")) == results

    bpt = {label: r["bytes_per_token"] for label, r in results["tokenizers"].items()}
    for label in columns:
        seen_scripts = {kind: value for kind, value in bpt[label].items() if kind != "korean"}
        assert all(value > 1.05 for value in seen_scripts.values()), (label, bpt[label])
        # Hangul never occurs in Python's sources: its bytes stay (nearly) unmerged, the worst row
        assert 1.0 <= bpt[label]["korean"] < min(seen_scripts.values())
    # a larger vocabulary compresses held-out text of the same corpus better
    assert bpt["300"]["stdlib (val)"] < bpt["ours (512)"]["stdlib (val)"] < bpt["1024"]["stdlib (val)"]
    assert results["tokenizers"]["1024"]["vocab_size"] == 1024
    assert results["text_bytes"]["korean"] == len(SAMPLES["korean"].encode("utf-8"))
