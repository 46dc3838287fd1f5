"""The REST transport of the SDK: one ``httpx.Client``, retries with backoff, problem+json errors,
pagination, and a streamed multipart body whose bytes are counted as they are sent."""

from __future__ import annotations

import email.utils
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from huvidpo.client.errors import ApiError, ConnectionFailed

DEFAULT_URL = "http://127.0.0.1:8080"
RETRY_STATUSES = (429, 503)
CHUNK = 1024 * 1024

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``."""
Sent = Callable[[int], None]
"""``sent(bytes_of_this_body_so_far)``."""


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class Backoff:
    """Exponential backoff with jitter: attempt ``n`` waits between half and all of
    ``min(cap, base * 2**n)`` seconds (a server's Retry-After, when longer, wins up to ``cap``)."""

    retries: int = 4
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        d = min(self.cap, self.base * (2**attempt))
        d = d / 2 + random.uniform(0, d / 2)
        if retry_after is not None:
            d = max(d, min(retry_after, self.cap))
        return d


# -------------------------------------------------------------------------------------- multipart
@dataclass
class Part:
    """One part of a multipart/form-data body: a form field (``value``) or a file (``path``)."""

    name: str
    value: str | None = None
    path: Path | None = None
    filename: str | None = None

    def content_type(self) -> str:
        if self.path is None:
            return ""
        return "video/mp4" if self.path.suffix.lower() == ".mp4" else "application/octet-stream"

    def header(self, boundary: str) -> bytes:
        disp = f'form-data; name="{self.name}"'
        if self.filename is not None:
            quoted = self.filename.replace("\\", "\\\\").replace('"', '\\"')
            disp += f'; filename="{quoted}"'
        lines = [f"--{boundary}", f"Content-Disposition: {disp}"]
        if self.path is not None:
            lines.append(f"Content-Type: {self.content_type()}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def size(self) -> int:
        if self.path is not None:
            return self.path.stat().st_size
        return len((self.value or "").encode())


class Multipart:
    """A multipart body streamed from files in 1 MiB chunks (memory stays flat for any size);
    ``sent(n)`` sees the file bytes of this body sent so far. Iterate again for a retry."""

    def __init__(self, parts: list[Part], sent: Sent | None = None) -> None:
        self.parts = parts
        self.boundary = "huvidpo-" + uuid.uuid4().hex
        self.sent = sent

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def length(self) -> int:
        n = 0
        for p in self.parts:
            n += len(p.header(self.boundary)) + p.size() + 2
        return n + len(f"--{self.boundary}--\r\n")

    def __iter__(self) -> Iterator[bytes]:
        done = 0
        for p in self.parts:
            yield p.header(self.boundary)
            if p.path is None:
                yield (p.value or "").encode()
            else:
                with open(p.path, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        yield chunk
                        done += len(chunk)
                        if self.sent is not None:
                            self.sent(done)
            yield b"\r\n"
        yield f"--{self.boundary}--\r\n".encode()


# ------------------------------------------------------------------------------------------ transport
class Http:
    """Requests to the control plane: bearer token, retries on 429/503 and on connections that never
    reached the server, an ``ApiError`` subclass for every error status."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        backoff: Backoff | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = (url or os.environ.get("HUVIDPO_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else (os.environ.get("HUVIDPO_TOKEN") or None)
        self.backoff = backoff or Backoff()
        self.sleep = sleep
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers["User-Agent"] = "huvidpo-client/0.1"
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        # Presigned URLs carry their own signature: never send them the bearer token.
        self.plain = httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        self.client.close()
        self.plain.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        body: Multipart | None = None,
        idempotency_key: str | None = None,
        stream: bool = False,
        presigned: bool = False,
    ) -> httpx.Response:
        """Send one request, retried on 429/503 (after Retry-After, or backoff) and on connection
        errors; every attempt of a create carries the same ``idempotency_key``."""
        hdrs = dict(headers or {})
        if idempotency_key is not None:
            hdrs["Idempotency-Key"] = idempotency_key
        query = {k: v for k, v in (params or {}).items() if v is not None}
        query = {k: ("true" if v is True else "false" if v is False else v) for k, v in query.items()}
        client = self.plain if presigned else self.client
        attempt = 0
        while True:
            content: Iterable[bytes] | None = None
            if body is not None:
                hdrs["Content-Type"] = body.content_type
                hdrs["Content-Length"] = str(body.length())
                content = iter(body)
            req = client.build_request(
                method, path, json=json, params=query or None, headers=hdrs, content=content
            )  # type: ignore[arg-type]
            try:
                resp = client.send(req, stream=True)
            except httpx.TransportError as exc:
                # Not connected: nothing reached the server, any request may go again. Other
                # transport errors (a read timeout) are retried only for reads.
                again = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) or method == "GET"
                if not again or attempt >= self.backoff.retries:
                    where = req.url.copy_with(query=None) if presigned else self.url
                    raise ConnectionFailed(f"cannot reach {where}: {exc or type(exc).__name__}") from exc
                self.sleep(self.backoff.delay(attempt))
                attempt += 1
                continue
            if resp.status_code in RETRY_STATUSES and attempt < self.backoff.retries:
                after = _retry_after(resp.headers.get("Retry-After"))
                resp.close()
                self.sleep(self.backoff.delay(attempt, after))
                attempt += 1
                continue
            if resp.status_code >= 400:
                resp.read()
                resp.close()
                try:
                    problem: Any = resp.json()
                except ValueError:
                    problem = {"detail": resp.text[:500] or resp.reason_phrase}
                raise ApiError.from_response(
                    resp.status_code,
                    problem,
                    method,
                    path,
                    _retry_after(resp.headers.get("Retry-After")),
                )
            if not stream:
                resp.read()
                resp.close()
            return resp

    def json(self, method: str, path: str, **kw: Any) -> Any:
        r = self.request(method, path, **kw)
        return r.json() if r.content else None

    def pages(
        self, path: str, params: Mapping[str, Any] | None = None, page_size: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every item of a paginated listing (``items`` + ``next_page_token``), page after page."""
        token: str | None = None
        while True:
            page = self.json(
                "GET", path, params={**(params or {}), "page_size": page_size, "page_token": token}
            )
            yield from page.get("items", [])
            token = page.get("next_page_token")
            if not token:
                return


def new_key() -> str:
    """A fresh Idempotency-Key (uuid4)."""
    return str(uuid.uuid4())
