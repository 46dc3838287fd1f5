"""The object store's errors: few, and each with one meaning (see ``services.common.store.port``)."""

from __future__ import annotations


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
