"""An unexpected failure inside Generate reaches the client as INTERNAL without the exception's text
(which can hold server paths or other internals); the server log keeps the details (issue 14, item 10)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.inference.servicer import VideoGenerationServicer


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted(details)


class _Metrics:
    def __init__(self) -> None:
        self.counted: list[tuple[str, str]] = []

    def count_request(self, code: str, checkpoint: str) -> None:
        self.counted.append((code, checkpoint))


def test_an_unexpected_error_is_internal_without_its_text(caplog: pytest.LogCaptureFixture) -> None:
    servicer = VideoGenerationServicer.__new__(VideoGenerationServicer)
    metrics = _Metrics()
    servicer.metrics = metrics  # type: ignore[assignment]

    async def failing(request: Any, context: Any, served: list[str]) -> AsyncIterator[Any]:
        raise OSError("[Errno 2] No such file or directory: '/var/cache/huvidpo/secret-key/unet'")
        yield  # pragma: no cover - makes this an async generator

    servicer._generate = failing  # type: ignore[method-assign]
    context = _Context()

    async def call() -> None:
        async for _ in servicer.Generate(None, context):  # type: ignore[arg-type]
            pass

    with caplog.at_level(logging.ERROR), pytest.raises(_Aborted):
        asyncio.run(call())
    assert context.code == grpc.StatusCode.INTERNAL
    assert "/var/cache" not in context.details and "secret" not in context.details
    assert "internal error" in context.details and "server log" in context.details
    assert "/var/cache/huvidpo/secret-key/unet" in caplog.text  # the operator still sees it
    assert metrics.counted == [("INTERNAL", "none")]
