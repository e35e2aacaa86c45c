"""
Where task data comes from: a local folder, the cache, object storage, or the Hugging Face hub.

Notable:
- the order for each file a task needs: `data.tasks_dir` (local files, see below) -> the local cache
  (~/.cache/nanochat/task_cache) -> storage under tasks/<repo>/<path> (so that every worker and pod downloads a file once) -> HTTPS from
  https://huggingface.co/datasets/<repo>/resolve/main/<path> (a mirror via HF_ENDPOINT, the variable the
  Hugging Face tools read). A download goes to a temp file, is checked (a parquet footer, or non-empty
  text), then renamed into the cache and put into storage
- retries with exponential backoff on connection errors, timeouts, 5xx, 408 and 429; other 4xx fail at
  once (asking again will not change a 404)
- `data.offline`, or a download that still fails, raises TaskUnavailable with the reason and what to put
  where instead
- data.tasks_dir: `<stem>_<split>.jsonl|.parquet` first, then `<stem>.jsonl|.parquet` for any split.
  Stems: arc_easy, arc_challenge, mmlu, gsm8k, humaneval, smoltalk, identity; words_alpha.txt for the
  spelling tasks. Rows in the Hugging Face schema of each data set (see the task modules); ARC also in
  llm-foundry's {"query", "choices", "gold"}, HumanEval also in llm-foundry's code-eval jsonl
- rows stay in Arrow (parquet) or as parsed dicts (jsonl); `subset` reads the files one at a time and
  keeps only the rows the task serves, so a capped task holds at most one file besides its own rows
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import requests

from nanochat.config import DataConfig
from trainer.tasks.base import TaskUnavailable

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_CACHE = Path("~/.cache/nanochat/task_cache")
STORAGE_PREFIX = "tasks/"
ATTEMPTS = 4
BACKOFF_S = 2.0
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class HubSource:
    """A data set on the hub: its repository and the parquet files of each split."""

    repo: str
    splits: dict[str, tuple[str, ...]]


def hub_url(repo: str, path: str) -> str:
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    return f"{endpoint}/datasets/{repo}/resolve/main/{path}"


# -----------------------------------------------------------------------------
# download


def fetch(
    url: str,
    key: str,
    task: str,
    storage=None,
    cache_dir: str | Path | None = None,
    offline: bool = False,
    check: Callable[[Path], None] | None = None,
    attempts: int = ATTEMPTS,
    backoff_s: float = BACKOFF_S,
) -> Path:
    """A local path holding url's content: from the cache, from storage at tasks/<key>, or downloaded
    (then kept in both). Raises TaskUnavailable naming the task when offline or when the download fails."""
    cached = Path(cache_dir or DEFAULT_CACHE).expanduser() / key
    if cached.is_file():
        return cached
    storage_key = STORAGE_PREFIX + key
    cached.parent.mkdir(parents=True, exist_ok=True)
    if storage is not None and storage.exists(storage_key):
        log.info("%s: %s from %r", task, key, storage)
        _atomically(cached, lambda tmp: storage.download_file(storage_key, tmp))
        return cached
    if offline:
        raise TaskUnavailable(task, f"data.offline is set and {url} is not cached")
    log.info("%s: downloading %s", task, url)
    _atomically(cached, lambda tmp: _download(url, tmp, task, check, attempts, backoff_s))
    if storage is not None:
        storage.upload_file(cached, storage_key)
    return cached


def _atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """fill() a temp file beside target, then rename it: workers sharing the cache never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        fill(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download(url: str, path: Path, task: str, check: Callable[[Path], None] | None, attempts: int, backoff_s: float) -> None:
    for attempt in range(1, attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=TIMEOUT_S) as response:
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    raise TaskUnavailable(task, f"{url}: HTTP {response.status_code} {response.reason}")
                response.raise_for_status()
                with open(path, "wb") as f:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
            if check is not None:
                check(path)
            return
        except (requests.RequestException, OSError, pa.ArrowException, ValueError) as e:
            if attempt == attempts:
                raise TaskUnavailable(task, f"downloading {url} failed after {attempts} attempts: {e}") from e
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning("%s: %s attempt %d/%d failed (%s); retrying in %.1fs", task, url, attempt, attempts, e, wait)
            time.sleep(wait)


def check_parquet(path: Path) -> None:
    """A truncated body or an HTML error page must not pass for a parquet file."""
    pq.read_schema(path)


def check_text(path: Path) -> None:
    if path.stat().st_size == 0:
        raise ValueError("empty file")


# -----------------------------------------------------------------------------
# rows


class ParquetRows:
    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self.counts = [pq.ParquetFile(p).metadata.num_rows for p in self.paths]

    def __len__(self) -> int:
        return sum(self.counts)

    def subset(self, indices: list[int]) -> TableRows:
        """The rows at the sorted global indices, reading one file at a time."""
        tables, start, i = [], 0, 0
        for path, count in zip(self.paths, self.counts):
            local = []
            while i < len(indices) and indices[i] < start + count:
                local.append(indices[i] - start)
                i += 1
            if local:
                table = pq.read_table(path)
                tables.append(table if len(local) == count else table.take(pa.array(local)))
            start += count
        return TableRows(pa.concat_tables(tables) if tables else pa.table({}))


class TableRows(Sequence):
    """Rows of an Arrow table, each converted to a dict when asked for (Arrow is far smaller than dicts)."""

    def __init__(self, table: pa.Table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> dict:
        return self.table.slice(index, 1).to_pylist()[0]


class JsonlRows:
    def __init__(self, paths: Sequence[Path]):
        self.rows = [json.loads(line) for p in paths for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: list[int]) -> list[dict]:
        return [self.rows[i] for i in indices]


def read_rows(path: Path) -> ParquetRows | JsonlRows:
    return ParquetRows([path]) if path.suffix == ".parquet" else JsonlRows([path])


def local_file(tasks_dir: str | None, stem: str, split: str) -> Path | None:
    """The task's file in data.tasks_dir: <stem>_<split> before <stem>, .jsonl before .parquet."""
    if not tasks_dir:
        return None
    folder = Path(tasks_dir).expanduser()
    for name in (f"{stem}_{split}.jsonl", f"{stem}_{split}.parquet", f"{stem}.jsonl", f"{stem}.parquet"):
        if (folder / name).is_file():
            return folder / name
    return None


def task_rows(
    task: str, stem: str, source: HubSource, data: DataConfig, split: str, storage=None, cache_dir: str | Path | None = None
) -> ParquetRows | JsonlRows:
    """The rows of one split of a task: data.tasks_dir's file, else the hub's parquet files."""
    if split not in source.splits:
        raise ValueError(f"{task} has no split {split!r}; it has {', '.join(source.splits)}")
    local = local_file(data.tasks_dir, stem, split)
    if local is not None:
        log.info("%s (%s): reading %s", task, split, local)
        return read_rows(local)
    hint = f" (or put {stem}_{split}.jsonl / {stem}.jsonl into data.tasks_dir)"
    try:
        paths = [
            fetch(hub_url(source.repo, path), f"{source.repo}/{path}", task, storage, cache_dir, data.offline, check_parquet)
            for path in source.splits[split]
        ]
    except TaskUnavailable as e:
        raise TaskUnavailable(task, e.reason + hint) from e
    return ParquetRows(paths)
