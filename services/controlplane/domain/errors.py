"""The domain's error hierarchy: values with meaning, mapped once to problem+json at the HTTP edge.

The domain knows nothing of HTTP; each error carries a stable ``kind`` (the tail of the problem
``type`` URI) and, where one field is at fault, that field's name.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the control plane's domain raises on purpose."""

    kind = "domain-error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(DomainError):
    """The named resource does not exist (or is not published yet)."""

    kind = "not-found"


class Conflict(DomainError):
    """The request is valid but clashes with the current state (e.g. delete while referenced)."""

    kind = "conflict"


class InvalidRequest(DomainError):
    """A value the caller sent cannot work; ``field`` names it."""

    kind = "validation-error"


class IdempotencyKeyReused(DomainError):
    """An ``Idempotency-Key`` was sent again with a different request body."""

    kind = "idempotency-key-reused"


class PayloadTooLarge(DomainError):
    """An upload is larger than the configured limit."""

    kind = "payload-too-large"


class UnsupportedMediaType(DomainError):
    """An upload's file type is not one the control plane accepts."""

    kind = "unsupported-media-type"


class BadUpload(DomainError):
    """The upload's body could not be parsed (truncated or malformed multipart)."""

    kind = "bad-request"


class Unavailable(DomainError):
    """A dependency (object store, Kubernetes API) cannot be reached right now; retry later."""

    kind = "service-unavailable"
