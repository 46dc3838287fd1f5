"""The gRPC transport: turns requests into jobs and events into messages; no model logic here.

Domain errors are mapped to status codes in one place (``_status_of``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from huvidpo.pipeline import GenerationError
from huvidpo.video_io import encode_gif, encode_mp4
from services.common.records.keys import generation_key
from services.common.settings import InferenceSettings
from services.common.store import ObjectNotFound, ObjectStore
from services.inference.batcher import DRAINING_MESSAGE, Batcher, ErrorEvent, Job, ProgressEvent, ResultEvent
from services.inference.errors import (
    Cancelled,
    Draining,
    InferenceError,
    InvalidRequest,
    ModelNotReady,
    QueueFull,
    UnknownCheckpoint,
)
from services.inference.gen import inference_pb2 as pb
from services.inference.gen import inference_pb2_grpc as pb_grpc
from services.inference.manager import LoadedModel, ModelManager
from services.inference.metrics import NO_CHECKPOINT, InferenceMetrics
from services.inference.validation import (
    check_prompt_tokens,
    check_request,
    decode_first_frame,
    parse_store_uri,
)

log = logging.getLogger(__name__)

ROLE_TO_PB = {
    "base": pb.MODEL_ROLE_BASE,
    "current": pb.MODEL_ROLE_CURRENT,
    "canary": pb.MODEL_ROLE_CANARY,
    "pinned": pb.MODEL_ROLE_PINNED,
    "retiring": pb.MODEL_ROLE_RETIRING,
}
FORMATS: dict[int, tuple[str, str]] = {
    pb.OUTPUT_FORMAT_MP4: ("mp4", "video/mp4"),
    pb.OUTPUT_FORMAT_GIF: ("gif", "image/gif"),
}


def _status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, InvalidRequest | GenerationError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, UnknownCheckpoint):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, ModelNotReady | Draining):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, Cancelled):
        return grpc.StatusCode.DEADLINE_EXCEEDED if exc.deadline_exceeded else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


def _timestamp(dt: datetime | str | None) -> Timestamp | None:
    if dt is None:
        return None
    if isinstance(dt, str):
        try:
            dt = datetime.fromisoformat(dt.replace("Z", "+00:00"))
        except ValueError:
            return None
    ts = Timestamp()
    ts.FromDatetime(dt if dt.tzinfo else dt.replace(tzinfo=UTC))
    return ts


def model_to_pb(m: LoadedModel) -> pb.Model:
    lin = m.lineage
    config = lin.get("config")
    lineage = pb.Lineage(
        dataset_digest=str(lin.get("dataset_digest") or ""),
        base_model_digest=str(lin.get("base_model_digest") or ""),
        finetune_id=str(lin.get("finetune_id") or ""),
        job=str(lin.get("job") or ""),
        config_json=json.dumps(config, sort_keys=True, default=str) if config is not None else "",
        created_at=_timestamp(m.created_at),
    )
    return pb.Model(
        id=m.id,
        role=ROLE_TO_PB.get(m.role, pb.MODEL_ROLE_UNSPECIFIED),
        digest=m.digest,
        manifest_sha256=m.manifest_sha256,
        source=m.source,
        lineage=lineage,
        loaded_at=_timestamp(m.loaded_at),
        active_requests=m.refs,
    )


class VideoGenerationServicer(pb_grpc.VideoGenerationServiceServicer):
    def __init__(
        self,
        settings: InferenceSettings,
        store: ObjectStore,
        bucket: str,
        manager: ModelManager,
        batcher: Batcher,
        metrics: InferenceMetrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.bucket = bucket
        self.manager = manager
        self.batcher = batcher
        self.metrics = metrics

    # -- Generate ----------------------------------------------------------------------------------
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        code = grpc.StatusCode.OK
        # The checkpoint the request was admitted to, once it has one; held (a reference in the
        # manager) until the request is counted, so its metric series cannot be retired meanwhile.
        served: list[str] = []
        try:
            async for message in self._generate(request, context, served):
                yield message
        except InferenceError as exc:
            code = _status_of(exc)
            await context.abort(code, str(exc))
        except GenerationError as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(exc))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            code = grpc.StatusCode.INTERNAL
            log.exception("Generate failed")
            # The exception's text can name server paths or other internals: the client gets its
            # type only, the log has the rest.
            await context.abort(
                code, f"internal error ({type(exc).__name__}); the server log has the details"
            )
        finally:
            self.metrics.count_request(code.name, served[0] if served else NO_CHECKPOINT)
            if served:
                self.manager.count_outcome(served[0], code.name)
                self.manager.release(served[0])

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, served: list[str]
    ) -> AsyncIterator[pb.GenerateResponse]:
        s = self.settings
        if self.batcher.draining:
            raise Draining(DRAINING_MESSAGE)
        spec = check_request(request, s)
        if not self.manager.ready:
            raise ModelNotReady("no model is loaded yet; retry shortly")
        check_prompt_tokens(spec, self.manager.count_tokens, self.manager.max_tokens)
        if spec.image_uri:
            data = await asyncio.to_thread(self._read_uri, spec.image_uri)
            spec.image = await asyncio.to_thread(
                decode_first_frame, data, s, "first_frame_uri", spec.height, spec.width
            )
        elif spec.image_bytes is not None:
            spec.image = await asyncio.to_thread(
                decode_first_frame, spec.image_bytes, s, "first_frame_image", spec.height, spec.width
            )
            spec.image_bytes = None
        checkpoint = self.manager.resolve(spec.checkpoint_id)
        served.append(checkpoint)  # released by Generate once counted
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        job = Job(spec, checkpoint, asyncio.get_running_loop(), deadline)
        finished = False
        try:
            self.batcher.submit(job)
            while True:
                event = await job.events.get()
                if isinstance(event, ProgressEvent):
                    yield pb.GenerateResponse(
                        progress=pb.Progress(
                            step=event.step, total=event.total, queue_position=event.queue_position
                        )
                    )
                elif isinstance(event, ErrorEvent):
                    finished = True
                    raise event.error
                elif isinstance(event, ResultEvent):
                    finished = True
                    result = await asyncio.to_thread(self._result, job, event)
                    yield pb.GenerateResponse(result=result)
                    return
        finally:
            if not finished:
                self.batcher.cancel(job)

    def _read_uri(self, uri: str) -> bytes:
        key = parse_store_uri(uri, self.bucket)
        # A key outside the readable prefixes answers exactly like a missing one (same code and
        # message, no size), so the URI cannot probe which objects exist.
        hidden = InvalidRequest(
            f"first_frame_uri {uri} does not exist or may not be read "
            f"(readable prefixes: {', '.join(self.settings.first_frame_prefixes) or 'none'})"
        )
        if not any(key.startswith(p) for p in self.settings.first_frame_prefixes):
            raise hidden
        try:
            info = self.store.stat(key)
        except ValueError as exc:
            raise InvalidRequest(f"first_frame_uri: {exc}") from exc
        if info is None:
            raise hidden
        if info.size > self.settings.max_image_bytes:
            raise InvalidRequest(
                f"first_frame_uri names an image over the limit of {self.settings.max_image_bytes} bytes"
            )
        try:
            return self.store.get_bytes(key)
        except ObjectNotFound as exc:
            raise hidden from exc

    def _result(self, job: Job, event: ResultEvent) -> pb.GenerationResult:
        """(worker thread) Encode the frames and put the video inline or behind a download URL."""
        spec, gen = job.spec, event.result
        t0 = time.perf_counter()
        ext, mime = FORMATS[spec.output_format]
        data = encode_gif(gen.frames, spec.fps) if ext == "gif" else encode_mp4(gen.frames, spec.fps)
        encode_s = time.perf_counter() - t0
        result = pb.GenerationResult(
            output_format=pb.OutputFormat.ValueType(spec.output_format),
            mime_type=mime,
            size_bytes=len(data),
            checkpoint_id=job.checkpoint_id,
            seed=gen.seed,
            frames=int(gen.frames.shape[0]),
            height=int(gen.frames.shape[1]),
            width=int(gen.frames.shape[2]),
            fps=spec.fps,
            batch_size=event.batch_size,
            request_id=job.id,
        )
        if len(data) <= self.settings.inline_limit_bytes:
            result.video_bytes = data
        else:
            key = generation_key(self.settings.deployment, job.id, ext)
            self.store.put_bytes(key, data, content_type=mime, metadata={"checkpoint": job.checkpoint_id})
            ttl = timedelta(seconds=self.settings.url_ttl_seconds)
            result.download_url = self.store.presigned_get_url(key, ttl)
            expires = _timestamp(datetime.now(UTC) + ttl)
            if expires is not None:
                result.url_expires_at.CopyFrom(expires)
        t = gen.timings
        result.timings.CopyFrom(
            pb.Timings(
                queue_seconds=event.queue_seconds,
                first_frame_seconds=t.get("first_frame_s", 0.0),
                denoise_seconds=t.get("denoise_s", 0.0),
                decode_seconds=t.get("decode_s", 0.0),
                encode_seconds=encode_s,
                total_seconds=time.monotonic() - job.enqueued_at,
            )
        )
        return result

    # -- models ------------------------------------------------------------------------------------
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        r = self.manager.rollout_view()
        return pb.ListModelsResponse(
            models=[
                model_to_pb(m) for m in sorted(self.manager.models(), key=lambda m: (m.id != "base", m.id))
            ],
            # the view's per-role traffic counts feed the heartbeat, not the API
            rollout=pb.Rollout(**{k: v for k, v in r.items() if k != "traffic"}),
        )

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        if not request.id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "id is empty: pass 'base' or a checkpoint id"
            )
        try:
            model = self.manager.get(request.id)
        except UnknownCheckpoint as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise  # unreachable: abort raises
        return pb.GetModelResponse(model=model_to_pb(model))
