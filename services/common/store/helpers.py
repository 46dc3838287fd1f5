"""Constants, key and metadata validation, and the streaming digest shared by the port and its adapters."""

from __future__ import annotations

import hashlib
import os
import unicodedata
from datetime import timedelta
from typing import BinaryIO

from services.common.store.errors import IncompleteStream, InvalidKey

CHUNK_SIZE = 1024 * 1024
"""Bytes read or written per step when streaming (1 MiB)."""

MAX_PRESIGN_EXPIRY = timedelta(days=7)
"""Longest lifetime of a presigned URL (the S3 SigV4 limit, applied to every adapter)."""

RESERVED_PREFIX = ".huvidpo-"
"""First-segment prefix reserved for adapter bookkeeping (temp files, sidecars, keys)."""

SHA256_METADATA_KEY = "sha256"
"""User-metadata name of the content digest (``x-amz-meta-sha256`` on S3)."""


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
