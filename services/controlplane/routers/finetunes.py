"""``/v1/fine-tunes``: create (idempotent), get with progress, list, cancel, streamed logs, checkpoints."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.common.auth import Principal
from services.controlplane import problems
from services.controlplane.auth import needs
from services.controlplane.deps import Context, ctx
from services.controlplane.domain.errors import NotFound
from services.controlplane.domain.finetunes import TERMINAL, FineTuneRequest
from services.controlplane.domain.names import NAME_PATTERN
from services.controlplane.domain.progress import event_items, events_page, metrics_history, read_progress
from services.controlplane.domain.retention import Retention
from services.controlplane.limits import StreamSlots
from services.controlplane.params import FineTuneIdPath, PageSize, PageToken
from services.controlplane.schemas import (
    CheckpointList,
    FineTune,
    FineTuneCreate,
    FineTuneEventPage,
    FineTuneList,
    FineTuneMetrics,
)

router = APIRouter(prefix="/v1/fine-tunes", tags=["fine-tunes"])
LOG_POLL_SECONDS = 0.5
# How often a followed event stream re-reads progress.jsonl and the fine-tune's state.
EVENT_POLL_SECONDS = 1.0


@router.post(
    "",
    status_code=201,
    response_model=FineTune,
    responses={
        200: {
            "model": FineTune,
            "description": "A retry with the same Idempotency-Key: the existing fine-tune",
        },
        **problems.common_responses(401, 403, 409, 422, 503),
    },
)
def create_finetune(
    body: FineTuneCreate,
    response: Response,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", min_length=1, max_length=255),
    c: Context = Depends(ctx),
    who: Principal = needs("train"),
) -> dict[str, Any]:
    hp = body.hyperparameters.model_dump(exclude_unset=True)  # as sent: the fingerprint depends on it
    req = FineTuneRequest(
        body.dataset, body.version, body.base_model, body.stage, hp, body.nodes, body.gpus_per_node
    )
    view, created = c.finetunes.create(req, idempotency_key, created_by=who.name)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/fine-tunes/{view['id']}"
    return view


@router.get(
    "",
    dependencies=[needs("read")],
    response_model=FineTuneList,
    responses=problems.common_responses(401, 422),
)
def list_finetunes(
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = Query(None),
    dataset: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=63)] = None,
    base_model: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=63)] = None,
    page_size: PageSize = 50,
    page_token: PageToken = None,
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    items, token = c.finetunes.list(state, dataset, base_model, page_size, page_token)
    return {"items": items, "next_page_token": token}


@router.get(
    "/{finetune_id}",
    dependencies=[needs("read")],
    response_model=FineTune,
    responses=problems.common_responses(401, 404),
)
def get_finetune(finetune_id: FineTuneIdPath, c: Context = Depends(ctx)) -> dict[str, Any]:
    return c.finetunes.get(finetune_id)


@router.delete(
    "/{finetune_id}",
    dependencies=[needs("admin")],
    status_code=204,
    responses=problems.common_responses(401, 403, 404, 409),
    summary="Delete a finished fine-tune without checkpoints (409 while active or while it has checkpoints)",
)
def delete_finetune(finetune_id: FineTuneIdPath, c: Context = Depends(ctx)) -> Response:
    Retention(c.finetunes, c.checkpoints, c.rollouts, c.models).delete_finetune(finetune_id)
    return Response(status_code=204)


@router.post(
    "/{finetune_id}/cancel",
    dependencies=[needs("train")],
    response_model=FineTune,
    responses=problems.common_responses(401, 403, 404, 409),
)
def cancel_finetune(finetune_id: FineTuneIdPath, c: Context = Depends(ctx)) -> dict[str, Any]:
    return c.finetunes.cancel(finetune_id)


@router.get(
    "/{finetune_id}/logs",
    dependencies=[needs("read")],
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/plain": {}}, "description": "the trainer's output"},
        **problems.common_responses(401, 404, 429),
    },
)
async def finetune_logs(
    finetune_id: FineTuneIdPath, request: Request, follow: bool = Query(False), c: Context = Depends(ctx)
) -> StreamingResponse:
    """The executor's chunks are pulled one at a time on a thread of their own pool (a blocking read
    never takes a thread the other routes need); an empty chunk means "nothing yet", and the wait
    before the next pull is an ``asyncio.sleep``, so a quiet follower holds no thread at all. Each
    token may hold ``max_streams_per_token`` streams (429 beyond)."""
    slots: StreamSlots = request.app.state.streams
    key = StreamSlots.key(request.headers)
    slots.acquire(key)
    try:
        chunks = await run_in_threadpool(c.finetunes.logs, finetune_id, follow)
    except BaseException:
        slots.release(key)
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                chunk = await anyio.to_thread.run_sync(next, chunks, None, limiter=slots.reads)
                if chunk is None:
                    return
                if chunk:
                    yield chunk
                elif await request.is_disconnected():  # nothing to send would notice it: free the slot
                    return
                else:
                    await asyncio.sleep(LOG_POLL_SECONDS)
        finally:
            slots.release(key)
            close = getattr(chunks, "close", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(close, limiter=slots.reads)

    return StreamingResponse(body(), media_type="text/plain; charset=utf-8")


@router.get(
    "/{finetune_id}/checkpoints",
    dependencies=[needs("read")],
    response_model=CheckpointList,
    responses=problems.common_responses(401, 404, 422),
)
def finetune_checkpoints(
    finetune_id: FineTuneIdPath,
    page_size: PageSize = 50,
    page_token: PageToken = None,
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    c.finetunes.require(finetune_id)
    items, token = c.checkpoints.list(finetune_id, page_size, page_token)
    return {"items": items, "next_page_token": token}


@router.get(
    "/{finetune_id}/events",
    dependencies=[needs("read")],
    response_model=FineTuneEventPage,
    responses={
        200: {
            "description": "A page of events; with follow=true an application/x-ndjson stream of them, "
            "one per line, that ends once the fine-tune is finished and all its events are sent",
            "content": {"application/x-ndjson": {"schema": {"$ref": "#/components/schemas/FineTuneEvent"}}},
        },
        **problems.common_responses(401, 404, 422, 429),
    },
    summary="The trainer's progress events (start, step, checkpoint, end), paginated or followed",
)
async def finetune_events(
    finetune_id: FineTuneIdPath,
    request: Request,
    after: int = Query(-1, ge=-1, description="return events with seq above this (a previous next_after)"),
    limit: int = Query(100, ge=1, le=1000, description="at most this many events (not with follow)"),
    follow: bool = Query(False, description="stream events as NDJSON until the fine-tune finishes"),
    c: Context = Depends(ctx),
) -> Any:
    """Read from ``finetunes/{id}/progress.jsonl`` (``services.common.records.progress``). A follower
    holds one of the token's ``max_streams_per_token`` stream slots (429 beyond), as a log stream does."""
    await run_in_threadpool(c.finetunes.require, finetune_id)
    if not follow:
        events = await run_in_threadpool(read_progress, c.store, finetune_id)
        return events_page(events, after, limit)
    slots: StreamSlots = request.app.state.streams
    key = StreamSlots.key(request.headers)
    slots.acquire(key)

    def poll() -> tuple[str | None, list[dict[str, Any]]]:
        # the state first: events read after a terminal state are all the events there will be
        try:
            state = str(c.finetunes.get(finetune_id)["state"])
        except NotFound:  # deleted while followed: nothing more will come
            return None, []
        return state, event_items(read_progress(c.store, finetune_id))

    async def body() -> AsyncIterator[bytes]:
        sent = after
        try:
            while True:
                state, items = await anyio.to_thread.run_sync(poll, limiter=slots.reads)
                fresh = [it for it in items if it["seq"] > sent]
                if fresh:
                    sent = fresh[-1]["seq"]
                    yield b"".join(json.dumps(it).encode() + b"\n" for it in fresh)
                if state is None or state in TERMINAL:
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(EVENT_POLL_SECONDS)
        finally:
            slots.release(key)

    return StreamingResponse(body(), media_type="application/x-ndjson")


@router.get(
    "/{finetune_id}/metrics",
    dependencies=[needs("read")],
    response_model=FineTuneMetrics,
    responses=problems.common_responses(401, 404),
    summary="The step metrics' history (loss, implicit_acc, reward_margin, ...) as aligned series",
)
def finetune_metrics(finetune_id: FineTuneIdPath, c: Context = Depends(ctx)) -> dict[str, Any]:
    c.finetunes.require(finetune_id)
    return {"finetune_id": finetune_id, **metrics_history(read_progress(c.store, finetune_id))}
