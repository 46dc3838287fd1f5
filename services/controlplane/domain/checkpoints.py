"""Checkpoints: published by the trainer under ``checkpoints/{id}/`` with ``manifest.json`` written last.

A checkpoint without a manifest does not exist. Ids are ``ckpt-<finetune_id>-<step>``.
"""

from __future__ import annotations

import builtins
import re
from datetime import datetime, timedelta
from typing import Any

from services.common.store import ObjectStore
from services.controlplane.domain.errors import InvalidRequest, NotFound
from services.controlplane.domain.util import Clock, iso, paginate, read_json, utcnow

CHECKPOINT_RE = re.compile(r"^ckpt-(?P<finetune>[a-z0-9-]{1,63})-(?P<step>[0-9]{1,10})$")


def manifest_key(checkpoint_id: str) -> str:
    return f"checkpoints/{checkpoint_id}/manifest.json"


class CheckpointService:
    def __init__(self, store: ObjectStore, clock: Clock = utcnow) -> None:
        self.store = store
        self.clock = clock

    def _check_id(self, checkpoint_id: str) -> re.Match[str]:
        m = CHECKPOINT_RE.match(checkpoint_id or "")
        if m is None:
            raise NotFound(f"checkpoint {checkpoint_id!r} not found")
        return m

    def manifest(self, checkpoint_id: str) -> dict[str, Any]:
        self._check_id(checkpoint_id)
        manifest: dict[str, Any] = read_json(
            self.store, manifest_key(checkpoint_id), f"checkpoint {checkpoint_id!r}"
        )
        return manifest

    def exists(self, checkpoint_id: str) -> bool:
        return CHECKPOINT_RE.match(checkpoint_id or "") is not None and self.store.exists(
            manifest_key(checkpoint_id)
        )

    def get(self, checkpoint_id: str) -> dict[str, Any]:
        m = self._check_id(checkpoint_id)
        manifest = self.manifest(checkpoint_id)
        lineage = dict(manifest.get("lineage") or {})
        return {
            "id": checkpoint_id,
            "finetune_id": lineage.get("finetune_id") or m.group("finetune"),
            "step": int(manifest.get("step") or m.group("step")),
            "created_at": manifest.get("created_at"),
            "files": manifest.get("files", {}),
            "lineage": lineage,
        }

    def list(
        self, finetune_id: str | None = None, page_size: int = 50, page_token: str | None = None
    ) -> tuple[builtins.list[dict[str, Any]], str | None]:
        ids = []
        for d in self.store.list_dirs("checkpoints/"):
            cid = d[len("checkpoints/") : -1]
            m = CHECKPOINT_RE.match(cid)
            if m is None or (finetune_id is not None and m.group("finetune") != finetune_id):
                continue
            if self.store.exists(d + "manifest.json"):
                ids.append(cid)
        ids.sort(key=_order)
        page, token = paginate(ids, _order, page_size, page_token)
        return [self.get(c) for c in page], token

    def delete(self, checkpoint_id: str) -> None:
        """Delete a checkpoint, manifest first (it stops existing before its files go). Whether it may
        be deleted is ``domain/retention.py``'s question, asked before this."""
        self.manifest(checkpoint_id)
        self.store.delete(manifest_key(checkpoint_id))
        self.store.delete_prefix(f"checkpoints/{checkpoint_id}/")

    def download(
        self, checkpoint_id: str, expires_seconds: int = 3600, base_url: str | None = None
    ) -> dict[str, Any]:
        """Time-limited URLs for every file of the checkpoint (and its manifest); ``base_url`` is the
        address the client used (see ``ObjectStore.presigned_get_url``)."""
        if not 60 <= expires_seconds <= 7 * 24 * 3600:
            raise InvalidRequest("expires_seconds must be in [60, 604800]", field="expires_seconds")
        manifest = self.manifest(checkpoint_id)
        expires = timedelta(seconds=expires_seconds)
        urls = {
            rel: self.store.presigned_get_url(f"checkpoints/{checkpoint_id}/{rel}", expires, base_url)
            for rel in sorted(manifest.get("files", {}))
        }
        urls["manifest.json"] = self.store.presigned_get_url(manifest_key(checkpoint_id), expires, base_url)
        deadline: datetime = self.clock() + expires
        return {"id": checkpoint_id, "urls": urls, "expires_at": iso(deadline)}


def _order(cid: str) -> str:
    m = CHECKPOINT_RE.match(cid)
    assert m is not None
    return f"{m.group('finetune')}|{int(m.group('step')):010d}"
