"""Progress events (``finetunes/{id}/progress.jsonl``): a typed union the trainer writes and the
control plane, the demo and the plot read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.records.progress import (
    CheckpointEvent,
    EndEvent,
    ProgressEvent,
    StartEvent,
    StepEvent,
    attempts,
    parse_event,
    parse_progress,
)
from services.common.store import LocalStore
from services.trainer.entry import ProgressWriter

EVENTS: list[ProgressEvent] = [
    StartEvent(time="2026-01-01T00:00:00Z", total_steps=10, resumed_from_step=None, attempt=1),
    StepEvent(
        time="2026-01-01T00:00:01Z",
        step=1,
        total_steps=10,
        epoch=0,
        loss=0.69,
        implicit_acc=0.5,
        reward_margin=0.01,
        step_seconds=1.5,
        samples_per_second=2.0,
        lr=1e-4,
    ),
    CheckpointEvent(time="2026-01-01T00:00:02Z", step=1, checkpoint_id="ckpt-ft-a-1"),
    EndEvent(time="2026-01-01T00:00:03Z", state="failed", exit_code=2, reason="DatasetError", message="x"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.event)
def test_every_event_kind_round_trips_through_its_line(event: ProgressEvent) -> None:
    line = event.to_line()
    assert json.loads(line)["event"] == event.event
    assert parse_event(line) == event
    assert parse_event(line).to_line() == line  # type: ignore[union-attr]


def test_a_line_written_before_the_types_parses() -> None:
    """Lines as the trainer wrote them before (no ``attempt``, nulls spelled out, a metric this reader
    does not know, keys in another order) still parse; a torn line and an unknown kind are skipped."""
    old = [
        '{"time": "t0", "event": "start", "total_steps": 10, "resumed_from_step": null}',
        '{"time": "t1", "event": "step", "total_steps": 10, "step": 2, "loss": 0.7, "grad_norm": 3.1}',
        '{"event": "checkpoint", "time": "t2", "step": 2, "checkpoint_id": "ckpt-ft-a-2"}',
        '{"time": "t3", "event": "end", "state": "succeeded", "exit_code": 0}',
        '{"time": "t4", "event": "heartbeat"}',
        '{"time": "t5", "event": "st',
    ]
    events = parse_progress("\n".join(old))
    assert [type(e) for e in events] == [StartEvent, StepEvent, CheckpointEvent, EndEvent]
    start, step, ckpt, end = events
    assert isinstance(start, StartEvent) and start.attempt is None and start.total_steps == 10
    assert isinstance(step, StepEvent) and step.step == 2 and step.loss == 0.7
    assert isinstance(ckpt, CheckpointEvent) and ckpt.checkpoint_id == "ckpt-ft-a-2"
    assert isinstance(end, EndEvent) and end.state == "succeeded" and end.exit_code == 0
    # What the trainer writes today is the same JSON: an unchanged line reads back unchanged.
    assert json.loads(start.to_line()) == json.loads(old[0])


def test_the_trainer_counts_attempts_from_typed_events(tmp_path: Path) -> None:
    """Start events are counted as events, whatever the JSON spacing of the line (another writer's, or
    a future trainer's), not by searching the text."""
    store = LocalStore(tmp_path / "s")
    lines = [
        '{"event":"start","time":"t0","total_steps":4}',
        json.dumps({"event": "end", "state": "failed", "exit_code": 75}),
        json.dumps({"event": "start", "total_steps": 4, "resumed_from_step": 2, "attempt": 2}),
    ]
    store.put_bytes("finetunes/ft-a/progress.jsonl", ("\n".join(lines) + "\n").encode())
    writer = ProgressWriter(store, "ft-a")
    assert writer.attempts() == 2
    writer.add(StartEvent(total_steps=4, resumed_from_step=2, attempt=writer.attempts() + 1))
    events = parse_progress(store.get_bytes("finetunes/ft-a/progress.jsonl").decode())
    assert attempts(events) == 3
    last = events[-1]
    assert isinstance(last, StartEvent) and last.attempt == 3 and last.time is not None
