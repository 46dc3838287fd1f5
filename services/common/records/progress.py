"""Progress events: what the trainer writes to ``finetunes/{id}/progress.jsonl``.

One JSON object per line, ``event`` names the kind (a tagged union):

- ``start``: an attempt begins (``total_steps``, ``resumed_from_step``, ``attempt``);
- ``step``: one optimizer step's metrics (``step``, ``loss``, ``implicit_acc``, ``reward_margin``, ...);
- ``checkpoint``: a checkpoint is published (``step``, ``checkpoint_id``);
- ``end``: the attempt ended (``state`` succeeded | failed | cancelled, ``exit_code``, ``reason``,
  ``message``; ``cancelled``: stopped after the user's cancel request, reason ``Cancelled``).

The trainer owns the object and rewrites it whole (object stores have no append). Readers tolerate a
missing object, a torn last line, fields they do not know (a newer trainer) and fields an older
trainer did not write; a line of an unknown kind is skipped.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from services.common.records.keys import progress_key
from services.common.store import ObjectNotFound, ObjectStore


def now() -> str:
    """The ``time`` of an event: UTC, ISO 8601 with a ``Z``."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _Event(BaseModel):
    # ignore: a newer trainer may add fields; an older reader must still read its lines.
    model_config = ConfigDict(extra="ignore")

    time: str | None = None

    def to_line(self) -> str:
        """The event as one JSON line (no newline): only the fields that were set, ``time`` and
        ``event`` first, the same JSON the trainer has always written."""
        full = self.model_dump(mode="json")
        body = {k: v for k, v in full.items() if k in self.model_fields_set and k not in ("time", "event")}
        return json.dumps({"time": full["time"], "event": full["event"], **body})


class StartEvent(_Event):
    event: Literal["start"] = "start"
    total_steps: int | None = None
    resumed_from_step: int | None = None
    attempt: int | None = None  # absent in lines written before it existed


class StepEvent(_Event):
    event: Literal["step"] = "step"
    step: int
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None
    implicit_acc: float | None = None
    reward_margin: float | None = None
    step_seconds: float | None = None
    samples_per_second: float | None = None
    lr: float | None = None


class CheckpointEvent(_Event):
    event: Literal["checkpoint"] = "checkpoint"
    step: int
    checkpoint_id: str


class EndEvent(_Event):
    event: Literal["end"] = "end"
    state: Literal["succeeded", "failed", "cancelled"]
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None


ProgressEvent = Annotated[StartEvent | StepEvent | CheckpointEvent | EndEvent, Field(discriminator="event")]
_ADAPTER: TypeAdapter[ProgressEvent] = TypeAdapter(ProgressEvent)


def parse_event(line: str) -> ProgressEvent | None:
    """One line as an event; None for a blank or torn line, or one of a kind this reader does not know."""
    if not line.strip():
        return None
    try:
        return _ADAPTER.validate_json(line)
    except ValidationError:
        return None


def parse_progress(text: str) -> list[ProgressEvent]:
    """Every readable event of a ``progress.jsonl`` text, in order."""
    return [ev for ev in map(parse_event, text.splitlines()) if ev is not None]


def read_progress(store: ObjectStore, finetune_id: str) -> list[ProgressEvent]:
    """The events of ``finetune_id`` (none when the trainer has not written any yet)."""
    try:
        return parse_progress(store.get_bytes(progress_key(finetune_id)).decode("utf-8", "replace"))
    except ObjectNotFound:
        return []


def attempts(events: list[ProgressEvent]) -> int:
    """How many attempts have started (a retry after a failure or a preemption is one more)."""
    return sum(1 for ev in events if isinstance(ev, StartEvent))
