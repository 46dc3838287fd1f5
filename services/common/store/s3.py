"""``MinioStore``: the ``ObjectStore`` port on any S3 endpoint, through the official ``minio`` SDK.

Tested against Ceph radosgw (real SigV4, real multipart) and moto. How the port's guarantees map to S3:

- Atomic writes: S3 makes an object visible only when its PUT (or multipart completion) succeeds.
- sha256 in user metadata (``x-amz-meta-sha256``). S3 sends metadata *before* the bytes, so for a
  stream of unknown digest the adapter reads up to two parts first: a stream of one part is one PUT
  with its digest; a longer one is uploaded by multipart (its own part loop: each part is sent as
  read, without the SDK's re-slicing of streams of unknown length) to a temporary key
  (``.huvidpo-tmp/<uuid>``), then server-side copied to its key with the digest in its metadata and
  the temporary object deleted. The key therefore never holds an object without its digest, and a
  stream that fails or ends early leaves nothing at the key. (Radosgw shares the data between the
  copies, so the copy costs metadata only; on other servers it is a server-side copy.)
- ``put_file`` hashes the file first and uploads it once, with the digest, by multipart.
- Memory: at most ``(num_parallel_uploads + 2) * part_size`` bytes per upload; reads are chunked.
- Errors: connection failures, timeouts and 5xx become ``StoreUnavailable`` (after ``retries``
  retries for idempotent requests); bad credentials or signatures become ``StoreAccessDenied``.
- ``list`` returns size, etag and modified time only (S3 listings carry no user metadata): call
  ``stat`` for the sha256.
- Conditional writes (``put_bytes(if_match=..., if_none_match=...)``) are one PUT carrying
  ``If-Match: <etag>`` (unquoted: radosgw 16.2 compares the header byte for byte with its unquoted
  ETag and answers 412 to a quoted one) or ``If-None-Match: *``; the server tests and writes in one
  step. A refusal (412 ``PreconditionFailed``, 409 ``ConditionalRequestConflict``, or the 404 that
  AWS and moto answer to ``If-Match`` on a missing key) becomes ``PreconditionFailed``. The etag is
  the server's (the MD5 of the bytes for a single PUT): rewriting identical bytes keeps it. A PUT
  retried after a lost response may find its own first attempt and be refused: ``PreconditionFailed``
  means "re-read and decide", not "nothing of mine was written" (``write_rollout`` re-reads).
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import hashlib
import io
import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from email.utils import parsedate_to_datetime
from typing import Any, BinaryIO, NoReturn

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.datatypes import Part
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import DictType
from urllib3.util import Retry, Timeout

from services.common.store.errors import (
    ChecksumMismatch,
    ObjectNotFound,
    PreconditionFailed,
    StoreAccessDenied,
    StoreError,
    StoreUnavailable,
)
from services.common.store.helpers import (
    RESERVED_PREFIX,
    SHA256_METADATA_KEY,
    HashingReader,
    check_expiry,
    sha256_file,
    validate_key,
    validate_metadata,
    validate_prefix,
)
from services.common.store.port import ObjectInfo, ObjectReader, ObjectStore

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound", "NoSuchUpload"}
# The key itself was refused (authentication): wrong key, wrong secret, wrong region or clock.
_UNAUTHENTICATED = {
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "RequestTimeTooSkewed",
}
# The key was accepted but its policy does not allow the request (authorization).
_FORBIDDEN = "AccessDenied"
POLICY_HINT = "deploy/README.md, 'Store access per component'"
_PRECONDITION = {"PreconditionFailed", "ConditionalRequestConflict"}
_TRANSIENT = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "ServiceUnavailableError"}
_META_PREFIX = "x-amz-meta-"
_TMP_PREFIX = RESERVED_PREFIX + "tmp/"
_OCTET = "application/octet-stream"


def _user_metadata(headers: Any) -> dict[str, str]:
    """The ``x-amz-meta-*`` entries of a response's headers, prefix stripped, names lowercased."""
    out: dict[str, str] = {}
    for name, value in (headers or {}).items():
        low = str(name).lower()
        if low.startswith(_META_PREFIX):
            out[low[len(_META_PREFIX) :]] = str(value)
    return out


def _info_from(
    key: str, size: int, etag: str | None, content_type: str | None, modified: Any, meta: dict[str, str]
) -> ObjectInfo:
    meta = dict(meta)
    sha = meta.pop(SHA256_METADATA_KEY, None)
    return ObjectInfo(
        key=key,
        size=size,
        etag=etag.strip('"') if etag else None,
        sha256=sha,
        content_type=content_type,
        modified=modified,
        metadata=meta,
    )


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """``host:port`` and ``secure`` from ``host:port`` or an ``http(s)://host:port`` URL."""
    if endpoint.startswith(("http://", "https://")):
        secure = endpoint.startswith("https://")
        endpoint = endpoint.split("://", 1)[1]
    return endpoint.rstrip("/"), secure


class MinioStore(ObjectStore):
    """Objects in one S3 bucket through the ``minio`` SDK (MinIO, Ceph radosgw, AWS S3, moto).

    ``endpoint`` is ``host:port`` (an ``http://``/``https://`` prefix also sets ``secure``).
    ``create_bucket`` creates the bucket on the first write if missing. ``part_size`` (>= 5 MiB) is
    the multipart part size; ``timeout`` seconds per connect/read; ``retries`` for idempotent
    requests on connection errors and 5xx. ``public_endpoint`` (``host:port`` or a URL) is the
    address presigned URLs name, when clients reach the server elsewhere than this process does
    (in-cluster service vs ingress); it must route to the same server, and its scheme (``https://``)
    is the presigned URLs' scheme. ``ca_bundle`` (a PEM file) is the CA the server's certificate is
    verified against over https (default: the public roots of ``certifi``).
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str = "huvidpo",
        secure: bool = False,
        region: str = "us-east-1",
        *,
        create_bucket: bool = True,
        part_size: int = 8 * 1024 * 1024,
        timeout: float = 30.0,
        retries: int = 2,
        num_parallel_uploads: int = 3,
        public_endpoint: str | None = None,
        ca_bundle: str | None = None,
    ) -> None:
        endpoint, secure = _split_endpoint(endpoint, secure)
        if part_size < 5 * 1024 * 1024:
            raise ValueError("part_size must be at least 5 MiB (the S3 minimum)")
        self.endpoint = endpoint
        self.bucket = bucket
        self.part_size = part_size
        self.create_bucket = create_bucket
        self.num_parallel_uploads = num_parallel_uploads
        http = urllib3.PoolManager(
            timeout=Timeout(connect=min(timeout, 10.0), read=timeout),
            maxsize=max(10, num_parallel_uploads + 2),
            cert_reqs="CERT_REQUIRED",
            # a private CA (an in-cluster store with its own certificate) instead of the public roots
            ca_certs=ca_bundle or certifi.where(),
            retries=Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self.client = Minio(
            endpoint,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=secure,
            region=region,
            http_client=http,
        )
        # Presigned URLs are signed for the host a client will use (SigV4 signs the Host header). Signing
        # is offline when the region is known, so this second client never opens a connection.
        self._presigner = self.client
        if public_endpoint:
            pub, pub_secure = _split_endpoint(public_endpoint, secure)
            self._presigner = Minio(
                pub,
                access_key=access_key or None,
                secret_key=secret_key or None,
                secure=pub_secure,
                region=region,
            )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MinioStore({self.endpoint!r}, bucket={self.bucket!r})"

    # --- error mapping
    def _raise(self, exc: BaseException, key: str | None, op: str = "access") -> NoReturn:
        where = f"{self.endpoint}/{self.bucket}" + (f"/{key}" if key else "")
        if isinstance(exc, S3Error):
            code = exc.code or ""
            if code in _NOT_FOUND:
                raise ObjectNotFound(key or self.bucket) from exc
            if code in _PRECONDITION:
                raise PreconditionFailed(key or self.bucket, f"{code}: {exc.message}") from exc
            if code == _FORBIDDEN:
                what = f"{key!r}" if key else f"bucket {self.bucket!r}"
                raise StoreAccessDenied(
                    f"the store at {self.endpoint} refused to let this service {op} {what} (AccessDenied): "
                    f"its store user's policy does not allow it; see {POLICY_HINT}"
                ) from exc
            if code in _UNAUTHENTICATED:
                raise StoreAccessDenied(
                    f"S3 refused the request to {where}: {code}: {exc.message} "
                    "(check HUVIDPO_STORE_ACCESS_KEY / HUVIDPO_STORE_SECRET_KEY and the region)"
                ) from exc
            if code in _TRANSIENT or exc.response.status >= 500:
                raise StoreUnavailable(f"S3 at {where} failed: {code}: {exc.message}") from exc
            raise StoreError(f"S3 at {where} failed: {code}: {exc.message}") from exc
        if isinstance(exc, ServerError):
            raise StoreUnavailable(f"S3 at {where} failed with HTTP {exc.status_code}") from exc
        if isinstance(exc, InvalidResponseError):
            raise StoreUnavailable(f"S3 at {where} sent a response that is not S3: {exc}") from exc
        if isinstance(exc, urllib3.exceptions.HTTPError):
            raise StoreUnavailable(f"S3 endpoint {self.endpoint} unreachable: {exc}") from exc
        if isinstance(exc, MinioException):
            raise StoreError(f"S3 at {where}: {exc}") from exc
        raise exc

    @contextlib.contextmanager
    def _errors(self, key: str | None = None, op: str = "access") -> Iterator[None]:
        """Map the SDK's errors to the store's; ``op`` (read, write, delete, list) names the request in
        an AccessDenied message."""
        try:
            yield
        # Only the SDK's and urllib3's errors: an OSError raised by the caller's stream (a client
        # that went away) is not the store's fault and propagates unchanged.
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            self._raise(exc, key, op)

    @staticmethod
    def _forbidden(exc: StoreAccessDenied) -> bool:
        """Whether ``exc`` is a policy refusal (the key was accepted), not a bad key or signature."""
        return getattr(exc.__cause__, "code", None) == _FORBIDDEN

    def _missing_or_denied(self, key: str, denied: StoreAccessDenied) -> NoReturn:
        """A read of ``key`` got AccessDenied. S3 (and radosgw) answer that, not 404, for a missing
        key to a user without list rights on it, so list the one key: absent and listable means
        ``ObjectNotFound``; otherwise the refusal stands."""
        if self._forbidden(denied):
            try:
                with self._errors(key, "list"):
                    listed = any(
                        o.object_name == key
                        for o in self.client.list_objects(self.bucket, prefix=key, recursive=True)
                    )
            except StoreAccessDenied as refused:
                if not self._forbidden(refused):
                    raise  # a bad key or signature (a HEAD's bare 403 cannot say so; a listing can)
                raise denied from denied.__cause__
            except StoreError:
                raise denied from denied.__cause__
            if not listed:
                raise ObjectNotFound(key) from None
        raise denied from denied.__cause__

    def _ensure_bucket(self) -> None:
        if self._bucket_ready or not self.create_bucket:
            return
        with self._bucket_lock, self._errors():
            if self._bucket_ready:
                return
            try:
                exists = self.client.bucket_exists(self.bucket)
            except S3Error as exc:
                # A least-privilege user may not look at the bucket (it could not create one either):
                # the bucket is the bucket-init Job's business, and a bad key fails the first request.
                if exc.code != _FORBIDDEN:
                    raise
                exists = True
            if not exists:
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_ready = True

    # --- writes
    def _put_once(
        self, key: str, data: BinaryIO, length: int, content_type: str | None, meta: dict[str, str]
    ) -> Any:
        with self._errors(key, "write"):
            return self.client.put_object(
                self.bucket,
                key,
                data,
                length,
                content_type=content_type or _OCTET,
                metadata=dict(meta),
                part_size=self.part_size,
                num_parallel_uploads=self.num_parallel_uploads,
            )

    def put_stream(
        self,
        key: str,
        stream: BinaryIO,
        length: int | None = None,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        validate_key(key)
        meta = validate_metadata(metadata)
        self._ensure_bucket()
        reader = HashingReader(stream, length)
        head = reader.read(self.part_size)
        second = reader.read(self.part_size) if len(head) == self.part_size else b""
        if not second:  # one PUT, digest known before sending
            reader.check_complete()
            meta[SHA256_METADATA_KEY] = reader.sha256
            res = self._put_once(key, io.BytesIO(head), len(head), content_type, meta)
            return _info_from(key, len(head), res.etag, content_type or _OCTET, res.last_modified, meta)
        tmp_key = f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            pending = collections.deque((head, second))
            del head, second  # held by ``pending`` only, which _put_parts empties as it sends them
            self._put_parts(tmp_key, pending, reader, content_type)
            reader.check_complete()
            meta[SHA256_METADATA_KEY] = reader.sha256
            headers = {**meta, "Content-Type": content_type or _OCTET}
            with self._errors(key, "write"):
                res = self.client.copy_object(
                    self.bucket,
                    key,
                    CopySource(self.bucket, tmp_key),
                    metadata=headers,  # type: ignore[arg-type]
                    metadata_directive=REPLACE,
                )
        finally:
            with contextlib.suppress(StoreError, MinioException, urllib3.exceptions.HTTPError):
                self._remove(tmp_key)
        return _info_from(key, reader.size, res.etag, content_type or _OCTET, res.last_modified, meta)

    def _put_parts(
        self, key: str, pending: collections.deque[bytes], reader: HashingReader, content_type: str | None
    ) -> None:
        """Multipart upload of the ``pending`` parts, then of ``reader`` in reads of exactly ``part_size``.

        The SDK's ``put_object`` of a stream of unknown length reads ``part_size + 1`` bytes per part and
        re-slices them (two extra copies of every byte); here each part is the bytes the reader returned,
        sent as they are. At most ``num_parallel_uploads`` parts are in flight and one more is being read.
        """
        client, bucket = self.client, self.bucket
        with self._errors(key, "write"):
            upload_id = client._create_multipart_upload(bucket, key, {"Content-Type": content_type or _OCTET})
        workers = max(1, self.num_parallel_uploads)
        slots = threading.BoundedSemaphore(workers)
        failed = threading.Event()

        def upload(number: int, data: bytes) -> Part:
            try:
                with self._errors(key, "write"):
                    return Part(number, client._upload_part(bucket, key, data, None, upload_id, number))
            except BaseException:
                failed.set()
                raise
            finally:
                slots.release()

        try:
            with ThreadPoolExecutor(workers, "huvidpo-s3-part") as pool:
                futures = []
                number = 0
                while not failed.is_set():
                    data = pending.popleft() if pending else reader.read(self.part_size)
                    if not data:
                        break
                    slots.acquire()
                    number += 1
                    futures.append(pool.submit(upload, number, data))
                    del data
                parts = [f.result() for f in futures]  # the first failure, if any, is raised here
            with self._errors(key, "write"):
                client._complete_multipart_upload(bucket, key, upload_id, parts)
        except BaseException:
            with contextlib.suppress(MinioException, urllib3.exceptions.HTTPError):
                client._abort_multipart_upload(bucket, key, upload_id)
            raise

    def _put_conditional(
        self,
        key: str,
        data: bytes,
        content_type: str | None,
        metadata: dict[str, str] | None,
        if_match: str | None,
        if_none_match: bool,
    ) -> ObjectInfo:
        validate_key(key)
        meta = validate_metadata(metadata)
        meta[SHA256_METADATA_KEY] = hashlib.sha256(data).hexdigest()
        self._ensure_bucket()
        headers: DictType = {"Content-Type": content_type or _OCTET}
        headers.update({_META_PREFIX + name: value for name, value in meta.items()})
        if if_match is not None:
            headers["If-Match"] = if_match.strip('"')
        else:
            headers["If-None-Match"] = "*"
        try:
            with self._errors(key, "write"):
                # The SDK's put_object has no way to pass request headers; _put_object is its one-PUT call.
                res = self.client._put_object(self.bucket, key, data, headers)
        except ObjectNotFound as exc:  # AWS and moto: If-Match on a missing key is a 404
            if if_match is None or getattr(exc.__cause__, "code", None) != "NoSuchKey":
                raise
            raise PreconditionFailed(key, f"if_match {if_match!r}: the object is gone") from exc
        return _info_from(key, len(data), res.etag, content_type or _OCTET, res.last_modified, meta)

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        validate_key(key)
        meta = validate_metadata(metadata)
        self._ensure_bucket()
        before = os.stat(path)
        sha, size = sha256_file(path)
        meta[SHA256_METADATA_KEY] = sha
        with open(path, "rb") as fh:
            res = self._put_once(key, fh, size, content_type, meta)  # type: ignore[arg-type]
        after = os.stat(path)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            self.delete(key)  # the file changed while it was hashed or sent: its digest may be wrong
            raise ChecksumMismatch(key, sha, "a file modified during upload")
        return _info_from(key, size, res.etag, content_type or _OCTET, res.last_modified, meta)

    # --- reads
    def open_read(self, key: str) -> ObjectReader:
        validate_key(key)
        try:
            with self._errors(key, "read"):
                resp = self.client.get_object(self.bucket, key)
        except StoreAccessDenied as exc:
            self._missing_or_denied(key, exc)
        headers = resp.headers
        last_modified = headers.get("last-modified")
        info = _info_from(
            key,
            int(headers.get("content-length", 0)),
            headers.get("etag"),
            headers.get("content-type"),
            parsedate_to_datetime(last_modified) if last_modified else None,
            _user_metadata(headers),
        )

        def read(n: int) -> bytes:
            with self._errors(key, "read"):
                return resp.read(n)  # type: ignore[no-any-return]

        def close() -> None:
            resp.close()
            resp.release_conn()

        return ObjectReader(info, read, close)

    def stat(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        try:
            try:
                with self._errors(key, "read"):
                    obj = self.client.stat_object(self.bucket, key)
            except StoreAccessDenied as exc:
                self._missing_or_denied(key, exc)
        except ObjectNotFound:
            return None
        return _info_from(
            key, obj.size or 0, obj.etag, obj.content_type, obj.last_modified, _user_metadata(obj.metadata)
        )

    def list(self, prefix: str = "", recursive: bool = True) -> builtins.list[ObjectInfo]:
        prefix = validate_prefix(prefix)
        out = []
        try:
            with self._errors(prefix, "list"):
                for obj in self.client.list_objects(self.bucket, prefix=prefix or None, recursive=recursive):
                    name = obj.object_name or ""
                    if obj.is_dir or name.startswith(RESERVED_PREFIX):
                        continue
                    out.append(_info_from(name, obj.size or 0, obj.etag, None, obj.last_modified, {}))
        except ObjectNotFound:
            return []
        return sorted(out, key=lambda o: o.key)

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        prefix = validate_prefix(prefix)
        out = []
        try:
            with self._errors(prefix, "list"):
                for obj in self.client.list_objects(self.bucket, prefix=prefix or None, recursive=False):
                    name = obj.object_name or ""
                    if obj.is_dir and not name.startswith(RESERVED_PREFIX):
                        out.append(name)
        except ObjectNotFound:
            return []
        return sorted(out)

    # --- deletes
    def delete(self, key: str) -> None:
        self._remove(validate_key(key))

    def _remove(self, key: str) -> None:
        """Delete without key validation (also reaches the reserved temp prefix)."""
        try:
            with self._errors(key, "delete"):
                self.client.remove_object(self.bucket, key)
        except ObjectNotFound:
            pass

    def delete_prefix(self, prefix: str) -> int:
        if validate_prefix(prefix) == "":
            return super().delete_prefix(prefix)  # refuses ""
        keys = [o.key for o in self.list(prefix, recursive=True)]
        try:
            with self._errors(prefix, "delete"):
                errors = list(self.client.remove_objects(self.bucket, (DeleteObject(k) for k in keys)))
        except StoreAccessDenied as exc:
            if not self._forbidden(exc):
                raise
            # radosgw 16 checks a multi-object delete against the bucket, not each key, so a user that
            # may delete only under some prefixes is refused the whole request; a DELETE per key is
            # checked per key (and refused, by name, where the policy says no).
            for key in keys:
                self.delete(key)
            return len(keys)
        if errors and errors[0].code == _FORBIDDEN:
            raise StoreAccessDenied(
                f"the store at {self.endpoint} refused to let this service delete {errors[0].name!r} "
                f"(AccessDenied): its store user's policy does not allow it; see {POLICY_HINT}"
            )
        if errors:
            raise StoreError(f"could not delete {len(errors)} objects under {prefix}: {errors[0]}")
        return len(keys)

    # --- presigned URLs and readiness
    def presigned_get_url(self, key: str, expires: timedelta, base_url: str | None = None) -> str:
        validate_key(key)
        with self._errors(key):
            return self._presigner.presigned_get_object(self.bucket, key, expires=check_expiry(expires))

    def presigned_put_url(self, key: str, expires: timedelta, base_url: str | None = None) -> str:
        validate_key(key)
        self._ensure_bucket()
        with self._errors(key):
            return self._presigner.presigned_put_object(self.bucket, key, expires=check_expiry(expires))

    def check(self) -> None:
        """The bucket answers to this key. A least-privilege user may not look at the bucket itself
        (HEAD answers a bare 403, whatever the reason), so a refusal is followed by a listing, whose
        answer tells a key the store accepted (AccessDenied: a policy matter, ready) from a bad one."""
        try:
            with self._errors(None, "look at"):
                exists = self.client.bucket_exists(self.bucket)
        except StoreAccessDenied as exc:
            if not self._forbidden(exc):
                raise
            try:
                with self._errors(None, "list"):
                    next(iter(self.client.list_objects(self.bucket, prefix=_TMP_PREFIX + "check/")), None)
            except StoreAccessDenied as listed:
                if not self._forbidden(listed):
                    raise
            return
        if not exists:
            if not self.create_bucket:
                raise StoreUnavailable(f"bucket {self.bucket!r} does not exist at {self.endpoint}")
            self._ensure_bucket()


__all__ = ["MinioStore"]
