"""Typed errors of the SDK and the exit codes of the CLI verbs built on it (one table, here).

REST errors are RFC 9457 problem+json bodies: :class:`ApiError` carries the problem's ``type`` (stable,
what code should switch on), ``title``, ``detail`` and ``field``; its subclass says the kind by status.
gRPC errors of the inference service are :class:`GenerationError` with the ``grpc.StatusCode``.
"""

from __future__ import annotations

import enum
from typing import Any

PROBLEM_BASE = "https://huvidpo.dev/problems/"


class HuViDPOError(Exception):
    """Base of every error the SDK raises."""


class ApiError(HuViDPOError):
    """The control plane answered with an error status; the fields are its problem+json body."""

    def __init__(
        self,
        status: int,
        type: str = "about:blank",
        title: str = "",
        detail: str = "",
        field: str | None = None,
        *,
        method: str = "",
        path: str = "",
        problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.field = field
        self.method = method
        self.path = path
        self.problem = problem or {}
        self.retry_after = retry_after
        super().__init__(self.message)

    @property
    def kind(self) -> str:
        """The last part of ``type`` (``not-found``, ``validation-error``, ...)."""
        return self.type.removeprefix(PROBLEM_BASE)

    @property
    def message(self) -> str:
        """One line a person reads: the detail (or title) and the field at fault."""
        text = self.detail or self.title or f"HTTP {self.status}"
        if self.field and self.field not in text:
            text += f" (field: {self.field})"
        return text

    @classmethod
    def from_response(
        cls, status: int, body: Any, method: str = "", path: str = "", retry_after: float | None = None
    ) -> ApiError:
        """The subclass for ``status``, filled from a problem body (or any other body)."""
        problem = body if isinstance(body, dict) else {"detail": str(body)[:500]}
        sub = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
        return sub(
            status,
            str(problem.get("type") or "about:blank"),
            str(problem.get("title") or ""),
            str(problem.get("detail") or ""),
            problem.get("field"),
            method=method,
            path=path,
            problem=problem,
            retry_after=retry_after,
        )


class InvalidInput(ApiError):
    """400, 413, 415 or 422: the request was refused as it is (``field`` says which part)."""


class Unauthorized(ApiError):
    """401: no token, or one the server does not know."""


class Forbidden(ApiError):
    """403: the token lacks the scope the route needs."""


class NotFound(ApiError):
    """404."""


class Conflict(ApiError):
    """409: the resource's state refuses the change (e.g. it exists with other content)."""


class RateLimited(ApiError):
    """429 after the retries ran out (``retry_after``: the server's last Retry-After, seconds)."""


class ServerError(ApiError):
    """5xx (503 after the retries ran out)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: InvalidInput,
    415: InvalidInput,
    422: InvalidInput,
    429: RateLimited,
}


class ConnectionFailed(HuViDPOError):
    """The control plane could not be reached (after the retries)."""


class GenerationError(HuViDPOError):
    """A gRPC call to the inference service failed; ``code`` is its ``grpc.StatusCode``."""

    def __init__(self, code: Any, details: str) -> None:
        self.code = code
        self.details = details
        name = getattr(code, "name", str(code))
        super().__init__(f"{details} (gRPC {name})" if details else f"gRPC {name}")


class WaitTimeout(HuViDPOError, TimeoutError):
    """A ``wait`` did not see what it waited for in time."""


class UploadInterrupted(HuViDPOError):
    """A dataset upload stopped part way; ``upload_id`` resumes it (``cause`` says why it stopped)."""

    def __init__(self, dataset: str, upload_id: str, cause: HuViDPOError) -> None:
        self.dataset = dataset
        self.upload_id = upload_id
        self.cause = cause
        super().__init__(f"{cause}; the upload {upload_id} can be resumed")


class ExitCode(enum.IntEnum):
    """Exit codes of the remote ``huvidpo`` verbs (documented in docs/client.md)."""

    OK = 0
    FAILED = 1  # what was watched ended badly: a fine-tune failed or was cancelled, a wait timed out
    USAGE = 2  # the command line is wrong (argparse's code), or a local file is missing
    NOT_FOUND = 3  # 404, gRPC NOT_FOUND
    REFUSED = 4  # 400/401/403/409/413/415/422, gRPC INVALID_ARGUMENT/UNAUTHENTICATED/PERMISSION_DENIED/...
    UNAVAILABLE = 5  # 5xx, 429 after retries, connection refused, gRPC UNAVAILABLE/INTERNAL/DEADLINE_EXCEEDED
    INTERRUPTED = 130  # Ctrl-C (a watched fine-tune keeps running: it was detached, not cancelled)


_GRPC_REFUSED = {
    "INVALID_ARGUMENT",
    "FAILED_PRECONDITION",
    "OUT_OF_RANGE",
    "ALREADY_EXISTS",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "CANCELLED",
}


def exit_code(exc: BaseException) -> ExitCode:
    """The CLI's exit code for an error the SDK raised."""
    if isinstance(exc, UploadInterrupted):
        return exit_code(exc.cause)
    if isinstance(exc, NotFound):
        return ExitCode.NOT_FOUND
    if isinstance(exc, RateLimited | ServerError | ConnectionFailed):
        return ExitCode.UNAVAILABLE
    if isinstance(exc, ApiError):
        return ExitCode.REFUSED if 400 <= exc.status < 500 else ExitCode.UNAVAILABLE
    if isinstance(exc, GenerationError):
        name = getattr(exc.code, "name", "")
        if name == "NOT_FOUND":
            return ExitCode.NOT_FOUND
        return ExitCode.REFUSED if name in _GRPC_REFUSED else ExitCode.UNAVAILABLE
    if isinstance(exc, WaitTimeout):
        return ExitCode.FAILED
    return ExitCode.FAILED
