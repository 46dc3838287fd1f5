"""A fine-tune's training metrics as the REST API serves them, and what the demo draws from them.

:func:`finetune_metrics` returns the body of ``GET /v1/fine-tunes/{id}/metrics`` (docs/CONTRACTS.md):
``{"finetune_id", "steps": [int], "metrics": {"loss": [...], "implicit_acc": [...], ...}}``, every
list aligned with ``steps``. A control plane without that route (older than the route) answers 404 or
405; the demo then builds the same body from the trainer's step events in the store, so the plot
works against either.
"""

from __future__ import annotations

from typing import Any

from demo.client import ApiError, ControlPlaneClient
from services.common.records.progress import StepEvent, read_progress
from services.common.store import ObjectStore

# Numeric fields of a step event that are not ``step`` itself.
_FIELDS = tuple(
    name
    for name, f in StepEvent.model_fields.items()
    if name != "step" and f.annotation in (float | None, int | None)
)


def metrics_from_events(finetune_id: str, events: list[Any]) -> dict[str, Any]:
    """The metrics body from step events: the last attempt's value per step, in step order."""
    by_step: dict[int, StepEvent] = {}
    for ev in events:
        if isinstance(ev, StepEvent) and ev.loss is not None:
            by_step[ev.step] = ev
    steps = sorted(by_step)
    metrics = {name: [getattr(by_step[s], name) for s in steps] for name in _FIELDS}
    return {
        "finetune_id": finetune_id,
        "steps": steps,
        "metrics": {k: v for k, v in metrics.items() if any(x is not None for x in v)},
    }


def finetune_metrics(
    cp: ControlPlaneClient, store: ObjectStore | None, finetune_id: str
) -> tuple[dict[str, Any], str]:
    """``(metrics body, source)``: from ``GET /v1/fine-tunes/{id}/metrics`` (source ``"rest"``), or,
    where the control plane has no such route yet and ``store`` is given, from the events in the
    store (source ``"store"``)."""
    try:
        return dict(cp.call("GET", f"/v1/fine-tunes/{finetune_id}/metrics")), "rest"
    except ApiError as exc:
        if exc.status not in (404, 405) or store is None:
            raise
        # The fine-tune exists (the caller waited for it): a 404 here is the route, not the fine-tune.
        return metrics_from_events(finetune_id, read_progress(store, finetune_id)), "store"


def metric_rows(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The metrics body as one row per step (``{"step": s, "loss": ..., ...}``, nulls left out), the
    rows :func:`huvidpo.training.plot_metrics` draws."""
    rows = []
    for i, step in enumerate(body["steps"]):
        row: dict[str, Any] = {"step": step}
        row.update({k: v[i] for k, v in body["metrics"].items() if i < len(v) and v[i] is not None})
        rows.append(row)
    return rows
