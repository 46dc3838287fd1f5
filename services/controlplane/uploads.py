"""Streaming multipart uploads: the request body flows to the object store while it arrives.

FastAPI's ``UploadFile`` spools the whole body to disk before the handler runs, so the store write
would start only after the last byte came in (half the throughput, and disk space the size of the
upload). Here the event loop pushes body chunks into a small bounded queue; one worker thread parses
the multipart stream (python-multipart's push parser, driven from pull-style reads) and hands each
file part to ``ObjectStore.put_stream`` as a file-like object. Memory is bounded by the queue and the
store's part buffer, whatever the upload size; a slow store slows the client down (backpressure).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from services.controlplane.domain.errors import BadUpload, PayloadTooLarge, UnsupportedMediaType

T = TypeVar("T")
QUEUE_CHUNKS = 8
# The server hands the body over in socket-read pieces (tens of KiB). They are coalesced into blocks of
# about this size before crossing to the worker thread: one queue hand-off (and one thread wake-up, one
# parser call) per block instead of per piece. Queue memory stays bounded: QUEUE_CHUNKS blocks.
BLOCK_BYTES = 1 << 20
MAX_FIELD_BYTES = 64 * 1024
_EOF = object()


class _Aborted(Exception):
    """The producer side stopped (client gone, limit hit): the worker must not write anything."""


class BodyPipe:
    """Chunks from the event loop to one consumer thread, bounded.

    The producer never parks a thread while it waits for room: the consumer wakes it through the
    event loop (``call_soon_threadsafe``). Waiting in a shared thread pool instead deadlocks once
    every pool thread is a consumer waiting for data that only a queued producer could deliver.
    """

    def __init__(self, maxsize: int = QUEUE_CHUNKS) -> None:
        self._q: queue.Queue[object] = queue.Queue(maxsize)
        self._loop = asyncio.get_running_loop()
        self._space = asyncio.Event()

    async def put(self, item: object, worker: asyncio.Future[Any]) -> None:
        while True:
            self._space.clear()
            try:
                self._q.put_nowait(item)
                return
            except queue.Full:
                if worker.done():
                    return  # the consumer stopped; its result or error says why
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._space.wait(), 0.5)

    def abort(self, exc: BaseException) -> None:
        # Make room if needed: the consumer must see the abort, not block forever.
        while True:
            try:
                self._q.put_nowait(exc)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._q.get_nowait()

    def get(self) -> bytes:
        item = self._q.get()
        self._loop.call_soon_threadsafe(self._space.set)
        if item is _EOF:
            return b""
        if isinstance(item, BaseException):
            raise _Aborted() from item
        assert isinstance(item, bytes)
        return item

    def eof(self) -> object:
        return _EOF


@dataclass
class Part:
    name: str | None
    filename: str | None
    content_type: str | None


class MultipartStream:
    """Pull-style access to the parts of a multipart body read from a ``BodyPipe``."""

    def __init__(self, boundary: bytes, pipe: BodyPipe) -> None:
        self._pipe = pipe
        self._events: collections.deque[tuple[str, Any]] = collections.deque()
        self._headers: dict[bytes, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._done = False
        callbacks = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": lambda: self._events.append(("end", None)),
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": lambda: self._events.append(("part", dict(self._headers))),
            "on_end": lambda: self._events.append(("eof", None)),
        }
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        self._current: _PartReader | None = None

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        # A block that lies wholly inside a part (most of a large file) is passed on without a copy.
        whole = start == 0 and end == len(data) and type(data) is bytes
        self._events.append(("data", data if whole else bytes(data[start:end])))

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._hname.strip().lower()] = self._hvalue.strip()
        self._hname, self._hvalue = b"", b""

    def _next_event(self) -> tuple[str, Any]:
        while not self._events:
            if self._done:
                raise BadUpload("the multipart body ended before its closing boundary")
            chunk = self._pipe.get()
            if not chunk:
                self._done = True
                try:
                    self._parser.finalize()
                except Exception as exc:
                    raise BadUpload(f"malformed multipart body: {exc}") from exc
                continue
            try:
                self._parser.write(chunk)
            except Exception as exc:
                raise BadUpload(f"malformed multipart body: {exc}") from exc
        return self._events.popleft()

    def next_part(self) -> tuple[Part, _PartReader] | None:
        """The next part and a reader of its bytes; None after the last part."""
        if self._current is not None:
            self._current.drain()
        while True:
            kind, value = self._next_event()
            if kind == "eof":
                return None
            if kind == "part":
                part = _describe(value)
                self._current = _PartReader(self)
                return part, self._current


def _describe(headers: dict[bytes, bytes]) -> Part:
    disposition = headers.get(b"content-disposition", b"")
    _, params = parse_options_header(disposition)
    name = params.get(b"name")
    filename = params.get(b"filename")
    if filename is None and b"filename*" in disposition:
        # RFC 5987 ext-value: UTF-8''percent-encoded
        raw = disposition.split(b"filename*=", 1)[1].split(b";", 1)[0].strip().strip(b'"')
        _, _, encoded = raw.decode("latin-1").partition("''")
        filename = unquote(encoded).encode()
    ctype = headers.get(b"content-type")
    try:
        return Part(
            name.decode() if name is not None else None,
            filename.decode("utf-8") if filename is not None else None,
            ctype.decode("latin-1") if ctype is not None else None,
        )
    except UnicodeDecodeError as exc:
        raise BadUpload("part headers must be UTF-8") from exc


class _PartReader:
    """File-like reader of one part's bytes (what ``ObjectStore.put_stream`` consumes).

    Reads may be short (whatever the parser has decoded), as with a socket: the store's reader fills
    its own buffer, so no second copy of a part is held here."""

    def __init__(self, stream: MultipartStream) -> None:
        self._stream = stream
        self._buf = b""
        self._ended = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while chunk := self.read(1 << 20):
                parts.append(chunk)
            return b"".join(parts)
        while not self._buf and not self._ended:
            kind, value = self._stream._next_event()
            if kind == "data":
                self._buf = value
            elif kind == "end":
                self._ended = True
            else:
                raise BadUpload("malformed multipart body: a part ended without its data")
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def read_small(self, limit: int = MAX_FIELD_BYTES) -> bytes:
        data = self.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLarge(f"form fields are limited to {limit} bytes")
        self.drain()
        return data


def run_in_own_thread(fn: Callable[[Any], T], arg: Any) -> asyncio.Future[T]:
    """Run ``fn(arg)`` in a new thread (not a shared pool: it may block for the whole upload)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    def target() -> None:
        try:
            value = fn(arg)
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=target, name="huvidpo-upload", daemon=True).start()
    return future


def multipart_boundary(request: Request) -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise UnsupportedMediaType(
            "the body must be multipart/form-data with one part per file", field="Content-Type"
        )
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise BadUpload(
            "multipart/form-data needs a boundary parameter (1-200 characters)", field="Content-Type"
        )
    return boundary


async def stream_multipart(
    request: Request,
    consume: Callable[[MultipartStream], T],
    max_bytes: int,
    on_bytes: Callable[[int], None] | None = None,
) -> T:
    """Feed the request body to ``consume`` (run in a worker thread) while it arrives; return its result.

    Raises ``PayloadTooLarge`` past ``max_bytes`` (checked against Content-Length first, then counted)."""
    boundary = multipart_boundary(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the upload is {declared} bytes; the limit is {max_bytes}")
    pipe = BodyPipe()
    stream = MultipartStream(boundary, pipe)
    worker = run_in_own_thread(consume, stream)
    await _pump(request, pipe, worker, max_bytes, on_bytes)
    try:
        return await worker
    except _Aborted as exc:  # pragma: no cover - only when the producer aborted, handled above
        raise BadUpload("the upload was aborted") from exc


class _RawReader:
    def __init__(self, pipe: BodyPipe) -> None:
        self._pipe = pipe
        self._buf = bytearray()
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n is None or n < 0 or len(self._buf) < n):
            chunk = self._pipe.get()
            if not chunk:
                self._eof = True
            self._buf += chunk
        if n is None or n < 0 or n >= len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
        else:
            out = bytes(self._buf[:n])
            del self._buf[:n]
        return out

    def readable(self) -> bool:
        return True


async def stream_raw(
    request: Request,
    consume: Callable[[Any], T],
    max_bytes: int,
    on_bytes: Callable[[int], None] | None = None,
) -> T:
    """Like :func:`stream_multipart` for a raw body (a presigned PUT): ``consume`` gets a file-like reader."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the upload is {declared} bytes; the limit is {max_bytes}")
    pipe = BodyPipe()
    worker = run_in_own_thread(consume, _RawReader(pipe))
    await _pump(request, pipe, worker, max_bytes, on_bytes)
    return await worker


async def _pump(
    request: Any, pipe: Any, worker: Any, max_bytes: int, on_bytes: Callable[[int], Any] | None
) -> None:
    """Feed the request body into ``pipe`` for ``worker``, enforcing ``max_bytes``; on any failure
    abort the pipe and wait for the worker before raising."""
    total = 0
    block: list[bytes] = []
    pending = 0
    try:
        async for chunk in request.stream():
            if worker.done():
                break
            if not chunk:
                continue
            total += len(chunk)
            if total > max_bytes:
                raise PayloadTooLarge(f"the upload is larger than the limit of {max_bytes} bytes")
            if on_bytes is not None:
                on_bytes(len(chunk))
            block.append(chunk)
            pending += len(chunk)
            if pending >= BLOCK_BYTES:
                await pipe.put(b"".join(block), worker)
                block, pending = [], 0
        else:
            if block:
                await pipe.put(b"".join(block), worker)
            await pipe.put(pipe.eof(), worker)
    except ClientDisconnect as exc:
        pipe.abort(exc)
        await asyncio.gather(worker, return_exceptions=True)
        raise BadUpload("the client disconnected before the upload finished") from exc
    except BaseException as exc:
        pipe.abort(exc)
        await asyncio.gather(worker, return_exceptions=True)
        raise
