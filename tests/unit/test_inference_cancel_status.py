"""A stopped generation's gRPC status comes from the typed ``Cancelled.deadline_exceeded`` flag set
where the stop is decided (the batcher), never from the words of its message (issue 15)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.inference.batcher import ErrorEvent, Job
from services.inference.errors import Cancelled
from services.inference.servicer import VideoGenerationServicer
from tests.unit.test_inference_batcher import FakeModel, drain, make, spec
from tests.unit.test_inference_internal_error import _Aborted, _Context, _Metrics


def _status_of_generate_raising(exc: Exception) -> grpc.StatusCode | None:
    servicer = VideoGenerationServicer.__new__(VideoGenerationServicer)
    servicer.metrics = _Metrics()  # type: ignore[assignment]

    async def failing(request: Any, context: Any, served: list[str]) -> AsyncIterator[Any]:
        raise exc
        yield  # pragma: no cover - makes this an async generator

    servicer._generate = failing  # type: ignore[method-assign]
    context = _Context()

    async def call() -> None:
        async for _ in servicer.Generate(None, context):  # type: ignore[arg-type]
            pass

    with pytest.raises(_Aborted):
        asyncio.run(call())
    return context.code


def test_a_deadline_stop_is_deadline_exceeded_whatever_its_message() -> None:
    assert (
        _status_of_generate_raising(Cancelled("request stopped", deadline_exceeded=True))
        == grpc.StatusCode.DEADLINE_EXCEEDED
    )


def test_a_client_cancel_is_cancelled_even_when_its_message_says_deadline() -> None:
    exc = Cancelled("cancelled by the client; generation stopped (before the deadline)")
    assert _status_of_generate_raising(exc) == grpc.StatusCode.CANCELLED


def test_the_batcher_flags_a_deadline_stop_and_not_a_client_cancel() -> None:
    async def run() -> None:
        model = FakeModel(step_s=0.05)
        b = make(model, max_batch=1, wait_s=0)
        loop = asyncio.get_running_loop()
        long = Job(spec(steps=10), "ck", loop)
        b.submit(long)
        late = Job(spec(), "ck", loop, deadline=time.monotonic() + 0.1)
        b.submit(late)
        gone = Job(spec(), "ck", loop)
        b.submit(gone)
        b.cancel(gone)
        _, late_end = await drain(late)
        _, gone_end = await drain(gone)
        await drain(long)
        b.stop()
        assert isinstance(late_end, ErrorEvent) and isinstance(late_end.error, Cancelled)
        assert late_end.error.deadline_exceeded
        assert isinstance(gone_end, ErrorEvent) and isinstance(gone_end.error, Cancelled)
        assert not gone_end.error.deadline_exceeded

    asyncio.run(run())
