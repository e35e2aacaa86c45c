"""
Pretraining corpora: written into storage as parquet shards, streamed back out one row group at a time.

Notable:
- one layout for every source: data/<corpus>/shard_XXXXX.parquet, a single `text` column, zstd, row
  groups of `row_group_size` documents (the unit a data-loader worker streams), and
  data/<corpus>/_SUCCESS.json written last (shard list, document and byte counts, a hash of the settings)
- `prepare_corpus` is idempotent: a finished corpus with the same settings is skipped without touching a
  file; one without a matching _SUCCESS.json (interrupted, or other settings) is redone
- "stdlib": every .py file of Python's own library, no download; a seeded shuffle so that each shard mixes
  modules instead of holding one package
- "fineweb-edu" / "climbmix": nanochat's pre-shuffled hub shards, taken as they are (their row groups are
  nanochat's 1024 documents); a small thread pool downloads each to a temp file, with retries and
  exponential backoff, checks it is a parquet file with a `text` column, then puts it into storage in one
  piece. Shards already in storage are kept, so an interrupted download resumes
- "local": a folder of .parquet (with a `text` column) or .txt files (one document each), re-sharded
- the last `val_shards` shards are the validation split, as in nanochat (climbmix pins its last hub shard)
- reading goes through pyarrow's filesystem for the storage (local folder or S3), never the whole corpus
  in memory: `iter_row_groups` resumes at any (shard, row group) for the data loader
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import requests
from tqdm.auto import tqdm

from nanochat.config import ConfigError, DataConfig
from services.layout import CORPUS_SUCCESS, corpus_prefix, shard_name

log = logging.getLogger(__name__)

SHARD_RE = re.compile(r"^shard_\d{5}\.parquet$")
STDLIB_SEED = 1337  # fixed: the same Python always yields the same stdlib corpus
DOWNLOAD_WORKERS = 4  # the hub throttles many parallel downloads; 4 keeps a fast link busy
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_TIMEOUT_S = 30.0


class DataError(RuntimeError):
    """The corpus could not be prepared or read; the message names the shard, file or URL."""


class CorpusNotReady(DataError):
    """No finished corpus in storage: `nanochat data prepare` has not completed."""


@dataclass(frozen=True)
class HubDataset:
    base_url: str
    max_shard: int  # index of the last shard the dataset has
    pinned_val: bool  # the last hub shard is always downloaded, as the validation shard


# nanochat's pretraining data sets (karpathy/nanochat nanochat/dataset.py)
HUB_DATASETS = {
    "fineweb-edu": HubDataset("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1822, False),
    "climbmix": HubDataset("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6542, True),
}


# -----------------------------------------------------------------------------
# prepare


def prepare_corpus(cfg: DataConfig, storage, limit: int | None = None) -> dict[str, Any]:
    """Write the configured corpus into storage unless an identical one is already there.
    limit: at most this many documents (stdlib, local; hub sources count shards with data.num_shards)."""
    t0 = time.time()
    corpus, prefix = cfg.corpus_name, corpus_prefix(cfg.corpus_name)
    settings = _settings(cfg, limit)
    digest = _hash(settings)
    done = _read_success(storage, corpus)
    present = _present_shards(storage, prefix)
    if done and done["settings_hash"] == digest and set(done["shards_list"]) <= present:
        log.info("corpus %s is already prepared (%d shards): skipping", corpus, len(done["shards_list"]))
        return _summary(done, skipped=True, seconds=time.time() - t0)

    # from here on the corpus is incomplete until the new _SUCCESS.json lands
    storage.delete(prefix + CORPUS_SUCCESS)
    if cfg.source in HUB_DATASETS:
        names = _prepare_hub(cfg, storage, prefix, present)
    else:
        for name in sorted(present):  # regenerated below; stale extras must not be listed
            storage.delete(prefix + name)
        docs = stdlib_documents() if cfg.source == "stdlib" else _local_documents(cfg)
        names = _write_shards(islice(docs, limit), storage, prefix, cfg.docs_per_shard, cfg.row_group_size)
    if not names:
        raise DataError(f"data.source={cfg.source} produced no documents for corpus {corpus}")
    record = _finish(storage, corpus, cfg.source, settings, digest, names)
    return _summary(record, skipped=False, seconds=time.time() - t0)


def _settings(cfg: DataConfig, limit: int | None) -> dict[str, Any]:
    """What determines the corpus' content; a change in any of these redoes `prepare`."""
    if cfg.source in HUB_DATASETS:
        # base_url is left out: a mirror serves the same shards
        return {"source": cfg.source, "num_shards": len(_hub_indices(cfg))}
    settings: dict[str, Any] = {
        "source": cfg.source, "limit": limit, "docs_per_shard": cfg.docs_per_shard, "row_group_size": cfg.row_group_size
    }
    if cfg.source == "stdlib":
        settings["python"] = f"{sys.version_info.major}.{sys.version_info.minor}"  # its stdlib is the corpus
    else:
        root = _local_root(cfg)
        # edited, added or removed files redo the corpus, not only another folder
        files = [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in _local_files(root)]
        settings.update(local_path=str(root), files=_hash(files))
    return settings


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _present_shards(storage, prefix: str) -> set[str]:
    return {key.removeprefix(prefix) for key in storage.list(prefix) if SHARD_RE.match(key.removeprefix(prefix))}


def _read_success(storage, corpus: str) -> dict[str, Any] | None:
    key = corpus_prefix(corpus) + CORPUS_SUCCESS
    if not storage.exists(key):
        return None
    record = json.loads(storage.read_text(key))
    record["shards_list"] = [s["name"] for s in record["shards"]]
    return record


def _finish(storage, corpus: str, source: str, settings: dict, digest: str, names: list[str]) -> dict[str, Any]:
    """Count documents and bytes from the shards' footers, then write _SUCCESS.json (last)."""
    prefix = corpus_prefix(corpus)
    fs, base = storage.arrow_filesystem()
    shards = []
    for name in names:
        path = _arrow_path(base, prefix + name)
        with fs.open_input_file(path) as f:
            shards.append({"name": name, "documents": pq.ParquetFile(f).metadata.num_rows, "bytes": f.size()})
    record = {
        "corpus": corpus,
        "source": source,
        "settings": settings,
        "settings_hash": digest,
        "shards": shards,
        "documents": sum(s["documents"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
    }
    storage.write_text(prefix + CORPUS_SUCCESS, json.dumps(record, indent=1))
    log.info("corpus %s: %d shards, %d documents, %.1f MB", corpus, len(shards), record["documents"], record["bytes"] / 1e6)
    record["shards_list"] = names
    return record


def _summary(record: dict[str, Any], skipped: bool, seconds: float) -> dict[str, Any]:
    return {
        "corpus": record["corpus"],
        "source": record["source"],
        "skipped": skipped,
        "shards": len(record["shards"]),
        "documents": record["documents"],
        "bytes": record["bytes"],
        "seconds": round(seconds, 3),
    }


def _write_shards(docs: Iterable[str], storage, prefix: str, docs_per_shard: int, row_group_size: int) -> list[str]:
    """Shards of docs_per_shard documents; a short remainder (under half a shard) joins the last full shard,
    since the last shards are the validation split and a sliver of one would starve the workers' share."""
    names: list[str] = []
    it = iter(docs)
    batch = list(islice(it, docs_per_shard))
    while batch:
        following = list(islice(it, docs_per_shard))
        if following and len(following) < max(1, docs_per_shard // 2):  # a short read: the last documents
            batch, following = batch + following, []
        name = shard_name(len(names))
        table = pa.table({"text": pa.array(batch, type=pa.string())})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=row_group_size, compression="zstd")
        storage.write_bytes(prefix + name, sink.getvalue().to_pybytes())
        names.append(name)
        log.info("wrote %s%s (%d documents)", prefix, name, len(batch))
        batch = following
    return names


# -----------------------------------------------------------------------------
# sources


def stdlib_documents() -> Iterator[str]:
    """Python's standard library sources, one document per .py file, in a seeded shuffled order."""
    paths = []
    for folder, subfolders, files in os.walk(sysconfig.get_paths()["stdlib"]):
        # third-party packages installed into the interpreter are not the standard library
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]
        paths += [Path(folder, name) for name in files if name.endswith(".py")]
    paths.sort()
    random.Random(STDLIB_SEED).shuffle(paths)
    for path in paths:
        text = path.read_bytes().decode("utf-8", errors="ignore")
        if text.strip():  # many __init__.py files are empty
            yield text


def _local_root(cfg: DataConfig) -> Path:
    if not cfg.local_path:
        raise ConfigError("data.local_path must name a folder of .parquet or .txt files when data.source=local")
    root = Path(cfg.local_path).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"data.local_path: {root} is not a folder")
    return root


def _local_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".txt") and p.is_file())
    if not files:
        raise ConfigError(f"data.local_path: {root} holds no .parquet or .txt files")
    return files


def _local_documents(cfg: DataConfig) -> Iterator[str]:
    """Documents of a local folder, in file-name order (kept: the files may be pre-shuffled, as the hub's are)."""
    for path in _local_files(_local_root(cfg)):
        if path.suffix == ".txt":
            text = path.read_bytes().decode("utf-8", errors="ignore")
            if text.strip():
                yield text
            continue
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise DataError(f"{path} has no `text` column (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=["text"]):
            yield from (t for t in batch.column(0).to_pylist() if t)


def _hub_indices(cfg: DataConfig) -> list[int]:
    dataset = HUB_DATASETS[cfg.source]
    total = dataset.max_shard + 1
    n = total if cfg.num_shards == -1 else min(cfg.num_shards, total)
    if dataset.pinned_val:  # n - 1 training shards from the front, plus the pinned validation shard
        return [*range(n - 1), dataset.max_shard]
    return list(range(n))


def hub_urls(cfg: DataConfig) -> dict[str, str]:
    """{shard name: URL} of the hub shards cfg asks for, in corpus order (the validation shard last)."""
    base_url = (cfg.base_url or HUB_DATASETS[cfg.source].base_url).rstrip("/")
    return {shard_name(i): f"{base_url}/{shard_name(i)}" for i in _hub_indices(cfg)}


def _prepare_hub(cfg: DataConfig, storage, prefix: str, present: set[str]) -> list[str]:
    names = list(hub_urls(cfg))
    for stale in sorted(present - set(names)):
        storage.delete(prefix + stale)
    # shards are put in one piece, so one that is present is complete: resume where we stopped
    todo = [name for name in names if name not in present]
    if len(todo) < len(names):
        log.info("%d of %d shards already in storage", len(names) - len(todo), len(names))
    base_url = (cfg.base_url or HUB_DATASETS[cfg.source].base_url).rstrip("/")
    download_shards(storage, prefix, base_url, todo)
    return names


# -----------------------------------------------------------------------------
# download


def download_shards(
    storage,
    prefix: str,
    base_url: str,
    names: list[str],
    workers: int = DOWNLOAD_WORKERS,
    attempts: int = DOWNLOAD_ATTEMPTS,
    backoff_s: float = 2.0,
) -> None:
    """Download base_url/<name> into storage at prefix<name> for every name, in parallel.
    Raises DataError listing every shard that still failed after its retries."""
    if not names:
        return
    failures: list[str] = []
    with (
        ThreadPoolExecutor(max_workers=min(workers, len(names))) as pool,
        tqdm(total=len(names), unit="shard", desc=f"download {prefix}") as bar,
    ):
        futures = [
            pool.submit(_download_one, f"{base_url}/{name}", storage, prefix + name, attempts, backoff_s)
            for name in names
        ]
        for future in as_completed(futures):
            try:
                future.result()
            except DataError as e:
                failures.append(str(e))
            bar.update(1)
    if failures:
        raise DataError(f"{len(failures)} of {len(names)} shards failed to download:\n" + "\n".join(sorted(failures)))


def _download_one(url: str, storage, key: str, attempts: int, backoff_s: float) -> None:
    for attempt in range(1, attempts + 1):
        try:
            with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
                with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                        # missing or forbidden: asking again will not change the answer
                        raise DataError(f"{url}: HTTP {response.status_code} {response.reason}")
                    response.raise_for_status()
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        tmp.write(chunk)
                tmp.flush()
                _check_shard(tmp.name)
                storage.upload_file(tmp.name, key)
            return
        except (requests.RequestException, OSError, pa.ArrowException) as e:
            if attempt == attempts:
                raise DataError(f"{url}: failed after {attempts} attempts: {e}") from e
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.1fs", url, attempt, attempts, e, wait)
            time.sleep(wait)


def _check_shard(path: str) -> None:
    """A truncated body or an HTML error page must not pass for a shard."""
    schema = pq.read_schema(path)
    if "text" not in schema.names:
        raise pa.ArrowInvalid(f"no `text` column (columns: {', '.join(schema.names)})")


# -----------------------------------------------------------------------------
# read


def list_shards(storage, corpus: str) -> list[str]:
    """Storage keys of the corpus' shards, in order. Only a finished corpus is listed."""
    record = _read_success(storage, corpus)
    if record is None:
        raise CorpusNotReady(f"corpus {corpus!r} is not prepared in storage (no {corpus_prefix(corpus)}{CORPUS_SUCCESS}); run `nanochat data prepare` first")
    return [corpus_prefix(corpus) + name for name in record["shards_list"]]


def corpus_fingerprint(storage, corpus: str) -> str:
    """Changes whenever the corpus' settings or shards change (so its tokenizer is out of date)."""
    record = _read_success(storage, corpus)
    if record is None:
        raise CorpusNotReady(f"corpus {corpus!r} is not prepared in storage; run `nanochat data prepare` first")
    return _hash([record["settings_hash"], record["shards"]])


def split_shards(shards: list[str], val_shards: int) -> tuple[list[str], list[str]]:
    """(train, val): the last val_shards shards are validation, as in nanochat."""
    if val_shards < 1 or len(shards) <= val_shards:
        raise DataError(
            f"{len(shards)} shards cannot leave a training split with data.val_shards={val_shards}: "
            "lower data.val_shards or prepare more shards (data.docs_per_shard, data.num_shards)"
        )
    return shards[:-val_shards], shards[-val_shards:]


def _arrow_path(base: str, key: str) -> str:
    return f"{base.rstrip('/')}/{key}" if base else key


def iter_row_groups(
    storage, shards: list[str], start: tuple[int, int] = (0, 0)
) -> Iterator[tuple[int, int, list[str]]]:
    """(shard_idx, rg_idx, texts) for every row group from `start` on; indices are into `shards`.
    Reads one row group at a time (ranged reads on S3), so memory holds one row group."""
    fs, base = storage.arrow_filesystem()
    first_shard, first_rg = start
    for shard_idx in range(first_shard, len(shards)):
        with fs.open_input_file(_arrow_path(base, shards[shard_idx])) as f:
            pf = pq.ParquetFile(f)
            for rg_idx in range(first_rg if shard_idx == first_shard else 0, pf.num_row_groups):
                yield shard_idx, rg_idx, pf.read_row_group(rg_idx, columns=["text"]).column(0).to_pylist()


def iter_documents(
    storage,
    corpus: str,
    split: Literal["train", "val"] = "train",
    max_chars: int | None = None,
    doc_cap: int | None = None,
    val_shards: int = 1,
) -> Iterator[str]:
    """Documents of one split in order, each cut to doc_cap characters, stopping after max_chars in all
    (the last document is cut so the total is exactly max_chars when the corpus has that many)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train, val = split_shards(list_shards(storage, corpus), val_shards)
    budget = max_chars if max_chars is not None else float("inf")
    if budget <= 0:
        return
    for _, _, texts in iter_row_groups(storage, train if split == "train" else val):
        for text in texts:
            if doc_cap is not None:
                text = text[:doc_cap]
            if len(text) >= budget:
                yield text[: int(budget)]
                return
            budget -= len(text)
            yield text
