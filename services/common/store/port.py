"""The ``ObjectStore`` port: the contract every adapter keeps, and the helpers built on it.

Every durable record of HuViDPO (datasets, checkpoints, fine-tune records, rollouts) lives behind
this port. Two adapters implement it with the same observable behaviour:

- ``LocalStore`` (``services.common.store.local``): the embedded default, files under a root directory.
- ``MinioStore`` (``services.common.store.s3``): any S3 endpoint through the official ``minio`` SDK.

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
import hashlib
import io
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from services.common.store.errors import ChecksumMismatch, InvalidKey
from services.common.store.helpers import CHUNK_SIZE, check_conditions, join_key, validate_prefix


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
