"""The summary of a fine-tune's progress events (``services.common.records.progress``, written by
the trainer to ``finetunes/{id}/progress.jsonl``) that its view shows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

from services.common.records.progress import (
    CheckpointEvent,
    EndEvent,
    ProgressEvent,
    StartEvent,
    StepEvent,
    parse_progress,
    read_progress,
)

__all__ = [
    "ProgressSummary",
    "event_items",
    "events_page",
    "metrics_history",
    "parse_progress",
    "read_progress",
    "summarize",
]


@dataclass
class ProgressSummary:
    """What a client sees: step/total, latest loss and implicit reward accuracy, ETA in seconds."""

    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    reward_accuracy: float | None = None
    reward_margin: float | None = None
    eta_seconds: float | None = None
    attempts: int = 0
    resumed_from_step: int | None = None
    checkpoints: list[str] = field(default_factory=list)
    updated_at: str | None = None
    end: EndEvent | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": self.loss,
            "reward_accuracy": self.reward_accuracy,
            "reward_margin": self.reward_margin,
            "eta_seconds": self.eta_seconds,
            "attempts": self.attempts,
            "resumed_from_step": self.resumed_from_step,
            "updated_at": self.updated_at,
        }


def summarize(events: list[ProgressEvent]) -> ProgressSummary:
    """Fold progress events into a summary; ETA from the mean of the last 20 step times."""
    s = ProgressSummary()
    step_seconds: list[float] = []
    for ev in events:
        s.updated_at = ev.time or s.updated_at
        if isinstance(ev, StartEvent):
            s.attempts += 1
            s.total_steps = ev.total_steps if ev.total_steps is not None else s.total_steps
            if ev.resumed_from_step:
                s.resumed_from_step = ev.resumed_from_step
            s.end = None  # a retry after a failed attempt
        elif isinstance(ev, StepEvent):
            s.step = ev.step
            s.total_steps = ev.total_steps if ev.total_steps is not None else s.total_steps
            if ev.loss is not None:
                s.loss = ev.loss
            if ev.implicit_acc is not None:
                s.reward_accuracy = ev.implicit_acc
            if ev.reward_margin is not None:
                s.reward_margin = ev.reward_margin
            if ev.step_seconds is not None:
                step_seconds.append(ev.step_seconds)
        elif isinstance(ev, CheckpointEvent):
            s.checkpoints.append(ev.checkpoint_id)
        elif isinstance(ev, EndEvent):
            s.end = ev
    if s.total_steps is not None and step_seconds and s.end is None:
        s.eta_seconds = max(0.0, (s.total_steps - s.step) * fmean(step_seconds[-20:]))
    elif s.end is not None:
        s.eta_seconds = 0.0
    return s


def event_items(events: list[ProgressEvent], after: int = -1) -> list[dict[str, Any]]:
    """The events past position ``after`` as the API shows them: ``{"seq", "event", ...the fields the
    trainer wrote}``; ``seq`` is the event's 0-based position among the readable events of the log
    (the log only grows, so a position names the same event on every read)."""
    return [{"seq": i, **json.loads(ev.to_line())} for i, ev in enumerate(events) if i > after]


def events_page(events: list[ProgressEvent], after: int = -1, limit: int = 100) -> dict[str, Any]:
    """One page of ``event_items``: at most ``limit`` items after ``after``, and ``next_after`` (the
    last item's ``seq``, None when the page is empty)."""
    items = event_items(events, after)[:limit]
    return {"items": items, "next_after": items[-1]["seq"] if items else None}


# The numeric fields of a step event (all but the step itself), in their declared order.
STEP_METRICS = tuple(
    name
    for name, f in StepEvent.model_fields.items()
    if name != "step" and f.annotation in (int | None, float | None)
)


def metrics_history(events: list[ProgressEvent]) -> dict[str, Any]:
    """Every numeric field of the step events as series aligned with ``steps`` (ascending). A step
    logged again (an attempt resumed from an earlier checkpoint redoes it) keeps its latest values."""
    by_step: dict[int, StepEvent] = {}
    for ev in events:
        if isinstance(ev, StepEvent):
            by_step[ev.step] = ev
    steps = sorted(by_step)
    metrics = {name: [getattr(by_step[s], name) for s in steps] for name in STEP_METRICS}
    return {"steps": steps, "metrics": metrics}
