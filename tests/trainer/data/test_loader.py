"""The pretraining data loader: BOS-aligned best-fit packing, row groups split by rank, exact resume."""

import itertools
import json
import random
import sysconfig
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.config import DataConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from services.storage import LocalStorage, open_storage
from trainer.data.corpus import list_shards, prepare_corpus, split_shards
from trainer.data.loader import DataLoader, token_bytes

CORPUS = "tiny"
ROW_GROUP = 15  # documents per row group; tokenizer_batch=5 below gives cuts inside and between row groups


def make_documents(n: int) -> list[str]:
    """Slices of Python's own sources with seeded, log-uniform lengths: many short documents, a few long."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(p.read_text(encoding="utf-8", errors="ignore") for p in sorted(root.glob("[a-c]*.py"))[:30])
    rng = random.Random(0)
    docs, start = [], 0
    for _ in range(n):
        length = int(10 ** rng.uniform(1.5, 2.9))  # 30 .. 800 characters
        docs.append(text[start : start + length])
        start = (start + length) % (len(text) - 2000)
    return docs


def corpus_config(source_dir: Path) -> DataConfig:
    return DataConfig(
        source="local", corpus=CORPUS, local_path=str(source_dir), docs_per_shard=120, row_group_size=ROW_GROUP
    )


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("source")
    pq.write_table(pa.table({"text": make_documents(600)}), folder / "docs.parquet")
    return folder


@pytest.fixture(scope="module")
def corpus(source_dir, tmp_path_factory):
    """(storage, train shards, val shards) of a 5-shard corpus written by `prepare_corpus`."""
    storage = LocalStorage(tmp_path_factory.mktemp("storage"))
    prepare_corpus(corpus_config(source_dir), storage)
    train, val = split_shards(list_shards(storage, CORPUS), val_shards=1)
    return storage, train, val


@pytest.fixture(scope="module")
def tokenizer(source_dir) -> Tokenizer:
    texts = pq.read_table(source_dir / "docs.parquet").column("text").to_pylist()
    return Tokenizer.train_from_iterator(texts, vocab_size=512)


# ---------------------------------------------------------------- helpers


def global_row_groups(storage: LocalStorage, shards: list[str]) -> list[list[str]]:
    """Every row group's texts in the global (shard, row group) order, read independently of the loader."""
    groups = []
    for key in shards:
        pf = pq.ParquetFile(storage.root / key)
        groups += [pf.read_row_group(i).column("text").to_pylist() for i in range(pf.num_row_groups)]
    return groups


def rank_chunks(groups, tokenizer, rank: int, world_size: int, tokenizer_batch: int, loop: bool = True):
    """What a worker should tokenize: its row groups (i % world_size == rank) in chunks, forever or once."""
    bos = tokenizer.get_bos_token_id()
    mine = range(rank, len(groups), world_size)
    for i in itertools.cycle(mine) if loop else mine:
        texts = groups[i]
        for start in range(0, len(texts), tokenizer_batch):
            yield tokenizer.encode(texts[start : start + tokenizer_batch], prepend=bos)


def nanochat_best_fit(chunks, batch_size: int, seq_len: int, buffer_docs: int, n_batches: int):
    """nanochat's packing, transcribed with its linear scans; returns (rows per batch, tokens cropped away).
    When finite chunks run out, the batch being built is dropped."""
    buffer, batches, cropped = [], [], 0
    for _ in range(n_batches):
        rows = []
        for _ in range(batch_size):
            row = []
            while len(row) < seq_len + 1:
                while len(buffer) < buffer_docs and (chunk := next(chunks, None)) is not None:
                    buffer.extend(chunk)
                if not buffer:
                    return batches, cropped
                remaining = seq_len + 1 - len(row)
                fits = [i for i, doc in enumerate(buffer) if len(doc) <= remaining]
                if fits:
                    row += buffer.pop(max(fits, key=lambda i: len(buffer[i])))
                else:
                    doc = buffer.pop(min(range(len(buffer)), key=lambda i: len(buffer[i])))
                    row += doc[:remaining]
                    cropped += len(doc) - remaining
            rows.append(row)
        batches.append(rows)
    return batches, cropped


def rows_of(inputs: torch.Tensor, targets: torch.Tensor) -> list[list[int]]:
    return torch.cat([inputs[:, :1], targets], dim=1).tolist()


def segments(row: list[int], bos: int) -> list[list[int]]:
    """A row cut at every BOS: the (possibly cropped) documents it holds."""
    starts = [i for i, t in enumerate(row) if t == bos]
    return [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)], strict=True)]


def take(loader: DataLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


# ---------------------------------------------------------------- packing


def test_rows_start_with_bos_and_targets_are_inputs_shifted(corpus, tokenizer):
    storage, train, _ = corpus
    loader = DataLoader(storage, train, tokenizer, batch_size=4, seq_len=64, buffer_docs=16, tokenizer_batch=5)
    for inputs, targets in take(loader, 10):
        assert inputs.shape == targets.shape == (4, 64)
        assert inputs.dtype == targets.dtype == torch.long
        assert (inputs[:, 0] == tokenizer.get_bos_token_id()).all()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_packing_is_nanochat_best_fit_and_crops_little(corpus, tokenizer):
    storage, train, _ = corpus
    bos, seq_len, buffer_docs, n = tokenizer.get_bos_token_id(), 256, 32, 30
    loader = DataLoader(storage, train, tokenizer, batch_size=4, seq_len=seq_len, buffer_docs=buffer_docs, tokenizer_batch=5)
    got = [rows_of(*batch) for batch in take(loader, n)]

    groups = global_row_groups(storage, train)
    expected, cropped = nanochat_best_fit(rank_chunks(groups, tokenizer, 0, 1, 5), 4, seq_len, buffer_docs, n)
    assert got == expected
    placed = n * 4 * (seq_len + 1)
    utilisation = placed / (placed + cropped)
    # without a buffer the same documents would be packed in order, cropping at every row end
    _, cropped_in_order = nanochat_best_fit(rank_chunks(groups, tokenizer, 0, 1, 5), 4, seq_len, 1, n)
    assert utilisation > 0.85
    assert cropped < cropped_in_order / 2

    # each piece of a row is a whole document or a cropped one, each document is used once, and none is
    # taken before the loader can have tokenized it: at most buffer_docs + tokenizer_batch ahead
    stream = [doc for chunk in itertools.islice(rank_chunks(groups, tokenizer, 0, 1, 5), 300) for doc in chunk]
    pieces = [s for rows in got for row in rows for s in segments(row, bos)]
    owner: dict[int, int] = {}  # stream index -> piece index
    for whole in (True, False):  # whole documents first, so that short crops cannot claim their documents
        for k, piece in enumerate(pieces):
            if k in owner.values():
                continue
            window = range(min(k + buffer_docs + 5, len(stream)))
            match = [i for i in window if i not in owner and (stream[i] if whole else stream[i][: len(piece)]) == piece]
            if match:
                owner[match[0]] = k
    assert len(owner) == len(pieces)


def test_tiktoken_encoding_yields_the_batches_and_state_of_hf_encoding(corpus, tokenizer):
    """The loader's tokens do not depend on which library encodes: same batches, same resumable state."""
    storage, train, _ = corpus
    hf = Tokenizer.from_json(tokenizer.to_json(), use_tiktoken=False)
    assert (tokenizer.encoder, hf.encoder) == ("tiktoken", "hf")

    def first_batches(tok: Tokenizer):
        loader = DataLoader(storage, train, tok, batch_size=4, seq_len=128, buffer_docs=16, tokenizer_batch=5)
        return [rows_of(*batch) for batch in take(loader, 60)], loader.state_dict()

    assert first_batches(tokenizer) == first_batches(hf)


def test_long_documents_are_cropped_to_their_own_first_tokens_and_stay_small(tmp_path, tokenizer):
    text = make_documents(600)
    docs = ["".join(text[i : i + 60]) for i in range(0, 600, 60)]  # 10 documents of 11,000+ characters
    storage = LocalStorage(tmp_path)
    pq.write_table(pa.table({"text": docs}), storage.root / "long.parquet")
    loader = DataLoader(storage, ["long.parquet"], tokenizer, batch_size=1, seq_len=64, buffer_docs=1, tokenizer_batch=1)
    bos = tokenizer.get_bos_token_id()
    for doc in docs[:3]:
        inputs, targets = next(loader)
        assert rows_of(inputs, targets)[0] == tokenizer.encode(doc, prepend=bos)[:65]

    loader = DataLoader(storage, ["long.parquet"], tokenizer, batch_size=1, seq_len=64, buffer_docs=8, tokenizer_batch=8)
    next(loader)
    assert len(json.dumps(loader.state_dict())) < 8 * 65 * 4  # 8 pending documents of 11,000+ characters


# ---------------------------------------------------------------- ranks and epochs


def test_ranks_stream_their_own_row_groups_and_loop_over_epochs(corpus, tokenizer):
    """With a one-document buffer packing keeps stream order, so each rank's row groups can be read off."""
    storage, train, _ = corpus
    groups, bos, world_size = global_row_groups(storage, train), tokenizer.get_bos_token_id(), 2
    seen = []
    for rank in range(world_size):
        mine = [i for i in range(len(groups)) if i % world_size == rank]
        stream = [doc for i in mine for doc in tokenizer.encode(groups[i], prepend=bos)]
        loader = DataLoader(
            storage, train, tokenizer, batch_size=2, seq_len=64, rank=rank, world_size=world_size,
            buffer_docs=1, tokenizer_batch=1,
        )
        got = []
        while len(got) < len(stream) + 20:  # a whole epoch and the start of the next
            got += [s for row in rows_of(*next(loader)) for s in segments(row, bos)]
        assert all(segment == stream[k % len(stream)][: len(segment)] for k, segment in enumerate(got))
        assert loader.state_dict()["epoch"] == 1
        seen.append({text for i in mine for text in groups[i]})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {text for group in groups for text in group}


def test_one_pass_packs_until_the_data_runs_out_then_stops(corpus, tokenizer):
    storage, _, val = corpus
    loader = DataLoader(storage, val, tokenizer, batch_size=2, seq_len=64, buffer_docs=8, tokenizer_batch=5, loop=False)
    got = [rows_of(*batch) for batch in loader]
    chunks = rank_chunks(global_row_groups(storage, val), tokenizer, 0, 1, 5, loop=False)
    expected, _ = nanochat_best_fit(chunks, 2, 64, 8, n_batches=10_000)
    assert len(got) > 10
    assert got == expected  # the buffer drains at the end; only the last, incomplete batch is dropped
    with pytest.raises(StopIteration):
        next(loader)
    assert loader.state_dict()["epoch"] == 0


# ---------------------------------------------------------------- exact resume


def run_with_states(loader: DataLoader, n: int):
    """n batches and the JSON of the loader's state before the first and after each batch."""
    states, batches = [json.dumps(loader.state_dict())], []
    for _ in range(n):
        batches.append(next(loader))
        states.append(json.dumps(loader.state_dict()))
    return batches, states


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (x1, y1), (x2, y2) in zip(a, b, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_resume_continues_exactly_at_every_kind_of_cut(corpus, tokenizer):
    storage, train, _ = corpus
    kwargs = dict(batch_size=2, seq_len=64, rank=1, world_size=2, buffer_docs=16, tokenizer_batch=5)
    batches, states = run_with_states(DataLoader(storage, train, tokenizer, **kwargs), 120)
    decoded = [json.loads(s) for s in states]
    epochs = [s["epoch"] for s in decoded]
    wrap = epochs.index(1)  # the first state of the second epoch
    at_boundary = next(k for k, s in enumerate(decoded) if k > 3 and s["position"][2] == 0)
    inside = next(k for k, s in enumerate(decoded) if k > 3 and s["position"][2] > 0)
    follow = 12
    assert len({0, inside, at_boundary, wrap}) == 4 and wrap + 1 + follow <= len(batches)
    for cut in (0, inside, at_boundary, wrap, wrap + 1):
        resumed = DataLoader(storage, train, tokenizer, state=json.loads(states[cut]), **kwargs)
        assert_same_batches(take(resumed, follow), batches[cut : cut + follow])
        assert json.dumps(resumed.state_dict()) == states[cut + follow]


def test_a_state_resumes_only_its_own_rank_and_row_length(corpus, tokenizer):
    storage, train, _ = corpus
    loader = DataLoader(storage, train, tokenizer, batch_size=2, seq_len=64, rank=0, world_size=2)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="worker 0 of 2"):
        DataLoader(storage, train, tokenizer, batch_size=2, seq_len=64, rank=1, world_size=2, state=state)
    with pytest.raises(ValueError, match="train.seq_len"):
        DataLoader(storage, train, tokenizer, batch_size=2, seq_len=128, rank=0, world_size=2, state=state)


# ---------------------------------------------------------------- prefetch


def test_prefetching_yields_the_same_batches_and_states(corpus, tokenizer):
    storage, train, val = corpus
    kwargs = dict(batch_size=2, seq_len=64, rank=1, world_size=2, buffer_docs=16, tokenizer_batch=5)
    plain = run_with_states(DataLoader(storage, train, tokenizer, **kwargs), 120)  # into the second epoch
    ahead = run_with_states(DataLoader(storage, train, tokenizer, prefetch=3, **kwargs), 120)
    assert_same_batches(plain[0], ahead[0])
    assert plain[1] == ahead[1]
    one_pass = dict(batch_size=2, seq_len=64, buffer_docs=8, tokenizer_batch=5, loop=False)
    expected = [rows_of(*b) for b in DataLoader(storage, val, tokenizer, **one_pass)]
    loader = DataLoader(storage, val, tokenizer, prefetch=2, **one_pass)
    assert [rows_of(*b) for b in loader] == expected
    with pytest.raises(StopIteration):  # and again: the finished thread is not waited for
        next(loader)


def test_resuming_a_prefetching_loader_continues_exactly(corpus, tokenizer):
    storage, train, _ = corpus
    kwargs = dict(batch_size=2, seq_len=64, buffer_docs=16, tokenizer_batch=5, prefetch=2)
    batches, states = run_with_states(DataLoader(storage, train, tokenizer, **kwargs), 30)
    resumed = DataLoader(storage, train, tokenizer, state=json.loads(states[17]), **kwargs)
    assert_same_batches(take(resumed, 13), batches[17:])


def test_a_read_error_in_the_prefetch_thread_is_raised_by_next(corpus, tokenizer, tmp_path):
    storage, train, _ = corpus
    broken = LocalStorage(tmp_path)
    (tmp_path / "a.parquet").write_bytes((storage.root / train[0]).read_bytes())
    (tmp_path / "b.parquet").write_bytes(b"not parquet")
    loader = DataLoader(broken, ["a.parquet", "b.parquet"], tokenizer, batch_size=2, seq_len=64, prefetch=2)
    with pytest.raises(pa.ArrowInvalid):
        take(loader, 1000)
    with pytest.raises(pa.ArrowInvalid):  # the error stays: the thread is gone
        next(loader)


def test_a_dropped_prefetching_loader_stops_its_thread(corpus, tokenizer):
    storage, train, _ = corpus
    before = set(threading.enumerate())
    loader = DataLoader(storage, train, tokenizer, batch_size=2, seq_len=64, prefetch=2)
    next(loader)
    # the prefetch thread may be encoding the next batch: tiktoken's batch encoding runs in a short-lived
    # ThreadPoolExecutor of its own, whose workers are not the loader's
    threads = [t for t in threading.enumerate() if t not in before and not t.name.startswith("ThreadPoolExecutor")]
    assert [t.name for t in threads] == ["data-loader-rank0"]
    del loader
    threads[0].join(timeout=10)
    assert not threads[0].is_alive()


# ---------------------------------------------------------------- S3


def test_s3_corpus_gives_the_same_batches_and_resumes(s3_env, source_dir, corpus, tokenizer):
    local, local_train, _ = corpus
    s3 = open_storage(s3_env)
    prepare_corpus(corpus_config(source_dir), s3)
    train, _ = split_shards(list_shards(s3, CORPUS), val_shards=1)
    kwargs = dict(batch_size=2, seq_len=64, rank=1, world_size=2, buffer_docs=16, tokenizer_batch=5)
    expected = take(DataLoader(local, local_train, tokenizer, **kwargs), 30)
    loader = DataLoader(s3, train, tokenizer, **kwargs)
    first = take(loader, 7)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["position"][2] > 0  # mid row group: the resumed loader must re-read it from S3
    rest = take(DataLoader(s3, train, tokenizer, state=state, **kwargs), 23)
    assert_same_batches(first + rest, expected)


# ---------------------------------------------------------------- bits per byte


def test_token_bytes_counts_utf8_bytes_and_zero_for_specials(tokenizer):
    counts = token_bytes(tokenizer)
    assert counts.shape == (tokenizer.vocab_size,)
    assert counts[tokenizer.encode("a")[0]] == 1
    specials = [tokenizer.encode_special(name) for name in SPECIAL_TOKENS]
    assert counts[specials].tolist() == [0] * len(SPECIAL_TOKENS)
    for text in ("def __init__(self):\n        return None", "naïve café ✓ 東京"):
        assert counts[tokenizer.encode(text)].sum().item() == len(text.encode("utf-8"))
    assert counts.max().item() > 1  # merges made multi-byte tokens
