"""Progress records the trainer writes to ``finetunes/{id}/progress.jsonl`` and their summary.

One JSON object per line, ``event`` says which kind:

- ``{"event": "start", "time", "total_steps", "resumed_from_step", "attempt"}``
- ``{"event": "step", "time", "step", "total_steps", "loss", "implicit_acc", "reward_margin", "step_seconds"}``
- ``{"event": "checkpoint", "time", "step", "checkpoint_id"}``
- ``{"event": "end", "time", "state": "succeeded" | "failed" | "cancelled", "exit_code", "reason", "message"}``
  (``cancelled``: stopped after the user's cancel request, reason ``Cancelled``)

The trainer owns the object and rewrites it whole (object stores have no append); readers tolerate
a missing object and a torn last line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

from services.common.records.keys import progress_key
from services.common.store import ObjectNotFound, ObjectStore


def parse_progress(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # torn write of the last line
        if isinstance(rec, dict):
            records.append(rec)
    return records


def read_progress(store: ObjectStore, finetune_id: str) -> list[dict[str, Any]]:
    try:
        return parse_progress(store.get_bytes(progress_key(finetune_id)).decode("utf-8", "replace"))
    except ObjectNotFound:
        return []


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
    end: dict[str, Any] | None = None

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


def summarize(records: list[dict[str, Any]]) -> ProgressSummary:
    """Fold progress records into a summary; ETA from the mean of the last 20 step times."""
    s = ProgressSummary()
    step_seconds: list[float] = []
    for rec in records:
        ev = rec.get("event")
        s.updated_at = rec.get("time", s.updated_at)
        if ev == "start":
            s.attempts += 1
            s.total_steps = rec.get("total_steps", s.total_steps)
            if rec.get("resumed_from_step"):
                s.resumed_from_step = int(rec["resumed_from_step"])
            s.end = None  # a retry after a failed attempt
        elif ev == "step":
            s.step = int(rec.get("step", s.step))
            s.total_steps = rec.get("total_steps", s.total_steps)
            if rec.get("loss") is not None:
                s.loss = float(rec["loss"])
            if rec.get("implicit_acc") is not None:
                s.reward_accuracy = float(rec["implicit_acc"])
            if rec.get("reward_margin") is not None:
                s.reward_margin = float(rec["reward_margin"])
            if rec.get("step_seconds") is not None:
                step_seconds.append(float(rec["step_seconds"]))
        elif ev == "checkpoint" and rec.get("checkpoint_id"):
            s.checkpoints.append(str(rec["checkpoint_id"]))
        elif ev == "end":
            s.end = rec
    if s.total_steps is not None and step_seconds and s.end is None:
        s.eta_seconds = max(0.0, (int(s.total_steps) - s.step) * fmean(step_seconds[-20:]))
    elif s.end is not None:
        s.eta_seconds = 0.0
    return s
