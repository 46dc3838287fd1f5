"""The ``ObjectStore`` port, its local-directory adapter, and the factory every service uses.

Every durable record of HuViDPO (datasets, checkpoints, fine-tune records, rollouts) lives behind
this port. Two adapters implement it with the same observable behaviour:

- ``LocalStore`` (here): the embedded default, files under a root directory.
- ``MinioStore`` (``services.common.store_minio``): any S3 endpoint through the official ``minio`` SDK.

Guarantees shared by both (tested by the same suite, ``tests/*/test_store*.py``):

- Writes are atomic: a reader sees the old object, the new object or nothing, never half of one. A
  stream that fails (or ends early) leaves no object behind.
- Every write computes the sha256 of the bytes while they stream and stores it with the object;
  ``get_file`` verifies it before the file appears at its destination (``ChecksumMismatch``).
- Memory stays bounded whatever the object size (chunked reads, multipart uploads on S3).
- Keys are validated (``InvalidKey``): no leading ``/``, no empty, ``.`` or ``..`` segment, no control
  characters or backslashes, at most 1024 UTF-8 bytes, and the first segment must not start with
  ``.huvidpo-`` (reserved for the adapters' own bookkeeping).
- Conditional writes (compare-and-swap, for records several processes update: rollouts):
  ``put_bytes``/``put_json`` with ``if_match=etag`` write only if the stored object still has that
  etag, with ``if_none_match=True`` only if the key does not exist; otherwise they raise
  ``PreconditionFailed`` and leave the stored object unchanged. ``get_bytes_with_etag`` /
  ``get_json_with_etag`` return the etag of the very bytes they read, so read-check-write is
  ``read + etag -> check -> put(if_match=etag)``. The etag is opaque: on S3 the server's ETag (the
  MD5 of a single PUT, so it changes whenever the bytes change), on ``LocalStore`` a random tag that
  changes on every write. Conditional writes are single requests: meant for small objects.
- Errors are few and meaningful: ``ObjectNotFound``; ``StoreUnavailable`` (retryable: connection
  refused, timeouts, 5xx); ``StoreAccessDenied`` (bad credentials or signature, not retryable);
  ``ChecksumMismatch``; ``InvalidKey``; ``PresignedUrlInvalid``; ``PreconditionFailed``.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import hmac
import io
import json
import os
import secrets
import tempfile
import time
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    from services.common.settings import StoreSettings

CHUNK_SIZE = 1024 * 1024
"""Bytes read or written per step when streaming (1 MiB)."""

MAX_PRESIGN_EXPIRY = timedelta(days=7)
"""Longest lifetime of a presigned URL (the S3 SigV4 limit, applied to every adapter)."""

RESERVED_PREFIX = ".huvidpo-"
"""First-segment prefix reserved for adapter bookkeeping (temp files, sidecars, keys)."""

SHA256_METADATA_KEY = "sha256"
"""User-metadata name of the content digest (``x-amz-meta-sha256`` on S3)."""


# --------------------------------------------------------------------------------------------- errors
class StoreError(Exception):
    """Base class of every object-store error."""


class ObjectNotFound(StoreError):
    """The key does not exist (or its bucket does not)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object not found: {key}")
        self.key = key


class StoreUnavailable(StoreError):
    """The store could not be reached or failed on its side (connection, timeout, 5xx). Retryable."""

    retryable = True


class StoreAccessDenied(StoreError):
    """The store refused the credentials or the request signature. Not retryable."""


class ChecksumMismatch(StoreError):
    """Bytes read do not match the sha256 recorded for them."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch for {key}: expected {expected}, got {actual}")
        self.key = key
        self.expected = expected
        self.actual = actual


class InvalidKey(StoreError, ValueError):
    """The key (or prefix) is not acceptable; the message says why."""


class IncompleteStream(StoreError, ValueError):
    """A stream ended before the announced length, or ran past it. No object was written."""


class PresignedUrlInvalid(StoreError):
    """A presigned request carries a bad signature or has expired."""


class PreconditionFailed(StoreError):
    """A conditional write was refused: the object's etag is not ``if_match`` (or the object is gone),
    or ``if_none_match`` and the object exists. Nothing was written; re-read and decide again."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"conditional write of {key} refused: {detail}")
        self.key = key


# ---------------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows about one object.

    ``size`` in bytes; ``sha256`` is the hex digest recorded at write time (None when the object was
    written by something else); ``modified`` is timezone-aware UTC. ``etag`` is an opaque version
    tag of the stored bytes, the value conditional writes compare (``put_bytes(if_match=...)``).
    """

    key: str
    size: int
    etag: str | None = None
    sha256: str | None = None
    content_type: str | None = None
    modified: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class ObjectReader:
    """A streaming read of one object: file-like ``read(n)``, iteration by chunks, a context manager.

    Always close it (or use ``with``): on S3 it holds an HTTP connection.
    """

    def __init__(self, info: ObjectInfo, read: Callable[[int], bytes], close: Callable[[], None]) -> None:
        self.info = info
        self._read = read
        self._close = close
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all the rest when ``n < 0``); ``b""`` at the end."""
        if n is None or n < 0:
            parts = []
            while chunk := self._read(CHUNK_SIZE):
                parts.append(chunk)
            return b"".join(parts)
        return self._read(n)

    def readable(self) -> bool:
        return True

    def iter_chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the object in chunks of at most ``chunk_size`` bytes, then close."""
        try:
            while chunk := self._read(chunk_size):
                yield chunk
        finally:
            self.close()

    def __iter__(self) -> Iterator[bytes]:
        return self.iter_chunks()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HashingReader:
    """Wraps a stream: counts and sha256-hashes every byte read, and fills each ``read(n)`` fully.

    Filling reads matters for the minio SDK, which concatenates short reads into a part (quadratic
    copying when a web framework hands over 64 KiB at a time).
    """

    def __init__(self, stream: BinaryIO, length: int | None = None) -> None:
        self._stream = stream
        self._length = length
        self.hasher = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        got = 0
        while n is None or n < 0 or got < n:
            chunk = self._stream.read(8 * CHUNK_SIZE if n is None or n < 0 else n - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)  # no copy in the common case
        self.size += len(data)
        self.hasher.update(data)
        if self._length is not None and self.size > self._length:
            raise IncompleteStream(f"stream is longer than the announced {self._length} bytes")
        return bytes(data)

    def check_complete(self) -> None:
        """Raise ``IncompleteStream`` if an announced length was not reached."""
        if self._length is not None and self.size != self._length:
            raise IncompleteStream(f"stream ended after {self.size} bytes, expected {self._length}")

    @property
    def sha256(self) -> str:
        return self.hasher.hexdigest()


# ------------------------------------------------------------------------------------- key validation
def _check_segments(text: str, what: str, segments: list[str]) -> None:
    if len(text.encode("utf-8")) > 1024:
        raise InvalidKey(f"{what} is longer than 1024 UTF-8 bytes")
    if text.startswith("/"):
        raise InvalidKey(f"{what} must not start with '/': {text!r}")
    if "\\" in text:
        raise InvalidKey(f"{what} must not contain a backslash: {text!r}")
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise InvalidKey(f"{what} must not contain control characters: {text!r}")
    for seg in segments:
        if seg == "":
            raise InvalidKey(f"{what} must not contain an empty segment ('//'): {text!r}")
        if seg in (".", ".."):
            raise InvalidKey(f"{what} must not contain a '.' or '..' segment: {text!r}")
    if segments and segments[0].startswith(RESERVED_PREFIX):
        raise InvalidKey(f"{what} must not start with the reserved {RESERVED_PREFIX!r}: {text!r}")


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a valid object key, else raise ``InvalidKey`` saying why."""
    if not isinstance(key, str) or not key:
        raise InvalidKey("key must be a non-empty string")
    if key.endswith("/"):
        raise InvalidKey(f"key must not end with '/': {key!r}")
    _check_segments(key, "key", key.split("/"))
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if valid: ``""`` (everything) or a key-like string, optionally ending in '/'."""
    if not isinstance(prefix, str):
        raise InvalidKey("prefix must be a string")
    if prefix == "":
        return prefix
    body = prefix[:-1] if prefix.endswith("/") else prefix
    if body == "":
        raise InvalidKey("prefix must not be '/'")
    _check_segments(prefix, "prefix", body.split("/"))
    return prefix


def validate_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """User metadata as stored: names lowercased (ASCII letters, digits, '-'), printable ASCII values.

    The name ``sha256`` is reserved for the digest the store records itself.
    """
    meta = {}
    for name, value in (metadata or {}).items():
        low = str(name).lower()
        if not low or any(not (c.isascii() and (c.isalnum() or c == "-")) for c in low):
            raise ValueError(f"metadata names must be ASCII letters, digits or '-': {name!r}")
        if low == SHA256_METADATA_KEY:
            raise ValueError(f"metadata name {name!r} is reserved for the content digest")
        if not isinstance(value, str) or any(not c.isascii() or not c.isprintable() for c in value):
            raise ValueError(f"metadata values must be printable ASCII strings: {name}={value!r}")
        meta[low] = value
    return meta


def join_key(prefix: str, rel: str) -> str:
    """``prefix`` and a relative key joined by exactly one '/' (validated)."""
    prefix = validate_prefix(prefix)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return validate_key(prefix + rel)


def check_conditions(if_match: str | None, if_none_match: bool) -> None:
    """Refuse a meaningless condition: an empty ``if_match``, or both conditions at once."""
    if if_match is not None and (not isinstance(if_match, str) or not if_match.strip('"')):
        raise ValueError(f"if_match must be a non-empty etag string, got {if_match!r}")
    if if_match is not None and if_none_match:
        raise ValueError("give if_match or if_none_match, not both")


def check_expiry(expires: timedelta) -> timedelta:
    if not isinstance(expires, timedelta) or expires <= timedelta(0) or expires > MAX_PRESIGN_EXPIRY:
        raise ValueError(f"expires must be a timedelta in (0, {MAX_PRESIGN_EXPIRY}], got {expires!r}")
    return expires


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


# ----------------------------------------------------------------------------------------------- port
class ObjectStore(ABC):
    """The port. Adapters implement the abstract primitives; the helpers below are shared.

    All keys are validated with ``validate_key`` and prefixes with ``validate_prefix``.
    """

    # --- primitives every adapter implements
    @abstractmethod
    def put_stream(
        self,
        key: str,
        stream: BinaryIO,
        length: int | None = None,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        """Write ``stream`` (read until EOF, or exactly ``length`` bytes) as ``key``, atomically.

        Memory bounded (multipart for large objects on S3). Computes the sha256 while streaming,
        stores it with the object and returns it in ``ObjectInfo.sha256``. If the stream raises, or
        ``length`` is given and the stream is shorter or longer, no object is written.
        """

    @abstractmethod
    def open_read(self, key: str) -> ObjectReader:
        """A streaming reader of the object (``ObjectNotFound`` if absent). Close it after use."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """What is known about ``key``, or None if it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "", recursive: bool = True) -> builtins.list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key.

        Non-recursive: only objects directly under ``prefix`` (no further '/' after it); use
        ``list_dirs`` for the sub-"directories".
        """

    @abstractmethod
    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """Immediate sub-prefixes of ``prefix`` that hold objects, each ending in '/', sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``. Deleting a missing key is not an error (as on S3)."""

    @abstractmethod
    def presigned_get_url(self, key: str, expires: timedelta, base_url: str | None = None) -> str:
        """A URL that lets anyone holding it GET the object until ``expires`` from now (max 7 days).

        ``base_url``: the address the caller reached the control plane at, for stores whose URLs
        point at the control plane (LocalStore) and have no public base URL configured; S3 ignores it."""

    @abstractmethod
    def presigned_put_url(self, key: str, expires: timedelta, base_url: str | None = None) -> str:
        """A URL that lets anyone holding it PUT the object until ``expires`` from now (max 7 days);
        ``base_url`` as for ``presigned_get_url``."""

    @abstractmethod
    def check(self) -> None:
        """Raise ``StoreUnavailable``/``StoreAccessDenied`` if the store cannot serve (readiness)."""

    # --- shared helpers (adapters may override for speed)
    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        """Write ``data`` as ``key`` atomically; returns its ``ObjectInfo`` with sha256 and etag.

        Conditional (compare-and-swap) when asked: with ``if_match`` the write happens only if the
        stored object's etag is ``if_match``, with ``if_none_match`` only if ``key`` does not exist;
        otherwise ``PreconditionFailed`` is raised and the stored object is left as it was. The test
        and the write are one atomic step against every other writer of the key. Adapters implement
        the conditions (this base version only writes unconditionally).
        """
        check_conditions(if_match, if_none_match)
        if if_match is None and not if_none_match:  # through put_stream, which subclasses may wrap
            return self.put_stream(key, io.BytesIO(data), len(data), content_type, metadata)
        return self._put_conditional(key, data, content_type, metadata, if_match, if_none_match)

    def _put_conditional(
        self,
        key: str,
        data: bytes,
        content_type: str | None,
        metadata: dict[str, str] | None,
        if_match: str | None,
        if_none_match: bool,
    ) -> ObjectInfo:
        """``put_bytes`` with exactly one condition set (already checked by ``check_conditions``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement conditional writes")

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        """Upload the file at ``path`` as ``key`` (streamed, atomic)."""
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            return self.put_stream(key, fh, size, content_type, metadata)  # type: ignore[arg-type]

    def get_bytes(self, key: str) -> bytes:
        """The whole object in memory (for small objects: records, manifests). Verifies sha256."""
        return self._read_verified(key)[0]

    def get_file(
        self, key: str, path: str | os.PathLike[str], expected_sha256: str | None = None
    ) -> ObjectInfo:
        """Download ``key`` to ``path`` atomically (temp file in the same directory, then rename).

        Verifies the sha256 recorded with the object and ``expected_sha256`` if given; on a mismatch
        raises ``ChecksumMismatch`` and leaves ``path`` untouched. Returns the object's info with the
        sha256 actually read.
        """
        dest = Path(path)
        reader = self.open_read(key)  # first, so a missing object creates nothing locally
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        except BaseException:
            reader.close()
            raise
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out, reader:
                info = reader.info
                while chunk := reader.read(CHUNK_SIZE):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            actual = h.hexdigest()
            for expected in (info.sha256, expected_sha256):
                if expected is not None and expected != actual:
                    raise ChecksumMismatch(key, expected, actual)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return ObjectInfo(
            key=key,
            size=size,
            etag=info.etag,
            sha256=actual,
            content_type=info.content_type,
            modified=info.modified,
            metadata=info.metadata,
        )

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (``""`` is refused: too easy to wipe a store)."""
        if validate_prefix(prefix) == "":
            raise InvalidKey("delete_prefix needs a non-empty prefix")
        objs = self.list(prefix, recursive=True)
        for obj in objs:
            self.delete(obj.key)
        return len(objs)

    def put_json(
        self, key: str, value: Any, *, if_match: str | None = None, if_none_match: bool = False
    ) -> ObjectInfo:
        """Write ``value`` as UTF-8 JSON (``application/json``); conditions as for ``put_bytes``."""
        data = json.dumps(value, indent=2, sort_keys=True, default=str).encode("utf-8")
        return self.put_bytes(
            key, data, content_type="application/json", if_match=if_match, if_none_match=if_none_match
        )

    def get_json(self, key: str) -> Any:
        """Read a JSON object written by ``put_json`` (``ObjectNotFound`` if absent)."""
        return json.loads(self.get_bytes(key))

    def get_bytes_with_etag(self, key: str) -> tuple[bytes, str | None]:
        """The whole object (sha256 verified) and the etag of exactly these bytes, for a later
        ``put_bytes(..., if_match=etag)``. The etag comes with the read, never from a separate
        ``stat`` (which could describe a newer version). ``ObjectNotFound`` if absent."""
        return self._read_verified(key)

    def _read_verified(self, key: str) -> tuple[bytes, str | None]:
        """(whole object, etag from the same read); raises ``ChecksumMismatch`` on a bad digest."""
        with self.open_read(key) as reader:
            data = reader.read()
        recorded = reader.info.sha256
        if recorded is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != recorded:
                raise ChecksumMismatch(key, recorded, actual)
        return data, reader.info.etag

    def get_json_with_etag(self, key: str) -> tuple[Any, str | None]:
        """``get_json`` plus the etag of the bytes read (see ``get_bytes_with_etag``)."""
        data, etag = self.get_bytes_with_etag(key)
        return json.loads(data), etag

    def upload_dir(self, local_dir: str | os.PathLike[str], prefix: str) -> builtins.list[ObjectInfo]:
        """Upload every file under ``local_dir`` to ``prefix/relpath`` (sorted, symlinks followed)."""
        root = Path(local_dir)
        if not root.is_dir():
            raise NotADirectoryError(str(root))
        infos = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            infos.append(self.put_file(join_key(prefix, rel), path))
        return infos

    def download_prefix(self, prefix: str, local_dir: str | os.PathLike[str]) -> builtins.list[Path]:
        """Download every object under ``prefix`` into ``local_dir`` keeping relative paths (verified)."""
        prefix = validate_prefix(prefix)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        root = Path(local_dir)
        paths = []
        for obj in self.list(prefix, recursive=True):
            rel = obj.key[len(prefix) :]
            dest = root.joinpath(*rel.split("/"))
            self.get_file(obj.key, dest)
            paths.append(dest)
        return paths


# ------------------------------------------------------------------------------------- local adapter
_TMP_DIR = RESERVED_PREFIX + "tmp"
_META_DIR = RESERVED_PREFIX + "meta"
_LOCK_DIR = RESERVED_PREFIX + "locks"
_LOCK_STRIPES = 256
_PRESIGN_KEY_FILE = RESERVED_PREFIX + "presign.key"
# Where LocalStore URLs point when neither a public base URL nor the caller's address is known (a
# process other than the control plane, e.g. the inference service, on the default port).
DEFAULT_PUBLIC_BASE_URL = "http://127.0.0.1:8080"


class LocalStore(ObjectStore):
    """Objects as files under ``root``; the embedded default.

    Layout: the object ``a/b/c`` is the file ``root/a/b/c``, so an operator can browse the store.
    The sha256, content type and user metadata live in a JSON sidecar under
    ``root/.huvidpo-meta/<sha256(key)>.json`` that also records the data file's inode.
    Writes go to ``root/.huvidpo-tmp/`` first, are fsynced, then renamed into place (atomic on POSIX),
    so every write gives the key a new inode: a sidecar naming another inode is stale (a crash
    between the two renames) and is ignored, while bytes changed in place keep the inode and are
    caught by the digest (``ChecksumMismatch``).
    Limitation (unlike S3): a key cannot be both an object and a "directory" (``a`` and ``a/b``);
    such a write raises ``InvalidKey``.
    The etag is a random tag recorded in the sidecar by every write (so it changes even when the
    bytes do not); a file without a valid sidecar gets one derived from its inode, mtime and size.
    Conditional writes test the etag under the same per-key lock (``.huvidpo-locks``, flock) that
    orders the data and sidecar renames, so test-and-write is atomic across threads and processes.

    Presigned URLs: a ``file://`` URL is useless to an HTTP client, so LocalStore signs
    ``METHOD\\nkey\\nexpires`` with HMAC-SHA256 and returns
    ``{public_base_url}/v1/objects/{key}?expires=<unix seconds>&signature=<hex>``. The control plane
    serves that route (GET and PUT) and calls ``verify_presigned`` first. With no ``public_base_url``
    configured, the URL names the ``base_url`` the caller passes (the control plane passes the
    address its client used), else ``DEFAULT_PUBLIC_BASE_URL``. The HMAC key comes from
    ``presign_secret``; when empty, a random key is created once in ``root/.huvidpo-presign.key``
    (mode 0600) so every process sharing the root agrees on it.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        public_base_url: str = "",
        presign_secret: str | bytes | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / _TMP_DIR).mkdir(exist_ok=True)
        (self.root / _META_DIR).mkdir(exist_ok=True)
        (self.root / _LOCK_DIR).mkdir(exist_ok=True)
        self.public_base_url = public_base_url.rstrip("/")
        if presign_secret:
            self._secret = presign_secret.encode() if isinstance(presign_secret, str) else presign_secret
        else:
            self._secret = self._load_or_create_secret()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # --- paths
    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _meta_path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.root / _META_DIR / digest[:2] / f"{digest}.json"

    def _load_or_create_secret(self) -> bytes:
        path = self.root / _PRESIGN_KEY_FILE
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        fd, tmp = tempfile.mkstemp(dir=self.root / _TMP_DIR)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.close(fd)
            os.chmod(tmp, 0o600)
            # link() fails if another process won the race; then everyone uses the winner's key.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
        return path.read_bytes()

    # --- metadata
    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        """Exclusive lock (threads and processes sharing the root) over a key's data and sidecar, so
        that the last writer of the bytes is also the last writer of the digest. Keys share one of
        ``_LOCK_STRIPES`` lock files."""
        stripe = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % _LOCK_STRIPES
        fd = os.open(self.root / _LOCK_DIR / f"{stripe:03d}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_meta(self, key: str, ino: int, size: int, info: dict[str, Any]) -> None:
        """Write the sidecar of the data file with inode ``ino`` (taken from the written temp file,
        not from the path, which a concurrent writer may already have replaced)."""
        record = {**info, "key": key, "ino": ino, "size": size}
        meta_path = self._meta_path(key)
        meta_path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / _TMP_DIR, suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
            os.replace(tmp, meta_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        meta: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            meta = json.loads(self._meta_path(key).read_text())
        if meta.get("ino") != st.st_ino:
            meta = {}  # stale sidecar (crash between renames) or none: report no digest
        etag = meta.get("etag") or meta.get("sha256")  # sidecars from before etags: the digest
        if not etag:  # no valid sidecar: a tag that still changes whenever the file is replaced
            etag = f"st-{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"
        return ObjectInfo(
            key=key,
            size=st.st_size,
            etag=etag,
            sha256=meta.get("sha256"),
            content_type=meta.get("content_type"),
            modified=datetime.fromtimestamp(st.st_mtime, tz=UTC),
            metadata=dict(meta.get("metadata") or {}),
        )

    # --- primitives
    def put_stream(
        self,
        key: str,
        stream: BinaryIO,
        length: int | None = None,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        return self._put(key, stream, length, content_type, metadata, None, False)

    def _put_conditional(
        self,
        key: str,
        data: bytes,
        content_type: str | None,
        metadata: dict[str, str] | None,
        if_match: str | None,
        if_none_match: bool,
    ) -> ObjectInfo:
        return self._put(key, io.BytesIO(data), len(data), content_type, metadata, if_match, if_none_match)

    def _check_condition(self, key: str, dest: Path, if_match: str | None, if_none_match: bool) -> None:
        """Raise ``PreconditionFailed`` unless ``key``'s current state meets the condition. Call with
        the key lock held."""
        if if_match is None and not if_none_match:
            return
        try:
            st = dest.stat()
        except (FileNotFoundError, NotADirectoryError):
            st = None
        current = self._info(key, st).etag if st is not None and dest.is_file() else None
        if if_none_match and current is not None:
            raise PreconditionFailed(key, "if_none_match: the object exists")
        if if_match is not None and current != if_match.strip('"'):
            raise PreconditionFailed(
                key,
                f"if_match {if_match!r}: the object " + (f"has etag {current!r}" if current else "is gone"),
            )

    def _put(
        self,
        key: str,
        stream: BinaryIO,
        length: int | None,
        content_type: str | None,
        metadata: dict[str, str] | None,
        if_match: str | None,
        if_none_match: bool,
    ) -> ObjectInfo:
        dest = self._path(key)
        user_meta = validate_metadata(metadata)
        reader = HashingReader(stream, length)
        fd, tmp = tempfile.mkstemp(dir=self.root / _TMP_DIR)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := reader.read(CHUNK_SIZE):
                    out.write(chunk)
                reader.check_complete()
                out.flush()
                os.fsync(out.fileno())
                written = os.fstat(out.fileno())  # rename keeps the inode
            etag = secrets.token_hex(16)
            meta = {
                "sha256": reader.sha256,
                "etag": etag,
                "content_type": content_type or "application/octet-stream",
                "metadata": user_meta,
            }
            with self._key_lock(key):
                self._check_condition(key, dest, if_match, if_none_match)
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, dest)
                except (NotADirectoryError, FileExistsError, IsADirectoryError) as exc:
                    raise InvalidKey(f"key {key!r} conflicts with an existing object or prefix") from exc
                self._write_meta(key, written.st_ino, written.st_size, meta)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # What this call wrote (a concurrent writer may already have replaced it, as with S3).
        return ObjectInfo(
            key=key,
            size=written.st_size,
            etag=etag,
            sha256=reader.sha256,
            content_type=content_type or "application/octet-stream",
            modified=datetime.fromtimestamp(written.st_mtime, tz=UTC),
            metadata=dict(user_meta),
        )

    def get_bytes_with_etag(self, key: str) -> tuple[bytes, str | None]:
        # Under the key lock: the bytes and the sidecar's etag are then of the same write (without
        # it, a read between a writer's two renames would get a stand-in etag and a needless
        # PreconditionFailed later).
        validate_key(key)
        with self._key_lock(key):
            return self._read_verified(key)

    def open_read(self, key: str) -> ObjectReader:
        path = self._path(key)
        try:
            fh = open(path, "rb")  # noqa: SIM115 (closed by the reader)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFound(key) from exc
        st = os.fstat(fh.fileno())
        return ObjectReader(self._info(key, st), fh.read, fh.close)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not os.path.isfile(self._path(key)):
            return None
        return self._info(key, st)

    def _walk(self, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        """(key, stat) of every object whose key starts with ``prefix``."""
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*base_rel.split("/")) if base_rel else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            if rel_dir == "":
                dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
                filenames = [f for f in filenames if not f.startswith(RESERVED_PREFIX)]
            # prune directories that cannot hold a matching key
            dirnames[:] = [
                d
                for d in dirnames
                if (rel_dir + d + "/").startswith(prefix) or prefix.startswith(rel_dir + d + "/")
            ]
            for name in filenames:
                key = rel_dir + name
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        yield key, os.stat(os.path.join(dirpath, name))

    def list(self, prefix: str = "", recursive: bool = True) -> builtins.list[ObjectInfo]:
        prefix = validate_prefix(prefix)
        out = []
        for key, st in self._walk(prefix):
            if not recursive and "/" in key[len(prefix) :]:
                continue
            out.append(self._info(key, st))
        return sorted(out, key=lambda o: o.key)

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        prefix = validate_prefix(prefix)
        dirs = set()
        for key, _ in self._walk(prefix):
            rest = key[len(prefix) :]
            if "/" in rest:
                dirs.add(prefix + rest.split("/", 1)[0] + "/")
        return sorted(dirs)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._key_lock(key):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                path.unlink()
            with contextlib.suppress(FileNotFoundError):
                self._meta_path(key).unlink()
        # prune now-empty parent directories (S3 has no directories to leave behind)
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def check(self) -> None:
        probe = self.root / _TMP_DIR
        if not os.access(probe, os.W_OK):
            raise StoreUnavailable(f"local store root {self.root} is not writable")

    # --- presigned URLs
    def _signature(self, method: str, key: str, expires: int) -> str:
        msg = f"{method.upper()}\n{key}\n{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def _presign(self, method: str, key: str, expires: timedelta, base_url: str | None) -> str:
        validate_key(key)
        deadline = int(time.time() + check_expiry(expires).total_seconds())
        query = urlencode({"expires": deadline, "signature": self._signature(method, key, deadline)})
        base = self.public_base_url or (base_url or DEFAULT_PUBLIC_BASE_URL).rstrip("/")
        return f"{base}/v1/objects/{quote(key, safe='/')}?{query}"

    def presigned_get_url(self, key: str, expires: timedelta, base_url: str | None = None) -> str:
        return self._presign("GET", key, expires, base_url)

    def presigned_put_url(self, key: str, expires: timedelta, base_url: str | None = None) -> str:
        return self._presign("PUT", key, expires, base_url)

    def verify_presigned(
        self, key: str, expires: int | str, signature: str, method: str = "GET", now: float | None = None
    ) -> None:
        """Check a presigned request for ``key`` (the URL-decoded path after ``/v1/objects/``).

        Raises ``PresignedUrlInvalid`` if the signature does not match ``method``, ``key`` and
        ``expires`` or if the URL has expired; ``InvalidKey`` for a bad key. Constant-time compare.
        """
        validate_key(key)
        try:
            deadline = int(expires)
        except (TypeError, ValueError) as exc:
            raise PresignedUrlInvalid("expires must be an integer (unix seconds)") from exc
        expected = self._signature(method, key, deadline)
        if not hmac.compare_digest(expected, str(signature)):
            raise PresignedUrlInvalid("signature does not match")
        if (time.time() if now is None else now) > deadline:
            raise PresignedUrlInvalid("presigned URL has expired")


# ------------------------------------------------------------------------------------------- factory
def make_store(settings: StoreSettings) -> ObjectStore:
    """Build the adapter ``settings.backend`` names (``local`` or ``s3``). Does no network I/O."""
    if settings.backend == "local":
        return LocalStore(
            settings.root,
            public_base_url=settings.public_base_url,
            presign_secret=settings.presign_secret.get_secret_value() or None,
        )
    if settings.backend == "s3":
        from services.common.store_minio import MinioStore

        return MinioStore(
            endpoint=settings.endpoint,
            access_key=settings.access_key.get_secret_value(),
            secret_key=settings.secret_key.get_secret_value(),
            bucket=settings.bucket,
            secure=settings.secure,
            region=settings.region,
            create_bucket=settings.create_bucket,
            part_size=settings.part_size,
            timeout=settings.timeout_seconds,
            public_endpoint=settings.public_endpoint or None,
        )
    raise ValueError(f"unknown store backend {settings.backend!r}")
