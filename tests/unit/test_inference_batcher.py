"""The request queue and dynamic batching, driven with a fake model (no server, no torch model)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from huvidpo.pipeline import GenerationCancelled, GenerationResult
from services.inference.batcher import Batcher, ErrorEvent, Job, ProgressEvent, ResultEvent
from services.inference.errors import Cancelled, QueueFull
from services.inference.metrics import InferenceMetrics
from services.inference.validation import GenerationSpec


def spec(steps: int = 3, height: int = 64, seed: int = 0) -> GenerationSpec:
    return GenerationSpec("p", "", 4, height, 64, steps, 7.5, seed, "", 1, 8.0)


class FakeModel:
    """Runs ``steps`` steps of ``step_s`` seconds per batch, honouring ``should_stop`` like the pipeline."""

    def __init__(self, step_s: float = 0.01) -> None:
        self.step_s = step_s
        self.batches: list[list[str]] = []
        self.started = threading.Event()

    def __call__(self, jobs: list[Job], progress, should_stop) -> list[GenerationResult]:  # type: ignore[no-untyped-def]
        self.batches.append([j.id for j in jobs])
        total = jobs[0].spec.steps
        for i in range(total):
            if should_stop():
                raise GenerationCancelled(f"stopped after {i} of {total} steps")
            self.started.set()
            time.sleep(self.step_s)
            progress(i + 1, total)
        frames = np.zeros((4, 8, 8, 3), np.uint8)
        return [GenerationResult(frames, torch.zeros(1), j.spec.seed, {"denoise_s": 0.01}) for j in jobs]


async def drain(job: Job, timeout: float = 10.0) -> tuple[list[ProgressEvent], ResultEvent | ErrorEvent]:
    progress: list[ProgressEvent] = []
    while True:
        event = await asyncio.wait_for(job.events.get(), timeout)
        if isinstance(event, ProgressEvent):
            progress.append(event)
        else:
            return progress, event


def make(model: FakeModel, max_queue: int = 8, max_batch: int = 4, wait_s: float = 0.05) -> Batcher:
    b = Batcher(
        model, max_queue=max_queue, max_batch=max_batch, batch_wait_s=wait_s, metrics=InferenceMetrics()
    )
    b.start()
    return b


def test_compatible_requests_share_one_batch_and_others_do_not() -> None:
    async def run() -> None:
        model = FakeModel()
        b = make(model)
        loop = asyncio.get_running_loop()
        same = [Job(spec(seed=i), "ck", loop) for i in range(3)]
        other_size = Job(spec(height=128), "ck", loop)
        other_adapter = Job(spec(), "other", loop)
        for j in [*same, other_size, other_adapter]:
            b.submit(j)
        outs = await asyncio.gather(*(drain(j) for j in [*same, other_size, other_adapter]))
        b.stop()
        results = [o[1] for o in outs]
        assert all(isinstance(r, ResultEvent) for r in results)
        assert [r.batch_size for r in results if isinstance(r, ResultEvent)] == [3, 3, 3, 1, 1]
        assert sorted(len(x) for x in model.batches) == [1, 1, 3]
        assert [r.result.seed for r in results[:3] if isinstance(r, ResultEvent)] == [0, 1, 2]
        # progress reaches the last step for each request, in order
        steps = [p.step for p in outs[0][0] if p.queue_position == 0]
        assert steps == sorted(steps) and steps[-1] == 3

    asyncio.run(run())


def test_max_batch_caps_the_batch() -> None:
    async def run() -> None:
        model = FakeModel()
        b = make(model, max_batch=2)
        loop = asyncio.get_running_loop()
        jobs = [Job(spec(), "ck", loop) for _ in range(5)]
        for j in jobs:
            b.submit(j)
        await asyncio.gather(*(drain(j) for j in jobs))
        b.stop()
        assert [len(x) for x in model.batches] == [2, 2, 1]

    asyncio.run(run())


def test_queue_full_raises_and_positions_are_reported() -> None:
    async def run() -> None:
        model = FakeModel(step_s=0.05)
        b = make(model, max_queue=2, max_batch=1, wait_s=0)
        loop = asyncio.get_running_loop()
        running = Job(spec(steps=20), "ck", loop)
        b.submit(running)
        await asyncio.to_thread(model.started.wait, 5)
        q1, q2 = Job(spec(), "ck", loop), Job(spec(), "ck", loop)
        b.submit(q1)
        b.submit(q2)
        with pytest.raises(QueueFull, match=r"queue is full \(2 of 2 waiting\)"):
            b.submit(Job(spec(), "ck", loop))
        first = await asyncio.wait_for(q2.events.get(), 5)
        assert isinstance(first, ProgressEvent) and first.queue_position == 2
        b.cancel(running)
        _, end = await drain(running)
        assert isinstance(end, ErrorEvent) and isinstance(end.error, Cancelled)
        await asyncio.gather(drain(q1), drain(q2))
        b.stop()

    asyncio.run(run())


def test_cancel_stops_within_one_step_and_requeues_batch_mates() -> None:
    async def run() -> None:
        model = FakeModel(step_s=0.05)
        b = make(model, max_batch=2)
        loop = asyncio.get_running_loop()
        victim, mate = Job(spec(steps=40), "ck", loop), Job(spec(steps=40), "ck", loop)
        b.submit(victim)
        b.submit(mate)
        await asyncio.to_thread(model.started.wait, 5)
        await asyncio.sleep(0.12)
        b.cancel(victim)
        progress, end = await drain(victim)
        assert isinstance(end, ErrorEvent) and isinstance(end.error, Cancelled)
        assert max(p.step for p in progress) < 10  # stopped long before its 40 steps
        _, mate_end = await drain(mate)
        b.stop()
        assert isinstance(mate_end, ResultEvent) and mate_end.batch_size == 1
        assert [len(x) for x in model.batches] == [2, 1]

    asyncio.run(run())


def test_deadline_stops_a_queued_request() -> None:
    async def run() -> None:
        model = FakeModel(step_s=0.05)
        b = make(model, max_batch=1, wait_s=0)
        loop = asyncio.get_running_loop()
        long = Job(spec(steps=10), "ck", loop)
        b.submit(long)
        late = Job(spec(), "ck", loop, deadline=time.monotonic() + 0.1)
        b.submit(late)
        _, end = await drain(late)
        assert isinstance(end, ErrorEvent) and "deadline exceeded" in str(end.error)
        await drain(long)
        b.stop()
        assert len(model.batches) == 1

    asyncio.run(run())


def test_a_pixel_budget_holds_fewer_large_videos_per_batch() -> None:
    async def run() -> None:
        model = FakeModel()
        # 4 frames of 64x64 = 16,384 pixels a video: a budget of 2.5 videos takes 2 of the small
        # ones per batch, and a 128-high video (twice the pixels) alone.
        b = Batcher(
            model, max_queue=16, max_batch=4, batch_wait_s=0.05, metrics=InferenceMetrics(),
            max_batch_pixels=int(2.5 * 4 * 64 * 64),
        )  # fmt: skip
        b.start()
        loop = asyncio.get_running_loop()
        small = [Job(spec(seed=i), "ck", loop) for i in range(5)]
        large = [Job(spec(height=160), "ck", loop) for _ in range(2)]
        for j in [*small, *large]:
            b.submit(j)
        await asyncio.gather(*(drain(j) for j in [*small, *large]))
        b.stop()
        assert [len(x) for x in model.batches] == [2, 2, 1, 1, 1]
        assert b.batch_limit(small[0].key) == 2 and b.batch_limit(large[0].key) == 1

    asyncio.run(run())
