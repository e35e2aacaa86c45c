"""
Object storage: one small interface over a local folder and an S3 prefix.

Notable:
- Keys are "/"-separated and relative to the storage root. They are validated the same way on both
  backends (no absolute paths, no "", "." or ".." segments), so code written against a local folder
  runs unchanged on S3 and cannot escape its root.
- Writes are atomic. Local: a temp file in the same folder, fsync, os.replace. S3: one PUT, or one
  multipart upload, which only becomes visible when it completes. Readers see the old or the new
  object, never a partial one.
- list() has S3 semantics on both backends: a plain string prefix, recursive, files only, sorted.
- S3 fails fast and says what failed: short timeouts, a few retries with backoff for transient errors
  (throttling, 5xx, dropped connections), StorageUnreachable naming the endpoint, BucketNotFound
  naming the bucket (checked once per bucket, on first use).
- boto3 and pyarrow are imported lazily, so local-only use does not pay for them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar
from urllib.parse import urlsplit

from services.settings import S3Settings, default_storage_uri, s3_settings

if TYPE_CHECKING:
    import pyarrow.fs

logger = logging.getLogger(__name__)

# S3 client behaviour. An unreachable endpoint costs at most MAX_ATTEMPTS connect timeouts plus a
# sub-second backoff (< 10 s); a healthy endpoint never comes near these numbers.
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 10.0  # per socket read, not per object: big downloads stream in many reads
MAX_ATTEMPTS = 3  # first try + 2 retries, botocore "standard" mode (jittered exponential backoff)

_TMP_MARK = ".nanochat-tmp-"  # local temp files carry this; list() hides any left by a killed writer
_COPY_CHUNK = 8 << 20

T = TypeVar("T")


class StorageError(Exception):
    """Base class; every message names the URI or key and the cause."""


class StorageURIError(StorageError):
    """A storage URI of no form open_storage() knows: bad usage, not a failing store."""


class StorageUnreachable(StorageError):
    """The S3 endpoint cannot be reached (refused, timed out, connection dropped)."""


class BucketNotFound(StorageError):
    pass


class KeyNotFound(StorageError, FileNotFoundError):
    pass


class InvalidKey(StorageError, ValueError):
    pass


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"invalid key {key!r}: must be a non-empty string")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidKey(f"invalid key {key!r}: must be relative and '/'-separated")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(f"invalid key {key!r}: empty, '.' and '..' segments are not allowed")
    return key


def _check_prefix(prefix: str) -> str:
    """A prefix may be empty, end with '/', or end mid-name ('step_'); otherwise it obeys key rules."""
    if prefix:
        _check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


class Storage(ABC):
    uri: str

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The object's content; KeyNotFound (a FileNotFoundError) if there is none."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically create or replace the object."""

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with prefix (a string prefix, not a folder), recursive, files only."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing one is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object whose key starts with prefix."""

    @abstractmethod
    def upload_file(self, local_path: str | os.PathLike, key: str) -> None:
        """Stream a local file into the object (atomically, like write_bytes)."""

    @abstractmethod
    def download_file(self, key: str, local_path: str | os.PathLike) -> None:
        """Stream the object into a local file, creating its folder; KeyNotFound if missing."""

    @abstractmethod
    def child(self, prefix: str) -> Storage:
        """A Storage rooted at root/prefix."""

    @abstractmethod
    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """(filesystem, base path) for pyarrow datasets and Ray Train's RunConfig; join keys with '/'.

        pyarrow's LocalFileSystem does not create folders when opening a file for writing: use
        pyarrow.dataset.write_dataset, or fs.create_dir(folder, recursive=True) first (harmless on S3).
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


# -----------------------------------------------------------------------------
# local folder


def _atomic_write(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Write through fill() into a temp file beside path, then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP_MARK}")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the object from other users of a shared volume
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # make the rename itself survive a crash
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _missing(self, key: str, cause: OSError) -> KeyNotFound:
        return KeyNotFound(f"{self.uri}: no such key {key!r} ({cause.strerror})")

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise self._missing(key, e) from e

    def write_bytes(self, key: str, data: bytes) -> None:
        logger.debug("write %s/%s (%d bytes)", self.uri, key, len(data))
        _atomic_write(self._path(key), lambda f: f.write(data))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _walk(self, prefix: str, topdown: bool = True):
        # start at the deepest folder the prefix names in full ("runs/a/step_" -> runs/a)
        start = self.root / prefix.rpartition("/")[0]
        for dirpath, _, files in os.walk(start, topdown=topdown):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            yield ("" if rel == "." else rel + "/"), files

    def list(self, prefix: str = "") -> list[str]:
        prefix = _check_prefix(prefix)
        keys = []
        for folder, files in self._walk(prefix):
            keys += [folder + name for name in files if _TMP_MARK not in name]
        return sorted(k for k in keys if k.startswith(prefix))

    def delete(self, key: str) -> None:
        logger.debug("delete %s/%s", self.uri, key)
        with contextlib.suppress(IsADirectoryError):  # a folder is a prefix, not an object (as on S3)
            self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        prefix = _check_prefix(prefix)
        keys = self.list(prefix)
        logger.debug("delete %d objects under %s/%s", len(keys), self.uri, prefix)
        for key in keys:
            (self.root / key).unlink(missing_ok=True)
        # S3 has no empty folders; remove the ones we emptied so both backends look alike
        for folder, _ in self._walk(prefix, topdown=False):
            if folder and folder.startswith(prefix):
                with contextlib.suppress(OSError):  # not empty: holds objects outside the prefix
                    (self.root / folder).rmdir()

    def upload_file(self, local_path: str | os.PathLike, key: str) -> None:
        dest = self._path(key)
        with open(local_path, "rb") as src:
            _atomic_write(dest, lambda f: shutil.copyfileobj(src, f, _COPY_CHUNK))

    def download_file(self, key: str, local_path: str | os.PathLike) -> None:
        try:
            src = open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise self._missing(key, e) from e
        with src:
            _atomic_write(Path(local_path), lambda f: shutil.copyfileobj(src, f, _COPY_CHUNK))

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self._path(prefix.rstrip("/")))

    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs

        return pyarrow.fs.LocalFileSystem(), self.root.as_posix()


# -----------------------------------------------------------------------------
# S3


_session = None  # one boto3 session: a client from a warm session is made far faster than from a new one
_session_lock = threading.Lock()  # boto3 sessions are not thread-safe


def _s3_client(settings: S3Settings):
    global _session
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        # custom endpoints (MinIO, moto, Ceph) rarely serve virtual-host buckets
        s3={"addressing_style": "path"} if settings.endpoint_url else None,
    )
    with _session_lock:
        _session = _session or boto3.session.Session()
        return _session.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            aws_session_token=settings.session_token,
            config=config,
        )


def _http_status(e: BaseException | None) -> int | None:
    from botocore.exceptions import ClientError

    return (
        e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(e, ClientError) else None
    )


class _Bucket:
    """One bucket's boto3 client, shared by an S3Storage and its children; checks the bucket once."""

    def __init__(self, name: str, settings: S3Settings):
        self.name = name
        self.settings = settings
        self.client = _s3_client(settings)
        self.endpoint = settings.endpoint_url or self.client.meta.endpoint_url
        self._checked = False
        self._lock = threading.Lock()

    def ensure_exists(self) -> None:
        if self._checked:
            return
        with self._lock:
            if not self._checked:
                try:
                    self.run(f"open s3://{self.name}", lambda: self.client.head_bucket(Bucket=self.name))
                except StorageError as e:
                    # credentials scoped to a prefix may not stat the bucket, and a 403 proves it exists
                    if _http_status(e.__cause__) != 403:
                        raise
                self._checked = True
                logger.info("using bucket s3://%s at %s", self.name, self.endpoint)

    def run(self, what: str, fn: Callable[[], T], key: str | None = None) -> T:
        """fn(), with boto errors turned into ours. key: a 404 means that key is missing (else: the bucket)."""
        try:
            return fn()
        except Exception as e:
            ours = self._translate(what, e, key)
            if ours is e:
                raise
            raise ours from e

    def _translate(self, what: str, e: Exception, key: str | None) -> Exception:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            NoCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        if isinstance(e, S3UploadFailedError) and isinstance(e.__context__, ClientError):
            e = e.__context__  # boto3 wraps the real error of an upload
        if isinstance(e, ClientError):
            code, status = e.response.get("Error", {}).get("Code", ""), _http_status(e)
            if code == "NoSuchBucket" or (key is None and status == 404):
                return BucketNotFound(f"{what}: bucket {self.name!r} does not exist at {self.endpoint}")
            if code in ("NoSuchKey", "NotFound", "404") or status == 404:
                return KeyNotFound(f"{what}: no such key {key!r}")
            return StorageError(f"{what}: {e}")
        if isinstance(e, BotoConnectionError | HTTPClientError):
            return StorageUnreachable(
                f"{what}: cannot reach S3 endpoint {self.endpoint} after {MAX_ATTEMPTS} attempts: {e}"
            )
        if isinstance(e, NoCredentialsError):
            return StorageError(
                f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(e, BotoCoreError):
            return StorageError(f"{what}: {e}")
        return e  # ours or a plain OSError from the local side of a transfer: already says what failed


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None):
        prefix = prefix.strip("/")
        if prefix:
            _check_key(prefix)
        self._bucket = _Bucket(bucket, settings or s3_settings())
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _run(self, what: str, fn: Callable[[], T], key: str | None = None) -> T:
        self._bucket.ensure_exists()
        return self._bucket.run(what, fn, key)

    def read_bytes(self, key: str) -> bytes:
        obj = self._key(_check_key(key))

        def get() -> bytes:
            body = self._bucket.client.get_object(Bucket=self._bucket.name, Key=obj)["Body"]
            with contextlib.closing(body):
                return body.read()

        return self._run(f"read {self.uri}/{key}", get, key)

    def write_bytes(self, key: str, data: bytes) -> None:
        obj = self._key(_check_key(key))
        logger.debug("write %s/%s (%d bytes)", self.uri, key, len(data))
        put = lambda: self._bucket.client.put_object(Bucket=self._bucket.name, Key=obj, Body=data)
        self._run(f"write {self.uri}/{key}", put, key)

    def exists(self, key: str) -> bool:
        obj = self._key(_check_key(key))
        try:
            head = lambda: self._bucket.client.head_object(Bucket=self._bucket.name, Key=obj)
            self._run(f"stat {self.uri}/{key}", head, key)
        except KeyNotFound:
            return False
        return True

    def _objects(self, prefix: str) -> list[str]:
        """Full object keys under root/prefix."""
        full = self._key(prefix)  # under root "p" this is "p/...": the root never matches "p2/..."

        def collect() -> list[str]:
            pages = self._bucket.client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket.name, Prefix=full
            )
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        return self._run(f"list {self.uri}/{prefix}", collect)

    def list(self, prefix: str = "") -> list[str]:
        prefix = _check_prefix(prefix)
        start = len(self.prefix) + 1 if self.prefix else 0
        # keys ending in "/" are folder markers written by some tools, not files
        return sorted(k[start:] for k in self._objects(prefix) if not k.endswith("/"))

    def delete(self, key: str) -> None:
        obj = self._key(_check_key(key))
        logger.debug("delete %s/%s", self.uri, key)
        rm = lambda: self._bucket.client.delete_object(Bucket=self._bucket.name, Key=obj)
        self._run(f"delete {self.uri}/{key}", rm, key)

    def delete_prefix(self, prefix: str) -> None:
        prefix = _check_prefix(prefix)
        objects = self._objects(prefix)
        logger.debug("delete %d objects under %s/%s", len(objects), self.uri, prefix)
        for i in range(0, len(objects), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": k} for k in objects[i : i + 1000]], "Quiet": True}
            rm = lambda batch=batch: self._bucket.client.delete_objects(
                Bucket=self._bucket.name, Delete=batch
            )
            errors = self._run(f"delete {self.uri}/{prefix}*", rm).get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"delete {self.uri}/{prefix}*: {len(errors)} objects not deleted, "
                    f"first {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )

    def upload_file(self, local_path: str | os.PathLike, key: str) -> None:
        obj = self._key(_check_key(key))
        logger.debug("upload %s -> %s/%s", local_path, self.uri, key)
        # boto3's managed transfer: multipart with parallel parts above 8 MiB, streamed from disk
        up = lambda: self._bucket.client.upload_file(os.fspath(local_path), self._bucket.name, obj)
        self._run(f"upload {local_path} to {self.uri}/{key}", up, key)

    def download_file(self, key: str, local_path: str | os.PathLike) -> None:
        obj = self._key(_check_key(key))
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        # boto3 writes to a temp file beside local_path and renames it when complete
        down = lambda: self._bucket.client.download_file(self._bucket.name, obj, os.fspath(local_path))
        self._run(f"download {self.uri}/{key}", down, key)

    def child(self, prefix: str) -> S3Storage:
        sub = copy.copy(self)  # shares the client and the bucket check
        sub.prefix = self._key(_check_key(prefix.rstrip("/")))
        sub.uri = f"s3://{self._bucket.name}/{sub.prefix}"
        return sub

    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs

        self._bucket.ensure_exists()  # a clear BucketNotFound beats an ArrowInvalid deep inside Ray
        s = self._bucket.settings
        kwargs: dict = dict(
            region=s.region,
            connect_timeout=CONNECT_TIMEOUT_S,
            request_timeout=READ_TIMEOUT_S,
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        )
        if s.access_key_id and s.secret_access_key:
            kwargs.update(
                access_key=s.access_key_id, secret_key=s.secret_access_key, session_token=s.session_token
            )
        if s.endpoint_url:
            endpoint = urlsplit(s.endpoint_url)
            kwargs.update(scheme=endpoint.scheme or "https", endpoint_override=endpoint.netloc)
        # with endpoint_override pyarrow (and Ray Train) want "bucket/prefix", not "s3://bucket/prefix"
        path = f"{self._bucket.name}/{self.prefix}" if self.prefix else self._bucket.name
        return pyarrow.fs.S3FileSystem(**kwargs), path


# -----------------------------------------------------------------------------


def open_storage(uri: str | None = None) -> Storage:
    """A local path, file://PATH or s3://BUCKET/PREFIX; None: $NANOCHAT_STORAGE or ~/.cache/nanochat."""
    uri = uri or default_storage_uri()
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return LocalStorage(uri)
    if scheme == "file":
        return LocalStorage(rest)
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StorageURIError(f"invalid storage URI {uri!r}: no bucket (use s3://BUCKET/PREFIX)")
        return S3Storage(bucket, prefix)
    raise StorageURIError(
        f"unsupported storage URI {uri!r}: use a local path, file://PATH or s3://BUCKET/PREFIX"
    )
