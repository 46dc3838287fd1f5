"""``LocalStore``: the ``ObjectStore`` port on a local directory, the embedded default."""

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
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode

from services.common.store.errors import (
    InvalidKey,
    ObjectNotFound,
    PreconditionFailed,
    PresignedUrlInvalid,
    StoreUnavailable,
)
from services.common.store.helpers import (
    CHUNK_SIZE,
    RESERVED_PREFIX,
    HashingReader,
    check_expiry,
    validate_key,
    validate_metadata,
    validate_prefix,
)
from services.common.store.port import ObjectInfo, ObjectReader, ObjectStore

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
    ``root/.huvidpo-meta/<2 hex>/<sha256(key)>.json`` (``sidecar_path``) that also records the data file's inode.
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

    def sidecar_path(self, key: str) -> Path:
        """Where ``key``'s JSON sidecar lives (digest, etag, content type, metadata, data inode); for
        operators and tests that inspect the layout the class docstring describes."""
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
        meta_path = self.sidecar_path(key)
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
            meta = json.loads(self.sidecar_path(key).read_text())
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
                self.sidecar_path(key).unlink()
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
