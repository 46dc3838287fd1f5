"""The published checkpoints in the store: one listing for the trainer (its resume point), the
fine-tune view and ``GET /v1/checkpoints``."""

from __future__ import annotations

from services.common.records.keys import CHECKPOINTS, MANIFEST, parse_checkpoint_id
from services.common.store import ObjectStore


def published_checkpoints(store: ObjectStore, finetune_id: str | None = None) -> list[tuple[str, int, str]]:
    """``(finetune_id, step, checkpoint_id)`` of every fully published checkpoint (its manifest is
    written last, so one without it does not exist yet), of ``finetune_id`` only when given, sorted
    by fine-tune id and then by step."""
    found = []
    for d in store.list_dirs(CHECKPOINTS):
        cid = d[len(CHECKPOINTS) : -1]
        parsed = parse_checkpoint_id(cid)
        if parsed is None or (finetune_id is not None and parsed[0] != finetune_id):
            continue
        if store.exists(d + MANIFEST):
            found.append((parsed[0], parsed[1], cid))
    return sorted(found)
