"""A bounded request queue and the single model thread that drains it in dynamic batches.

Requests are ``Job``s submitted from the asyncio event loop. One worker thread takes the oldest job
plus every queued job with the same ``BatchKey`` (checkpoint, frames, size, steps, guidance), up to
``max_batch``, waiting at most ``batch_wait_s`` after the oldest one arrived for companions, and runs
them as one ``generate_batch`` call. Only this thread runs the model, so one model call happens at a
time. Events go back to each job's asyncio queue through ``call_soon_threadsafe``.

Cancellation: ``should_stop`` is checked by the pipeline before every denoising step. When any job of
a running batch has been cancelled (or passed its deadline), the batch stops within one step; the
stopped jobs end with ``Cancelled`` and the others go back to the front of the queue to run again.

Drain (SIGTERM, services/inference/drain.py): ``drain`` refuses new jobs with ``Draining`` while
the queued and running ones go on; ``wait_idle`` says when none is left; ``stop`` then ends whatever
the drain deadline did not let finish with ``Draining`` too (UNAVAILABLE: retry on another replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from huvidpo.pipeline import GenerationCancelled, GenerationResult
from services.inference.errors import Cancelled, Draining, InferenceError, QueueFull
from services.inference.metrics import InferenceMetrics
from services.inference.validation import GenerationSpec

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
DRAINING_MESSAGE = (
    "this replica is draining (shutting down) and takes no new requests; retry on another replica"
)
StopFn = Callable[[], bool]


@dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys can share one UNet batch."""

    checkpoint_id: str
    frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float


@dataclass(frozen=True)
class ProgressEvent:
    step: int
    total: int
    queue_position: int


@dataclass(frozen=True)
class ResultEvent:
    result: GenerationResult
    batch_size: int
    queue_seconds: float


@dataclass(frozen=True)
class ErrorEvent:
    error: BaseException


Event = ProgressEvent | ResultEvent | ErrorEvent


class Job:
    """One request on its way through the queue and the model thread."""

    def __init__(
        self,
        spec: GenerationSpec,
        checkpoint_id: str,
        loop: asyncio.AbstractEventLoop,
        deadline: float | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.spec = spec
        self.checkpoint_id = checkpoint_id
        self.key = BatchKey(
            checkpoint_id, spec.frames, spec.height, spec.width, spec.steps, spec.guidance_scale
        )
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.deadline = deadline  # time.monotonic() value, or None
        self.enqueued_at = time.monotonic()
        self.started_at: float | None = None
        self.left_queue_at: float | None = None  # first time it left the queue (run or dropped)
        self.queue_position = 0
        self._loop = loop
        self._cancelled = threading.Event()
        # Set when the server (not the client) ends the job: the error it then ends with.
        self._ended_by: InferenceError | None = None

    def cancel(self, error: InferenceError | None = None) -> None:
        """Stop the job; ``error``: the server ends it (shutdown), else the client went away."""
        if error is not None and self._ended_by is None:
            self._ended_by = error
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def should_stop(self) -> bool:
        return self._cancelled.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)

    def stop_reason(self) -> str:
        return "cancelled by the client" if self._cancelled.is_set() else "deadline exceeded"

    def stopped(self, detail: str) -> InferenceError:
        """The error that ends this stopped job: the server's when it ended it, else
        ``request <why><detail>``, flagged when it is the deadline (not the client) that stopped it."""
        if self._ended_by is not None:
            return self._ended_by
        return Cancelled(
            f"request {self.stop_reason()}{detail}", deadline_exceeded=not self._cancelled.is_set()
        )

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to the job's asyncio queue (from any thread)."""
        # RuntimeError: the event loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)


ExecuteFn = Callable[[list[Job], ProgressFn, StopFn], list[GenerationResult]]


class Batcher:
    """The bounded queue (``max_queue`` waiting jobs) and its model thread."""

    def __init__(
        self,
        execute: ExecuteFn,
        max_queue: int,
        max_batch: int,
        batch_wait_s: float,
        metrics: InferenceMetrics,
        after_batch: Callable[[], None] | None = None,
        max_batch_pixels: int | None = None,
    ) -> None:
        self._execute = execute
        self.max_queue = max_queue
        self.max_batch = max_batch
        # Cost budget of one batch, in decoded pixels (frames x height x width summed over its videos):
        # a batch of large videos holds fewer of them. None: ``max_batch`` alone.
        self.max_batch_pixels = max_batch_pixels
        self.batch_wait_s = batch_wait_s
        self._metrics = metrics
        self._after_batch = after_batch
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False
        self._thread = threading.Thread(target=self._worker, name="huvidpo-model", daemon=True)

    # -- event-loop side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; ``QueueFull`` when ``max_queue`` jobs are already waiting."""
        with self._cond:
            if self._stopping or self._draining:
                raise Draining(DRAINING_MESSAGE)
            if len(self._pending) >= self.max_queue:
                raise QueueFull(
                    f"the request queue is full ({len(self._pending)} of {self.max_queue} waiting); retry later"
                )
            self._pending.append(job)
            self._positions_changed()
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Stop ``job``: dropped from the queue now, or its batch stops before the next step."""
        job.cancel()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self._left_queue(job)
                job.emit(ErrorEvent(job.stopped(" while queued")))
                self._positions_changed()
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Refuse new jobs (``Draining``); the queued and running ones go on."""
        with self._cond:
            self._draining = True

    @property
    def idle(self) -> bool:
        """No job queued or running."""
        with self._cond:
            return not self._pending and not self._running

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :attr:`idle`; whether it is."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._running:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def stop(self, timeout: float = 30.0) -> None:
        """End everything left (``Draining``: the client may retry elsewhere) and the model thread."""
        shutdown = Draining(
            "this replica shut down before the request could finish (drain deadline reached); "
            "retry on another replica"
        )
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.cancel(shutdown)
                self._left_queue(job)
                job.emit(ErrorEvent(shutdown))
            self._pending.clear()
            for job in self._running:
                job.cancel(shutdown)
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _left_queue(self, job: Job, now: float | None = None) -> None:
        """(lock held or model thread) Observe the job's queue wait once, when it first leaves."""
        if job.left_queue_at is None:
            job.left_queue_at = time.monotonic() if now is None else now
            self._metrics.queue_wait_seconds.observe(job.left_queue_at - job.enqueued_at)

    # -- model-thread side -------------------------------------------------------------------------
    def _positions_changed(self) -> None:
        """(lock held) Tell every waiting job whose place in the queue changed."""
        for i, job in enumerate(self._pending, start=1):
            if job.queue_position != i:
                job.queue_position = i
                job.emit(ProgressEvent(0, job.spec.steps, i))
        self._metrics.queued.set(len(self._pending))

    def _drop_stopped(self) -> None:
        """(lock held) Remove queued jobs whose client is gone or whose deadline passed."""
        for job in [j for j in self._pending if j.should_stop()]:
            self._pending.remove(job)
            self._left_queue(job)
            job.emit(ErrorEvent(job.stopped(" while queued")))

    def _take_batch(self) -> list[Job] | None:
        """(lock held) Wait for work, then take the oldest job and its compatible companions."""
        while True:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            self._drop_stopped()
            if not self._pending:
                self._positions_changed()
                self._cond.notify_all()  # wait_idle: dropped jobs may have been the last
                continue
            head = self._pending[0]
            compatible = [j for j in self._pending if j.key == head.key]
            limit = self.batch_limit(head.key)
            wait = head.enqueued_at + self.batch_wait_s - time.monotonic()
            if len(compatible) < limit and wait > 0 and limit > 1:
                # Give companions a moment to arrive; loop to re-check (cancellations, new arrivals).
                self._cond.wait(wait)
                continue
            batch = compatible[:limit]
            for job in batch:
                self._pending.remove(job)
            self._running = batch
            self._positions_changed()
            return batch

    def batch_limit(self, key: BatchKey) -> int:
        """How many videos of ``key``'s shape one batch may hold: ``max_batch``, fewer when their
        pixels exceed ``max_batch_pixels`` (at least one)."""
        if self.max_batch_pixels is None:
            return self.max_batch
        return max(1, min(self.max_batch, self.max_batch_pixels // (key.frames * key.height * key.width)))

    def _worker(self) -> None:
        while True:
            with self._cond:
                batch = self._take_batch()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            finally:
                with self._cond:
                    self._running = []
                    self._cond.notify_all()  # wait_idle
                if self._after_batch is not None:
                    try:
                        self._after_batch()
                    except Exception:
                        log.exception("after-batch hook failed")

    def _run_batch(self, batch: list[Job]) -> None:
        m = self._metrics
        start = time.monotonic()
        steps = batch[0].spec.steps
        for job in batch:
            job.started_at = start
            self._left_queue(job, start)
            job.queue_position = 0
            job.emit(ProgressEvent(0, steps, 0))
        m.in_flight.inc(len(batch))
        m.batch_size.observe(len(batch))

        def progress(step: int, total: int) -> None:
            m.denoising_steps.inc()
            for job in batch:
                job.emit(ProgressEvent(step, total, 0))

        def should_stop() -> bool:
            return any(job.should_stop() for job in batch)

        try:
            results = self._execute(batch, progress, should_stop)
        except GenerationCancelled as exc:
            stopped = [j for j in batch if j.should_stop()]
            survivors = [j for j in batch if not j.should_stop()]
            for job in stopped:
                job.emit(ErrorEvent(job.stopped(f"; generation stopped ({exc})")))
            if survivors:
                log.info(
                    "batch of %d stopped for %d cancelled request(s); re-queued %d",
                    len(batch),
                    len(stopped),
                    len(survivors),
                )
                with self._cond:
                    self._pending[0:0] = survivors
                    self._positions_changed()
                    self._cond.notify_all()
        except Exception as exc:
            log.exception("generation failed for a batch of %d", len(batch))
            for job in batch:
                job.emit(ErrorEvent(exc))
        else:
            elapsed = time.monotonic() - start
            denoise = results[0].timings.get("denoise_s", 0.0) if results else 0.0
            if denoise > 0:
                m.denoising_steps_per_second.set(steps * len(batch) / denoise)
            for job, result in zip(batch, results, strict=True):
                m.generation_seconds.labels(job.checkpoint_id).observe(elapsed)
                job.emit(ResultEvent(result, len(batch), start - job.enqueued_at))
        finally:
            m.in_flight.dec(len(batch))
