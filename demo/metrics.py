"""What the demo draws from a fine-tune's training metrics.

The metrics are the body of ``GET /v1/fine-tunes/{id}/metrics`` (``Client.fine_tunes.metrics``,
``huvidpo fine-tunes metrics ID``; docs/CONTRACTS.md): ``{"finetune_id", "steps": [int], "metrics":
{"loss": [...], "implicit_acc": [...], ...}}``, every list aligned with ``steps``.
"""

from __future__ import annotations

from typing import Any


def metric_rows(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The metrics body as one row per step (``{"step": s, "loss": ..., ...}``, nulls left out), the
    rows :func:`huvidpo.training.plot_metrics` draws."""
    rows = []
    for i, step in enumerate(body["steps"]):
        row: dict[str, Any] = {"step": step}
        row.update({k: v[i] for k, v in body["metrics"].items() if i < len(v) and v[i] is not None})
        rows.append(row)
    return rows
