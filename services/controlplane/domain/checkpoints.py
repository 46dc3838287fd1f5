"""Checkpoints: published by the trainer under ``checkpoints/{id}/`` with ``manifest.json`` written last.

A checkpoint without a manifest does not exist. Ids are ``ckpt-<finetune_id>-<step>``.
"""

from __future__ import annotations

import builtins
from datetime import datetime, timedelta
from typing import Any

from services.common.records import keys
from services.common.records.listing import published_checkpoints
from services.common.store import ObjectNotFound, ObjectReader, ObjectStore
from services.controlplane.domain.errors import InvalidRequest, NotFound
from services.controlplane.domain.util import Clock, iso, paginate, read_json, read_json_or_none, utcnow

manifest_key = keys.checkpoint_manifest_key
SAMPLES_JSON = "samples/samples.json"  # written by huvidpo.training.samples into the checkpoint


class CheckpointService:
    def __init__(self, store: ObjectStore, clock: Clock = utcnow) -> None:
        self.store = store
        self.clock = clock

    def _check_id(self, checkpoint_id: str) -> tuple[str, int]:
        parsed = keys.parse_checkpoint_id(checkpoint_id)
        if parsed is None:
            raise NotFound(f"checkpoint {checkpoint_id!r} not found")
        return parsed

    def manifest(self, checkpoint_id: str) -> dict[str, Any]:
        self._check_id(checkpoint_id)
        manifest: dict[str, Any] = read_json(
            self.store, manifest_key(checkpoint_id), f"checkpoint {checkpoint_id!r}"
        )
        return manifest

    def exists(self, checkpoint_id: str) -> bool:
        return keys.parse_checkpoint_id(checkpoint_id) is not None and self.store.exists(
            manifest_key(checkpoint_id)
        )

    def get(self, checkpoint_id: str) -> dict[str, Any]:
        finetune_id, step = self._check_id(checkpoint_id)
        manifest = self.manifest(checkpoint_id)
        lineage = dict(manifest.get("lineage") or {})
        return {
            "id": checkpoint_id,
            "finetune_id": lineage.get("finetune_id") or finetune_id,
            "step": int(manifest.get("step") or step),
            "created_at": manifest.get("created_at"),
            "files": manifest.get("files", {}),
            "lineage": lineage,
            "samples": self._samples(checkpoint_id, manifest),
        }

    def _samples(self, checkpoint_id: str, manifest: dict[str, Any]) -> builtins.list[dict[str, Any]]:
        """The sample videos the trainer rendered into the checkpoint (``samples/samples.json``;
        read only when the manifest names it), each with the URL that serves it."""
        items = self._sample_items(checkpoint_id, manifest)
        return [
            {"index": int(it["index"]), "prompt": str(it.get("prompt", "")), "seed": int(it.get("seed", 0)),
             "url": f"/v1/checkpoints/{checkpoint_id}/samples/{int(it['index'])}"}
            for it in items
        ]  # fmt: skip

    def _sample_items(self, checkpoint_id: str, manifest: dict[str, Any]) -> builtins.list[dict[str, Any]]:
        files = manifest.get("files", {})
        if SAMPLES_JSON not in files:
            return []
        try:
            data = read_json_or_none(self.store, keys.checkpoint_prefix(checkpoint_id) + SAMPLES_JSON)
        except ValueError:  # not JSON: the checkpoint is still shown, without samples
            return []
        items = data.get("items") if isinstance(data, dict) else None
        # Only well-formed samples whose video the checkpoint holds.
        return [
            it
            for it in (items if isinstance(items, list) else [])
            if isinstance(it, dict) and isinstance(it.get("index"), int) and it.get("video") in files
        ]

    def sample_video(self, checkpoint_id: str, index: int) -> ObjectReader:
        """An open reader of sample ``index``'s mp4 (``NotFound`` for a checkpoint or index without one)."""
        items = self._sample_items(checkpoint_id, self.manifest(checkpoint_id))
        video = next((it["video"] for it in items if it.get("index") == index), None)
        if video is None:
            raise NotFound(f"checkpoint {checkpoint_id!r} has no sample {index}")
        try:
            return self.store.open_read(keys.checkpoint_prefix(checkpoint_id) + str(video))
        except ObjectNotFound as exc:
            raise NotFound(f"checkpoint {checkpoint_id!r} has no sample {index}") from exc

    def list(
        self, finetune_id: str | None = None, page_size: int = 50, page_token: str | None = None
    ) -> tuple[builtins.list[dict[str, Any]], str | None]:
        ids = [cid for _, _, cid in published_checkpoints(self.store, finetune_id)]
        ids.sort(key=_order)  # the page token's order
        page, token = paginate(ids, _order, page_size, page_token)
        return [self.get(c) for c in page], token

    def delete(self, checkpoint_id: str) -> None:
        """Delete a checkpoint, manifest first (it stops existing before its files go). Whether it may
        be deleted is ``domain/retention.py``'s question, asked (NotFound included) before this."""
        self.store.delete(manifest_key(checkpoint_id))
        self.store.delete_prefix(keys.checkpoint_prefix(checkpoint_id))

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
            rel: self.store.presigned_get_url(keys.checkpoint_prefix(checkpoint_id) + rel, expires, base_url)
            for rel in sorted(manifest.get("files", {}))
        }
        urls["manifest.json"] = self.store.presigned_get_url(manifest_key(checkpoint_id), expires, base_url)
        deadline: datetime = self.clock() + expires
        return {"id": checkpoint_id, "urls": urls, "expires_at": iso(deadline)}


def _order(cid: str) -> str:
    parsed = keys.parse_checkpoint_id(cid)
    assert parsed is not None
    return f"{parsed[0]}|{parsed[1]:010d}"
