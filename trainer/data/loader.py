"""
The pretraining data loader run inside each Ray Train worker: parquet row groups in, (inputs, targets) out.

Notable:
- BOS-aligned best-fit packing, as in nanochat: every row of T+1 tokens starts with BOS, each document is
  tokenized with BOS prepended, and a row is filled from a buffer of pending documents by taking the
  largest one that still fits whole; when none fits, the shortest is cropped to fill the row exactly and
  its remainder is discarded. No padding: every position is trained on, and every token can attend back
  to the BOS of its own document.
- Distributed by row group: in the global order over (shard, row group), row group i belongs to worker
  i % world_size. A worker reads only its own row groups (ranged reads on S3) and meets the shards'
  footers as it walks, never listing them all up front; memory holds one row group and the buffer.
- Long documents are cheap: a row can use at most T+1 tokens of any document, so only the first
  16 x (T+1) characters are tokenized (the same leading tokens, a fraction of the work on a corpus of
  whole source files) and only T+1 tokens are kept in the buffer, with the length best fit orders by.
- Exact resume: state_dict() describes the loader after the last yielded batch (epoch, the next unread
  document as shard / row group / document index, and the pending documents); a loader built from it
  yields exactly the batches an uninterrupted one would have. A partly tokenized row group costs one
  re-read on resume. The state is bounded by buffer_docs x (T+1) ids, zlib-compressed as uint16
  (uint32 when an id needs it) in base64: JSON-safe, a few MB at nanochat's sizes.
- loop=True cycles through epochs forever (training); loop=False stops after one pass, dropping the last
  incomplete batch (validation).
- prefetch=n makes the next n batches in a background thread, so that reading, encoding and packing
  overlap the training step instead of stalling the GPU after each step's sync point (the training loop
  reads its first micro-batch right after one). The batches and states are the same as without it: each
  batch travels with a snapshot of the loader's state after it, and state_dict() packs the snapshot of
  the last batch yielded. Encoding releases the GIL; packing holds it, briefly.
- token_bytes(): UTF-8 bytes per token id (0 for special tokens), the denominator of bits per byte.
"""

from __future__ import annotations

import base64
import bisect
import logging
import queue
import threading
import weakref
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from nanochat.tokenizer import Tokenizer
from trainer.data.corpus import DataError

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Only the first MAX_CHARS_PER_TOKEN * (T+1) characters of a document are tokenized: code and prose
# average 3-5 characters per token, so that holds more than the T+1 tokens any row can use and they come
# out the same (checked on the stdlib corpus at vocab sizes 4096 and 32768, T from 64 to 2048).
MAX_CHARS_PER_TOKEN = 16

Position = tuple[int, int]  # (shard index, row group index) into the loader's shard list


class _RowGroups:
    """This worker's view of the shards: row-group counts (read lazily from footers) and row-group reads,
    keeping the current shard's file open so that consecutive reads skip the footer."""

    def __init__(self, storage, shards: list[str]):
        self.fs, base = storage.arrow_filesystem()
        self.paths = [f"{base.rstrip('/')}/{key}" if base else key for key in shards]
        self._counts: dict[int, int] = {}
        self._open: tuple[int, Any, pq.ParquetFile] | None = None  # (shard, file, parquet reader)

    def _parquet(self, shard: int) -> pq.ParquetFile:
        if self._open is None or self._open[0] != shard:
            self.close()
            f = self.fs.open_input_file(self.paths[shard])
            self._open = (shard, f, pq.ParquetFile(f))
        return self._open[2]

    def count(self, shard: int) -> int:
        if shard not in self._counts:
            self._counts[shard] = self._parquet(shard).metadata.num_row_groups
        return self._counts[shard]

    def advance(self, pos: Position, steps: int) -> Position | None:
        """The row group `steps` places after pos in the global order; None past the last shard."""
        shard, rg = pos[0], pos[1] + steps
        while shard < len(self.paths) and rg >= self.count(shard):
            rg -= self.count(shard)
            shard += 1
        return (shard, rg) if shard < len(self.paths) else None

    def read(self, pos: Position) -> list[str]:
        shard, rg = pos
        return self._parquet(shard).read_row_group(rg, columns=["text"]).column(0).to_pylist()

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


class _BestFitBuffer:
    """Pending documents, kept sorted by (length, arrival) so best fit is a binary search, not a scan.
    Among equal lengths the oldest document goes first, which keeps the choice deterministic.
    A document longer than a row can only ever give its first `row` tokens (cropped), so only those are
    kept, with its length for the ordering: memory and state stay bounded by buffer size x row."""

    def __init__(self, row: int) -> None:
        self.row = row
        self._keys: list[tuple[int, int]] = []  # (full length, arrival number), sorted
        self._docs: dict[int, list[int]] = {}  # arrival number -> at most `row` token ids
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, tokens: list[int], length: int | None = None) -> None:
        """length: the document's full length when tokens were already cut to the row (restoring a state)."""
        bisect.insort(self._keys, (len(tokens) if length is None else length, self._arrivals))
        self._docs[self._arrivals] = tokens[: self.row]
        self._arrivals += 1

    def take(self, space: int) -> list[int]:
        """The largest document of at most `space` tokens, else the shortest one cropped to `space`."""
        i = bisect.bisect_right(self._keys, (space, float("inf")))
        if i > 0:  # the oldest of the largest documents that fit
            i = bisect.bisect_left(self._keys, (self._keys[i - 1][0], -1))
            return self._docs.pop(self._keys.pop(i)[1])
        return self._docs.pop(self._keys.pop(0)[1])[:space]  # nothing fits: crop, drop the rest

    def copy(self) -> _BestFitBuffer:
        """A copy that later takes and adds leave alone (token lists are shared: neither side changes one)."""
        other = _BestFitBuffer(self.row)
        other._keys, other._docs, other._arrivals = list(self._keys), dict(self._docs), self._arrivals
        return other

    def pending(self) -> tuple[list[list[int]], list[int]]:
        """(tokens, full lengths) in arrival order; restoring them in this order restores every future choice."""
        lengths = {n: length for length, n in self._keys}
        order = sorted(self._docs)
        return [self._docs[n] for n in order], [lengths[n] for n in order]


def _pack_buffer(buffer: _BestFitBuffer) -> dict[str, Any]:
    docs, lengths = buffer.pending()
    flat = np.fromiter((t for doc in docs for t in doc), dtype="<u4")
    if flat.size == 0 or flat.max() < 1 << 16:  # nanochat's 32768-token vocabulary fits in two bytes
        flat = flat.astype("<u2")
    return {
        "row": buffer.row,
        "lengths": lengths,
        "dtype": flat.dtype.str,
        "ids": base64.b64encode(zlib.compress(flat.tobytes(), 1)).decode("ascii"),
    }


def _unpack_buffer(packed: dict[str, Any], buffer: _BestFitBuffer) -> None:
    if packed["row"] != buffer.row:
        raise ValueError(
            f"data loader state was saved with rows of {packed['row']} tokens, not {buffer.row}: "
            "resuming needs the same train.seq_len"
        )
    flat = np.frombuffer(zlib.decompress(base64.b64decode(packed["ids"])), dtype=packed["dtype"]).tolist()
    start = 0
    for length in packed["lengths"]:
        kept = min(length, buffer.row)
        buffer.add(flat[start : start + kept], length)
        start += kept
    if start != len(flat):
        raise ValueError(f"data loader state: the buffer holds {len(flat)} ids but its lengths account for {start}")


@dataclass(frozen=True)
class _Snapshot:
    """The loader's resumable state after a batch, cheap to take (state_dict() packs it on demand)."""

    epoch: int
    pos: Position | None
    doc: int
    buffer: _BestFitBuffer


Batch = tuple[torch.Tensor, torch.Tensor]
Made = tuple[Batch, _Snapshot] | None  # None: the pass is over (loop=False)


class _Prefetcher:
    """Makes a loader's batches in a daemon thread, `depth` ahead. The thread holds the loader only while
    making a batch (a weak reference otherwise), so a loader that is dropped stops its thread."""

    def __init__(self, loader: DataLoader, depth: int) -> None:
        self._queue: queue.Queue[Made | BaseException] = queue.Queue(maxsize=depth)
        self._last: Made | BaseException = None  # once the thread has ended: what it ended with
        self._ended = False
        threading.Thread(target=_prefetch, args=(weakref.ref(loader), self._queue), daemon=True,
                         name=f"data-loader-rank{loader.rank}").start()

    def get(self) -> Made:
        """The next batch with its snapshot; None at the end; raises what the thread raised."""
        item = self._last if self._ended else self._queue.get()
        if item is None or isinstance(item, BaseException):
            self._ended, self._last = True, item
        if isinstance(item, BaseException):
            raise item
        return item


def _prefetch(ref: weakref.ref[DataLoader], out: queue.Queue) -> None:
    while (loader := ref()) is not None:
        try:
            item = loader._make()
        except BaseException as e:  # handed over: the consumer raises it
            item = e
        del loader
        while True:
            try:
                out.put(item, timeout=0.5)
                break
            except queue.Full:
                if ref() is None:
                    return
        if item is None or isinstance(item, BaseException):
            return


class DataLoader:
    """Iterate to get (inputs, targets), each a LongTensor of shape (batch_size, seq_len) on `device`."""

    def __init__(
        self,
        storage,
        shards: list[str],
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        buffer_docs: int = 1000,
        tokenizer_batch: int = 128,
        device: str | torch.device = "cpu",
        loop: bool = True,
        state: dict[str, Any] | None = None,
        prefetch: int = 0,
    ):
        """prefetch: batches made ahead in a background thread (0: each one when asked for)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 or more batches, got {prefetch}")
        if batch_size < 1 or seq_len < 1 or buffer_docs < 1 or tokenizer_batch < 1:
            raise ValueError("batch_size, seq_len, buffer_docs and tokenizer_batch must be at least 1")
        if not shards:
            raise DataError("the data loader needs at least one shard")
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.buffer_docs, self.tokenizer_batch = buffer_docs, tokenizer_batch
        self.device = torch.device(device)
        self.loop = loop
        self._row_groups = _RowGroups(storage, shards)
        self._first = self._row_groups.advance((0, 0), rank)  # this worker's first row group of every epoch
        if self._first is None and loop:
            raise DataError(
                f"worker {rank} of {world_size} has no row group to read: the {len(shards)} shards hold fewer "
                "row groups than there are workers (prepare more data or lower data.row_group_size)"
            )
        self._buffer = _BestFitBuffer(row=seq_len + 1)
        self._doc_chars = MAX_CHARS_PER_TOKEN * (seq_len + 1)
        self._texts: list[str] | None = None  # the current row group, once read
        if state is None:
            self.epoch, self._pos, self._doc = 0, self._first, 0
        else:
            self._load_state(state, len(shards))
        self._yielded = self._snapshot()  # the state after the last batch yielded
        self.prefetch = prefetch
        self._prefetcher: _Prefetcher | None = None  # started by the first __next__

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: where this loader stands after the last batch it yielded."""
        s = self._yielded
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": s.epoch,
            "position": None if s.pos is None else [s.pos[0], s.pos[1], s.doc],
            "buffer": _pack_buffer(s.buffer),
        }

    def _snapshot(self) -> _Snapshot:
        return _Snapshot(self.epoch, self._pos, self._doc, self._buffer.copy())

    def _load_state(self, state: dict[str, Any], num_shards: int) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r}; this loader reads {STATE_VERSION}")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"data loader state belongs to worker {state['rank']} of {state['world_size']}, "
                f"not {self.rank} of {self.world_size}: each worker must resume from its own state"
            )
        self.epoch = state["epoch"]
        if state["position"] is None:
            self._pos, self._doc = None, 0
        else:
            shard, rg, self._doc = state["position"]
            if not 0 <= shard < num_shards:
                raise ValueError(f"data loader state points at shard {shard} but there are {num_shards}")
            self._pos = (shard, rg)
        _unpack_buffer(state["buffer"], self._buffer)

    # ------------------------------------------------------------------ reading

    def _refill(self) -> bool:
        """Tokenize the next few documents into the buffer; False once the data is exhausted (loop=False)."""
        if self._pos is None:
            return False
        if self._texts is None:
            self._texts = self._row_groups.read(self._pos)
        chunk = [text[: self._doc_chars] for text in self._texts[self._doc : self._doc + self.tokenizer_batch]]
        for tokens in self.tokenizer.encode(chunk, prepend=self.bos) if chunk else []:
            self._buffer.add(tokens)
        self._doc += len(chunk)
        if self._doc >= len(self._texts):
            self._next_row_group()
        return True

    def _next_row_group(self) -> None:
        self._texts, self._doc = None, 0
        self._pos = self._row_groups.advance(self._pos, self.world_size)
        if self._pos is None and self.loop:
            self.epoch += 1
            self._pos = self._first
            log.info("worker %d: data epoch %d begins", self.rank, self.epoch)
        if self._pos is None:
            self._row_groups.close()

    # ------------------------------------------------------------------ packing

    def _row(self) -> list[int] | None:
        """One row of T+1 tokens by best fit; None when the data ran out first."""
        row: list[int] = []
        capacity = self._buffer.row
        while len(row) < capacity:
            while len(self._buffer) < self.buffer_docs and self._refill():
                pass
            if not len(self._buffer):
                return None
            row += self._buffer.take(capacity - len(row))
        return row

    def __iter__(self) -> DataLoader:
        return self

    def _make(self) -> Made:
        """The next batch on the CPU and the state after it; None once the pass is over."""
        rows = []
        for _ in range(self.batch_size):
            row = self._row()
            if row is None:  # loop=False and the pass is over: the incomplete batch is dropped
                return None
            rows.append(row)
        batch = torch.tensor(rows, dtype=torch.long)
        return (batch[:, :-1].contiguous(), batch[:, 1:].contiguous()), self._snapshot()

    def __next__(self) -> Batch:
        if self.prefetch and self._prefetcher is None:
            self._prefetcher = _Prefetcher(self, self.prefetch)
        made = self._prefetcher.get() if self._prefetcher else self._make()
        if made is None:
            raise StopIteration
        (inputs, targets), self._yielded = made
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return (
                inputs.pin_memory().to(self.device, non_blocking=True),
                targets.pin_memory().to(self.device, non_blocking=True),
            )
        return inputs.to(self.device), targets.to(self.device)


def token_bytes(tokenizer: Tokenizer) -> torch.Tensor:
    """int32 tensor of length vocab_size: the UTF-8 bytes each token stands for, 0 for special tokens
    (they carry no text, so bits per byte leaves them out)."""
    return torch.tensor([len(tokenizer.id_to_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=torch.int32)
