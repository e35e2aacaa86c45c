"""Corpus preparation (stdlib, hub download, local folder) and streaming documents back out of storage."""

import json
import os
import sysconfig
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.config import ConfigError, DataConfig
from services.storage import open_storage
from trainer.data.corpus import (
    CorpusNotReady,
    DataError,
    download_shards,
    hub_urls,
    iter_documents,
    iter_row_groups,
    list_shards,
    prepare_corpus,
    split_shards,
)


def stdlib_cfg(**overrides) -> DataConfig:
    return DataConfig(**{"source": "stdlib", "docs_per_shard": 20, "row_group_size": 8, **overrides})


def files_state(root: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def all_stdlib_sources() -> set[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return {p.read_bytes().decode("utf-8", errors="ignore") for p in root.rglob("*.py") if "site-packages" not in p.parts}


# -----------------------------------------------------------------------------
# stdlib source, layout, idempotence


def test_stdlib_corpus_layout(local_storage):
    summary = prepare_corpus(stdlib_cfg(), local_storage, limit=50)
    assert summary["skipped"] is False and summary["documents"] == 50 and summary["shards"] == 3

    keys = local_storage.list("data/stdlib/")
    assert keys == ["data/stdlib/_SUCCESS.json"] + [f"data/stdlib/shard_0000{i}.parquet" for i in range(3)]
    rows_per_group = []
    for key in list_shards(local_storage, "stdlib"):
        pf = pq.ParquetFile(local_storage.root / key)
        assert pf.schema_arrow.names == ["text"]
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        rows_per_group.append([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    assert rows_per_group == [[8, 8, 4], [8, 8, 4], [8, 2]]

    success = json.loads(local_storage.read_text("data/stdlib/_SUCCESS.json"))
    assert [s["documents"] for s in success["shards"]] == [20, 20, 10]
    assert success["documents"] == 50
    assert success["bytes"] == sum((local_storage.root / k).stat().st_size for k in list_shards(local_storage, "stdlib"))


def test_stdlib_documents_are_whole_source_files_in_a_seeded_mixed_order(local_storage, tmp_path):
    prepare_corpus(stdlib_cfg(), local_storage, limit=40)
    docs = [d for _, _, texts in iter_row_groups(local_storage, list_shards(local_storage, "stdlib")) for d in texts]
    sources = all_stdlib_sources()
    assert len(set(docs)) == 40 and all(d in sources for d in docs)
    # not the alphabetical head of the library: the shuffle mixes modules into every shard
    first_in_sorted_order = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[0].read_text(errors="ignore")
    assert docs[0] != first_in_sorted_order

    again = open_storage(str(tmp_path / "again"))
    prepare_corpus(stdlib_cfg(), again, limit=40)
    assert list(iter_documents(again, "stdlib")) == list(iter_documents(local_storage, "stdlib"))


def test_prepare_into_s3_matches_local(s3_env, local_storage):
    s3 = open_storage(s3_env)
    summary = prepare_corpus(stdlib_cfg(docs_per_shard=10, row_group_size=4), s3, limit=30)
    assert summary["shards"] == 3 and summary["documents"] == 30
    assert s3.list("data/stdlib/") == sorted(
        ["data/stdlib/_SUCCESS.json"] + [f"data/stdlib/shard_0000{i}.parquet" for i in range(3)]
    )
    prepare_corpus(stdlib_cfg(docs_per_shard=10, row_group_size=4), local_storage, limit=30)
    for split in ("train", "val"):
        assert list(iter_documents(s3, "stdlib", split)) == list(iter_documents(local_storage, "stdlib", split))
    assert prepare_corpus(stdlib_cfg(docs_per_shard=10, row_group_size=4), s3, limit=30)["skipped"] is True


def test_repeated_prepare_is_skipped_and_touches_no_file(local_storage):
    prepare_corpus(stdlib_cfg(), local_storage, limit=30)
    before = files_state(local_storage.root)
    summary = prepare_corpus(stdlib_cfg(), local_storage, limit=30)
    assert summary["skipped"] is True and summary["documents"] == 30
    assert files_state(local_storage.root) == before


def test_changed_settings_redo_the_corpus_and_drop_stale_shards(local_storage):
    prepare_corpus(stdlib_cfg(docs_per_shard=10), local_storage, limit=30)
    summary = prepare_corpus(stdlib_cfg(docs_per_shard=15), local_storage, limit=30)
    assert summary["skipped"] is False and summary["shards"] == 2
    assert local_storage.list("data/stdlib/shard_") == [f"data/stdlib/shard_0000{i}.parquet" for i in range(2)]


def test_corpus_without_success_marker_is_redone(local_storage):
    prepare_corpus(stdlib_cfg(), local_storage, limit=30)
    local_storage.delete("data/stdlib/_SUCCESS.json")
    local_storage.write_bytes("data/stdlib/shard_00099.parquet", b"half-written leftover")
    with pytest.raises(CorpusNotReady, match="nanochat data prepare"):
        list_shards(local_storage, "stdlib")

    summary = prepare_corpus(stdlib_cfg(), local_storage, limit=30)
    assert summary["skipped"] is False
    assert not local_storage.exists("data/stdlib/shard_00099.parquet")
    assert len(list_shards(local_storage, "stdlib")) == 2


# -----------------------------------------------------------------------------
# reading


@pytest.fixture
def small_corpus(local_storage):
    """50 stdlib documents in 3 shards (20, 20, 10) with row groups of 8."""
    prepare_corpus(stdlib_cfg(), local_storage, limit=50)
    return local_storage


def test_last_shards_are_validation():
    shards = [f"s{i}" for i in range(5)]
    assert split_shards(shards, 1) == (shards[:4], shards[4:])
    assert split_shards(shards, 2) == (shards[:3], shards[3:])
    with pytest.raises(DataError, match="data.val_shards"):
        split_shards(shards[:2], 2)


def test_train_and_val_documents_come_from_their_shards(small_corpus):
    shards = list_shards(small_corpus, "stdlib")
    per_shard = [[d for _, _, t in iter_row_groups(small_corpus, [s]) for d in t] for s in shards]
    assert list(iter_documents(small_corpus, "stdlib", "train")) == per_shard[0] + per_shard[1]
    assert list(iter_documents(small_corpus, "stdlib", "val")) == per_shard[2]
    assert list(iter_documents(small_corpus, "stdlib", "val", val_shards=2)) == per_shard[1] + per_shard[2]


def test_doc_cap_and_max_chars_limit_what_is_streamed(small_corpus):
    full = list(iter_documents(small_corpus, "stdlib", "train"))
    capped = list(iter_documents(small_corpus, "stdlib", "train", doc_cap=100))
    assert capped == [d[:100] for d in full]

    budget = len(full[0]) + len(full[1]) // 2
    limited = list(iter_documents(small_corpus, "stdlib", "train", max_chars=budget))
    assert limited == [full[0], full[1][: len(full[1]) // 2]]
    assert sum(map(len, limited)) == budget
    assert sum(map(len, iter_documents(small_corpus, "stdlib", "train", max_chars=10**12))) == sum(map(len, full))


def test_row_groups_resume_at_a_cursor(small_corpus):
    shards = list_shards(small_corpus, "stdlib")
    everything = list(iter_row_groups(small_corpus, shards))
    assert [(s, r) for s, r, _ in everything] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    assert list(iter_row_groups(small_corpus, shards, start=(1, 1))) == everything[4:]


def test_reading_an_unprepared_corpus_says_what_to_run(local_storage):
    with pytest.raises(CorpusNotReady, match="nanochat data prepare"):
        list(iter_documents(local_storage, "fineweb-edu"))


# -----------------------------------------------------------------------------
# local source


def test_local_folder_of_text_and_parquet_files_is_resharded(local_storage, tmp_path):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first document")
    table = pa.table({"id": list(range(7)), "text": [f"row {i}" for i in range(7)]})
    pq.write_table(table, folder / "b.parquet", row_group_size=3)
    (folder / "sub" / "c.txt").write_text("last document")
    (folder / "ignored.json").write_text("{}")

    cfg = DataConfig(source="local", local_path=str(folder), corpus="mine", docs_per_shard=4, row_group_size=2)
    summary = prepare_corpus(cfg, local_storage)
    assert summary["documents"] == 9 and summary["shards"] == 2  # 4 + 5: the odd one joins the last shard
    docs = [d for _, _, t in iter_row_groups(local_storage, list_shards(local_storage, "mine")) for d in t]
    assert docs == ["first document", *[f"row {i}" for i in range(7)], "last document"]
    assert prepare_corpus(cfg, local_storage)["skipped"] is True
    (folder / "a.txt").write_text("first document, edited")
    assert prepare_corpus(cfg, local_storage)["skipped"] is False
    assert next(iter_documents(local_storage, "mine")) == "first document, edited"


def test_local_source_errors_name_the_setting(local_storage, tmp_path):
    with pytest.raises(ConfigError, match="data.local_path"):
        prepare_corpus(DataConfig(source="local"), local_storage)
    with pytest.raises(ConfigError, match="no .parquet or .txt"):
        prepare_corpus(DataConfig(source="local", local_path=str(tmp_path)), local_storage)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="no `text` column"):
        prepare_corpus(DataConfig(source="local", local_path=str(tmp_path)), local_storage)


# -----------------------------------------------------------------------------
# hub download, against a real HTTP server on 127.0.0.1


class ShardServer:
    """Serves a folder of parquet shards over HTTP; can fail the first request for chosen files."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.requests: Counter[str] = Counter()
        self.fail_first: set[str] = set()  # first GET answers 503
        self.truncate_first: set[str] = set()  # first GET answers 200 with half the file
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests[name] += 1
                first = server.requests[name] == 1
                if first and name in server.fail_first:
                    self.send_error(503, "busy")
                elif first and name in server.truncate_first:
                    data = (folder / name).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data) // 2))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                else:
                    super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def hub_shard_texts(index: int) -> list[str]:
    return [f"shard {index} document {j} " + "text " * j for j in range(6)]


@pytest.fixture
def hub(tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    for index in (0, 1, 2, 3, 6542):
        pq.write_table(pa.table({"text": hub_shard_texts(index)}), folder / f"shard_{index:05d}.parquet", row_group_size=4)
    server = ShardServer(folder)
    yield server
    server.close()


def test_download_retries_failed_and_truncated_responses(hub, local_storage):
    hub.fail_first = {"shard_00001.parquet"}
    hub.truncate_first = {"shard_00002.parquet"}
    names = [f"shard_0000{i}.parquet" for i in range(4)]
    download_shards(local_storage, "data/dl/", hub.url, names, workers=2, backoff_s=0.01)
    assert hub.requests == Counter({"shard_00000.parquet": 1, "shard_00001.parquet": 2, "shard_00002.parquet": 2, "shard_00003.parquet": 1})
    for name in names:
        assert local_storage.read_bytes(f"data/dl/{name}") == (hub.folder / name).read_bytes()


def test_missing_shard_fails_at_once_with_the_url(hub, local_storage):
    with pytest.raises(DataError, match=r"shard_00099\.parquet: HTTP 404"):
        download_shards(local_storage, "data/dl/", hub.url, ["shard_00000.parquet", "shard_00099.parquet"], backoff_s=0.01)
    assert hub.requests["shard_00099.parquet"] == 1
    assert local_storage.exists("data/dl/shard_00000.parquet")
    assert not local_storage.exists("data/dl/shard_00099.parquet")


def test_download_gives_up_after_its_attempts(hub, local_storage):
    (hub.folder / "shard_00005.parquet").write_text("<html>not a parquet file</html>")
    with pytest.raises(DataError, match="failed after 3 attempts"):
        download_shards(local_storage, "data/dl/", hub.url, ["shard_00005.parquet"], attempts=3, backoff_s=0.01)
    assert hub.requests["shard_00005.parquet"] == 3
    assert local_storage.list("data/dl/") == []


def test_fineweb_prepare_from_a_mirror(hub, local_storage):
    cfg = DataConfig(source="fineweb-edu", base_url=hub.url, num_shards=3)
    summary = prepare_corpus(cfg, local_storage)
    assert summary["shards"] == 3 and summary["documents"] == 18
    assert list_shards(local_storage, "fineweb-edu") == [f"data/fineweb-edu/shard_0000{i}.parquet" for i in range(3)]
    assert list(iter_documents(local_storage, "fineweb-edu", "val")) == hub_shard_texts(2)
    assert list(iter_documents(local_storage, "fineweb-edu", "train")) == hub_shard_texts(0) + hub_shard_texts(1)


def test_climbmix_pins_its_last_hub_shard_as_validation(hub, local_storage):
    cfg = DataConfig(source="climbmix", base_url=hub.url + "/", num_shards=3)
    prepare_corpus(cfg, local_storage)
    shards = list_shards(local_storage, "climbmix")
    assert [os.path.basename(s) for s in shards] == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    assert list(iter_documents(local_storage, "climbmix", "val")) == hub_shard_texts(6542)


def test_climbmix_plans_nanochats_hub_shards_and_urls():
    urls = hub_urls(DataConfig(source="climbmix", num_shards=3))
    hub = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    assert urls == {name: f"{hub}/{name}" for name in ("shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet")}
    assert len(hub_urls(DataConfig(source="climbmix"))) == 6543  # all of them: 6542 training, the pinned one
    mirror = hub_urls(DataConfig(source="climbmix", num_shards=2, base_url="http://mirror/climbmix/"))
    assert list(mirror.values()) == ["http://mirror/climbmix/shard_00000.parquet", "http://mirror/climbmix/shard_06542.parquet"]
    assert list(hub_urls(DataConfig(source="fineweb-edu", num_shards=2))) == ["shard_00000.parquet", "shard_00001.parquet"]


def test_interrupted_hub_prepare_downloads_only_what_is_missing(hub, local_storage):
    cfg = DataConfig(source="fineweb-edu", base_url=hub.url, num_shards=3)
    prepare_corpus(cfg, local_storage)
    assert prepare_corpus(cfg, local_storage)["skipped"] is True
    assert sum(hub.requests.values()) == 3

    local_storage.delete("data/fineweb-edu/_SUCCESS.json")
    local_storage.delete("data/fineweb-edu/shard_00001.parquet")
    hub.requests.clear()
    assert prepare_corpus(cfg, local_storage)["skipped"] is False
    assert hub.requests == Counter({"shard_00001.parquet": 1})

    # fewer shards asked for: the extra one goes, nothing is downloaded
    hub.requests.clear()
    prepare_corpus(DataConfig(source="fineweb-edu", base_url=hub.url, num_shards=2), local_storage)
    assert not hub.requests
    assert len(list_shards(local_storage, "fineweb-edu")) == 2
    assert not local_storage.exists("data/fineweb-edu/shard_00002.parquet")


def test_a_short_remainder_joins_the_last_shard_so_validation_is_not_a_sliver(local_storage):
    from nanochat.config import DataConfig
    from trainer.data.corpus import list_shards, prepare_corpus

    cfg = DataConfig(source="stdlib", docs_per_shard=40, row_group_size=8)
    summary = prepare_corpus(cfg, local_storage, limit=85)  # 40 + 40 + 5: the 5 join the second shard
    shards = list_shards(local_storage, "stdlib")
    assert len(shards) == 2 and summary["documents"] == 85
    import pyarrow.parquet as pq

    sizes = [pq.read_metadata(local_storage.root / key).num_rows for key in shards]
    assert sizes == [40, 45]
