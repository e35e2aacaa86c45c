"""
Storage behaviour, the same tests on a local folder and on S3 (a real moto server), plus what only one
backend has: atomic local writes under real failures, and S3's retries, timeouts and error messages
against real sockets (a closed port, a black-hole listener, a proxy that fails on purpose).
"""

import hashlib
import http.client
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from services.network import free_port
from services.settings import default_storage_uri, s3_settings
from services.storage import (
    _TMP_MARK,
    MAX_ATTEMPTS,
    BucketNotFound,
    InvalidKey,
    LocalStorage,
    S3Storage,
    StorageError,
    StorageUnreachable,
    open_storage,
)
from tests.support.s3 import create_bucket, set_s3_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return open_storage(str(tmp_path / "store"))
    return open_storage(request.getfixturevalue("s3_env"))


# -----------------------------------------------------------------------------
# the interface, on both backends


def test_write_then_read_bytes_and_text(storage):
    storage.write_bytes("a/b.bin", b"\x00\x01\xff")
    storage.write_text("notes/hello.txt", "héllo wörld")
    assert storage.read_bytes("a/b.bin") == b"\x00\x01\xff"
    assert storage.read_text("notes/hello.txt") == "héllo wörld"
    assert storage.read_bytes("notes/hello.txt") == "héllo wörld".encode()


def test_write_replaces_existing_object(storage):
    storage.write_bytes("k", b"old content, longer than the new")
    storage.write_bytes("k", b"new")
    assert storage.read_bytes("k") == b"new"


def test_empty_object_round_trips(storage):
    storage.write_bytes("empty", b"")
    assert storage.exists("empty")
    assert storage.read_bytes("empty") == b""


def test_read_missing_key_raises_file_not_found_naming_it(storage):
    with pytest.raises(FileNotFoundError, match="no-such-key.bin") as info:
        storage.read_bytes("dir/no-such-key.bin")
    assert isinstance(info.value, StorageError)
    assert storage.uri in str(info.value)


def test_exists_is_true_for_objects_only(storage):
    storage.write_bytes("dir/file", b"x")
    assert storage.exists("dir/file")
    assert not storage.exists("dir")  # a folder/prefix is not an object
    assert not storage.exists("dir/other")


def test_list_is_sorted_recursive_relative_and_files_only(storage):
    keys = ["b.txt", "a/2.txt", "a/1.txt", "a/sub/3.txt", "ab.txt", "z/deep/er/x"]
    for key in keys:
        storage.write_bytes(key, key.encode())
    assert storage.list() == sorted(keys)
    assert storage.list("a/") == ["a/1.txt", "a/2.txt", "a/sub/3.txt"]
    assert storage.list("a") == ["a/1.txt", "a/2.txt", "a/sub/3.txt", "ab.txt"]  # a string prefix
    assert storage.list("a/sub/3") == ["a/sub/3.txt"]
    assert storage.list("missing/") == []


def test_list_stays_inside_the_root(storage):
    inner, sibling = storage.child("p"), storage.child("p2")
    sibling.write_bytes("x", b"1")
    inner.write_bytes("y", b"2")
    assert inner.list() == ["y"]
    assert sibling.list() == ["x"]


def test_delete_removes_object_and_missing_is_fine(storage):
    storage.write_bytes("dir/k", b"x")
    storage.delete("dir/k")
    assert not storage.exists("dir/k")
    assert storage.list() == []
    storage.delete("dir/k")
    storage.delete("never/was")


def test_delete_prefix_removes_only_matching_keys(storage):
    for key in ["runs/r1/a", "runs/r1/sub/b", "runs/r10/c", "runs/r2/d", "top"]:
        storage.write_bytes(key, b"x")
    storage.delete_prefix("runs/r1/")
    assert storage.list() == ["runs/r10/c", "runs/r2/d", "top"]
    storage.delete_prefix("runs/")
    assert storage.list() == ["top"]
    storage.delete_prefix("nothing/here/")


def test_child_is_rooted_at_sub_prefix(storage):
    run = storage.child("runs/r1/")
    assert run.uri == storage.uri + "/runs/r1"
    run.write_text("base/latest", "step_000010")
    assert storage.read_text("runs/r1/base/latest") == "step_000010"
    assert run.list() == ["base/latest"]
    assert run.child("base").read_text("latest") == "step_000010"
    assert open_storage(run.uri).read_text("base/latest") == "step_000010"


def test_upload_and_download_stream_big_files(storage, tmp_path):
    # 10 MiB: above boto3's 8 MiB threshold, so S3 takes the multipart path
    src = tmp_path / "model.safetensors"
    src.write_bytes(os.urandom(10 << 20))
    storage.upload_file(src, "ckpt/step_000001/model.safetensors")
    assert storage.list("ckpt/") == ["ckpt/step_000001/model.safetensors"]
    dest = tmp_path / "fresh" / "dir" / "model.safetensors"
    storage.download_file("ckpt/step_000001/model.safetensors", dest)
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert [p.name for p in dest.parent.iterdir()] == ["model.safetensors"]  # no temp file left


def test_download_missing_key_raises_file_not_found(storage, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.download_file("missing.bin", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("bad", ["/etc/passwd", "../escape", "a/../../escape", "a//b", "./a", "", "a\\b"])
def test_invalid_keys_are_rejected(storage, bad):
    with pytest.raises(InvalidKey):
        storage.write_bytes(bad, b"x")
    with pytest.raises(InvalidKey):
        storage.read_bytes(bad)
    if bad:  # "" is a valid prefix (everything)
        with pytest.raises(InvalidKey):
            storage.child(bad)
        with pytest.raises(InvalidKey):
            storage.delete_prefix(bad)
    assert storage.list() == []


def test_arrow_filesystem_reads_and_writes_parquet(storage):
    fs, base = storage.arrow_filesystem()
    assert "://" not in base  # pyarrow and Ray Train want "bucket/prefix" with endpoint_override
    table = pa.table({"text": ["hello", "world", "again"], "n": [1, 2, 3]})
    ds.write_dataset(
        table, f"{base}/data", filesystem=fs, format="parquet", basename_template="shard_{i}.parquet"
    )
    assert storage.list() == ["data/shard_0.parquet"]
    assert pq.read_table(f"{base}/data/shard_0.parquet", filesystem=fs).equals(table)
    # single files need their folder first (a no-op marker on S3, which list() does not show)
    fs.create_dir(f"{base}/more", recursive=True)
    pq.write_table(table, f"{base}/more/shard_1.parquet", filesystem=fs)
    assert storage.list() == ["data/shard_0.parquet", "more/shard_1.parquet"]
    # what pyarrow wrote is an ordinary object for the Storage interface, and vice versa
    storage.write_bytes("data/shard_2.parquet", storage.read_bytes("more/shard_1.parquet"))
    assert ds.dataset(f"{base}/data", filesystem=fs, format="parquet").to_table().num_rows == 6


# -----------------------------------------------------------------------------
# open_storage and settings


def test_open_storage_defaults_to_env_then_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_STORAGE", str(tmp_path / "from-env"))
    store = open_storage()
    assert isinstance(store, LocalStorage) and store.root == tmp_path / "from-env"
    assert store.root.is_dir()
    monkeypatch.delenv("NANOCHAT_STORAGE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_storage_uri() == str(tmp_path / "home" / ".cache" / "nanochat")


def test_open_storage_accepts_file_uris_and_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert open_storage("~/st").root == tmp_path / "st"
    assert open_storage(f"file://{tmp_path}/st2").root == tmp_path / "st2"


@pytest.mark.parametrize("uri", ["gs://bucket/x", "s3://", "s3:///prefix", "s3://bucket/../x"])
def test_open_storage_rejects_bad_uris(uri):
    with pytest.raises(StorageError):
        open_storage(uri)


def test_s3_settings_follow_the_aws_variables(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert s3_settings().endpoint_url is None and s3_settings().region == "us-east-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://global:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert (s3_settings().endpoint_url, s3_settings().region) == ("http://global:1", "eu-west-3")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert (s3_settings().endpoint_url, s3_settings().region) == ("http://s3-only:2", "ap-south-1")


# -----------------------------------------------------------------------------
# local: atomic writes under real failures


def _run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize("how", ["write_bytes", "upload_file"])
def test_local_write_failing_midway_keeps_previous_content(tmp_path, how):
    store = LocalStorage(tmp_path / "store")
    store.write_bytes("ckpt/model.bin", b"previous")
    big = tmp_path / "big.bin"
    big.write_bytes(b"n" * (4 << 20))
    # a real mid-write failure: the file size limit makes the kernel fail the write after 1 MiB
    result = _run_child(f"""
        import errno, resource, signal
        from services.storage import LocalStorage
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        store = LocalStorage({str(tmp_path / "store")!r})
        try:
            if {how!r} == "write_bytes":
                store.write_bytes("ckpt/model.bin", b"n" * (4 << 20))
            else:
                store.upload_file({str(big)!r}, "ckpt/model.bin")
        except OSError as e:
            print(errno.errorcode[e.errno])
    """)
    assert result.stdout.strip() == "EFBIG", result.stderr
    assert store.read_bytes("ckpt/model.bin") == b"previous"
    assert os.listdir(tmp_path / "store" / "ckpt") == ["model.bin"]  # the temp file was cleaned up


def test_local_writer_killed_midway_leaves_previous_content(tmp_path):
    store = LocalStorage(tmp_path / "store")
    store.write_bytes("ckpt/model.bin", b"previous")
    # the writer streams from a FIFO, so it is provably mid-write when we kill it
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from services.storage import LocalStorage; "
            f"LocalStorage({str(tmp_path / 'store')!r}).upload_file({str(fifo)!r}, 'ckpt/model.bin')",
        ],
        cwd=REPO,
    )
    try:
        with open(fifo, "wb") as pipe:
            pipe.write(b"n" * (9 << 20))  # more than one 8 MiB copy chunk, so some reaches the temp file
            pipe.flush()
            folder = tmp_path / "store" / "ckpt"
            deadline = time.monotonic() + 20
            while not any(_TMP_MARK in p.name and p.stat().st_size > 0 for p in folder.iterdir()):
                assert time.monotonic() < deadline, "the writer never started writing"
                time.sleep(0.01)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
    except BrokenPipeError:
        pass  # the reader died with the pipe open: expected
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert store.read_bytes("ckpt/model.bin") == b"previous"
    assert store.list() == ["ckpt/model.bin"]  # the orphaned temp file is not an object
    store.write_bytes("ckpt/model.bin", b"next")
    assert store.read_bytes("ckpt/model.bin") == b"next"


# -----------------------------------------------------------------------------
# S3: failures against real sockets


def test_s3_unreachable_endpoint_fails_fast_naming_it(monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    set_s3_env(monkeypatch, endpoint)
    start = time.monotonic()
    with pytest.raises(StorageUnreachable, match=endpoint):
        open_storage("s3://bucket/prefix").read_bytes("k")
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_s3_black_hole_endpoint_times_out_within_10s(monkeypatch):
    # listen(0) with its one queue slot taken: the kernel drops further SYNs, so connect() hangs
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    set_s3_env(monkeypatch, endpoint)
    try:
        start = time.monotonic()
        with pytest.raises(StorageUnreachable, match=endpoint):
            open_storage("s3://bucket/prefix").list()
        assert time.monotonic() - start < 10
    finally:
        filler.close()
        listener.close()


def test_s3_missing_bucket_raises_bucket_not_found_naming_it(s3_env):
    missing = "no-such-bucket-" + os.urandom(4).hex()
    for use in (lambda s: s.read_bytes("k"), lambda s: s.list(), lambda s: s.arrow_filesystem()):
        with pytest.raises(BucketNotFound, match=missing):
            use(open_storage(f"s3://{missing}/prefix"))


def test_s3_bucket_deleted_after_first_use_raises_bucket_not_found(s3_env, s3_server):
    import boto3

    store = open_storage(s3_env)
    store.write_bytes("k", b"x")
    bucket = s3_env.removeprefix("s3://").split("/")[0]
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.delete_object(Bucket=bucket, Key="root/k")
    client.delete_bucket(Bucket=bucket)
    with pytest.raises(BucketNotFound, match=bucket):
        store.read_bytes("k")


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of moto that fails the next N requests on demand.

    Modes: "503" (S3's ServiceUnavailable), "reset" (connection dropped unanswered), "403" (AccessDenied).
    """

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.failures_left = 0
        self.mode = "503"
        self.log: list[tuple[str, str]] = []  # (method, outcome) of every request seen
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            protocol_version = "HTTP/1.1"  # keep-alive and "Expect: 100-continue" as from real S3

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.failures_left > 0:
                    proxy.failures_left -= 1
                    proxy.log.append((self.command, proxy.mode))
                    if proxy.mode == "reset":
                        # close without answering; unread data makes the kernel send a RST
                        self.connection.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        self.close_connection = True
                        return
                    status, code = (
                        (403, "AccessDenied") if proxy.mode == "403" else (503, "ServiceUnavailable")
                    )
                    error = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    return
                proxy.log.append((self.command, "forwarded"))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def fail_next(self, n: int, mode: str) -> None:
        self.failures_left, self.mode = n, mode
        self.log.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(s3_server, monkeypatch):
    proxy = FlakyProxy(s3_server)
    bucket = create_bucket(s3_server)
    set_s3_env(monkeypatch, proxy.endpoint)
    store = open_storage(f"s3://{bucket}/root")
    store.list()  # the bucket check happens before the failures we inject
    yield proxy, store
    proxy.close()


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_s3_transient_errors_are_retried(flaky, mode):
    proxy, store = flaky
    proxy.fail_next(MAX_ATTEMPTS - 1, mode)
    store.write_bytes("k", b"payload")
    assert proxy.log == [("PUT", mode)] * (MAX_ATTEMPTS - 1) + [("PUT", "forwarded")]
    proxy.fail_next(MAX_ATTEMPTS - 1, mode)
    assert store.read_bytes("k") == b"payload"
    assert proxy.log == [("GET", mode)] * (MAX_ATTEMPTS - 1) + [("GET", "forwarded")]


@pytest.mark.parametrize("mode, error", [("503", StorageError), ("reset", StorageUnreachable)])
def test_s3_retries_are_bounded(flaky, mode, error):
    proxy, store = flaky
    proxy.fail_next(100, mode)
    with pytest.raises(error, match="k") as info:
        store.read_bytes("k")
    assert proxy.log == [("GET", mode)] * MAX_ATTEMPTS
    if mode == "reset":
        assert proxy.endpoint in str(info.value)


def test_s3_storage_keys_live_under_the_prefix(s3_env, s3_server):
    import boto3

    open_storage(s3_env).child("a").write_bytes("b", b"x")
    bucket, prefix = s3_env.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"{prefix}/a/b"]
    assert isinstance(open_storage(f"s3://{bucket}"), S3Storage)
    assert open_storage(f"s3://{bucket}").list() == [f"{prefix}/a/b"]


def test_local_files_are_readable_by_others(local_storage):
    local_storage.write_bytes("k", b"x")
    assert (local_storage.root / "k").stat().st_mode & 0o777 == 0o644


def test_s3_bucket_check_tolerates_prefix_scoped_credentials(flaky):
    proxy, store = flaky
    proxy.fail_next(1, "403")  # what S3 answers HeadBucket when the policy only grants a prefix
    fresh = open_storage(store.uri)
    fresh.write_bytes("k", b"x")
    assert proxy.log == [("HEAD", "403"), ("PUT", "forwarded")]
    proxy.fail_next(1, "403")
    with pytest.raises(StorageError, match="AccessDenied"):
        fresh.read_bytes("k")
