"""Request-body limits, enforced as the body arrives and only after the bearer token passed.

A pure ASGI middleware, outside every route: FastAPI reads a JSON body before it runs a route's
dependencies (auth included), so without it a client with no token could make the server buffer any
body it likes. Here, before one body byte is read:

- a request that carries a body must hold a valid bearer token (401, and the connection closes
  without the body being read), except on ``/v1/objects/`` whose presigned signature is checked by
  the route before it reads;
- a declared ``Content-Length`` over the route's limit is a 413 at once;

and while the body arrives its bytes are counted, so a chunked body that passes the limit ends with
413 there (the route sees an error, never more bytes than the limit).

Limits per route: the upload routes (multipart files, a version's upload, a presigned PUT) take
``max_upload_bytes``; every other route takes ``max_request_bytes`` (JSON bodies).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import anyio
from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.auth import TokenTable, bearer
from services.common.settings import ControlPlaneSettings
from services.controlplane import problems

_UPLOAD_ROUTES = (
    ("POST", re.compile(r"^/v1/datasets/[^/]+/uploads/[^/]+/files/?$")),
    ("POST", re.compile(r"^/v1/datasets/[^/]+/versions/?$")),
    ("POST", re.compile(r"^/v1/models/?$")),  # a multipart upload (its JSON form reads max_request_bytes)
    ("PUT", re.compile(r"^/v1/objects/.+")),
)
# Routes whose authorisation is not a bearer token (a presigned URL's signature, checked by the route
# before it reads the body).
_NO_BEARER = re.compile(r"^/v1/objects/")


class BodyTooLarge(HTTPException):
    """The body passed its route's limit while it arrived (problem+json 413 through the app's handler)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this route's limit of {limit} bytes")


def body_limit(settings: ControlPlaneSettings, method: str, path: str) -> int:
    """The most bytes a ``method`` request to ``path`` may send."""
    if any(method == m and rx.match(path) for m, rx in _UPLOAD_ROUTES):
        return settings.max_upload_bytes
    return settings.max_request_bytes


def bearer_is_valid(app: Any, headers: Headers) -> bool:
    """Whether the request holds a token the app accepts (anyone in open dev mode). Only validity:
    what the token may do is the route's check (``auth.needs``)."""
    table: TokenTable = app.state.tokens
    if table.open:
        return True
    token = bearer(headers.get("authorization", ""))
    return token is not None and table.verify(token) is not None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: Callable[[str, str], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared_text = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not chunked and declared_text in (None, "0"):
            await self.app(scope, receive, send)  # no body to bound
            return
        path, method = scope["path"], scope["method"]
        if not _NO_BEARER.match(path) and not bearer_is_valid(scope["app"], headers):
            await _refuse(
                scope,
                receive,
                send,
                401,
                "unauthorized",
                "a valid bearer token is required (Authorization: Bearer <token>) before a request body is read",
                {"WWW-Authenticate": 'Bearer realm="huvidpo"'},
            )
            return
        limit = self.limit(method, path)
        declared = int(declared_text) if declared_text and declared_text.isdigit() else None
        if declared is not None and declared > limit:
            await _refuse(
                scope,
                receive,
                send,
                413,
                "payload-too-large",
                f"the request body is {declared} bytes; this route's limit is {limit} bytes",
                {},
            )
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watch)
        except BodyTooLarge as exc:
            if started:
                raise
            await _refuse(scope, receive, send, 413, "payload-too-large", str(exc.detail), {})


async def _refuse(
    scope: Scope, receive: Receive, send: Send, status: int, kind: str, detail: str, headers: dict[str, str]
) -> None:
    """Answer without reading the body, and close the connection (the unread body cannot be skipped)."""
    response = problems.problem_response(
        status, kind, detail, instance=scope["path"], headers={**headers, "Connection": "close"}
    )
    await response(scope, receive, send)


class StreamSlots:
    """Concurrent streamed responses per bearer token (the event loop is the only caller: no lock)."""

    def __init__(self, per_token: int, readers: int = 64) -> None:
        self.per_token = per_token
        self._open: dict[str, int] = {}
        self._readers = readers
        self._reads: anyio.CapacityLimiter | None = None

    @property
    def reads(self) -> anyio.CapacityLimiter:
        """Threads that pull stream chunks (a Kubernetes pod log read blocks until the pod writes),
        apart from the pool that runs the routes, so a follower never takes a route's thread. Made on
        first use, inside the app's event loop."""
        if self._reads is None:
            self._reads = anyio.CapacityLimiter(self._readers)
        return self._reads

    @staticmethod
    def key(headers: Headers) -> str:
        """Who holds the stream: the token's digest (the token itself is never kept)."""
        import hashlib

        _, _, token = headers.get("authorization", "").partition(" ")
        return hashlib.sha256(token.strip().encode()).hexdigest()

    def acquire(self, key: str) -> None:
        """Take a slot, or 429 naming the limit."""
        if self._open.get(key, 0) >= self.per_token:
            raise HTTPException(
                429,
                f"this token already has {self.per_token} open streams, the limit per token; "
                "close one (or wait for it to end) and retry",
                headers={"Retry-After": "5"},
            )
        self._open[key] = self._open.get(key, 0) + 1

    def release(self, key: str) -> None:
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)
