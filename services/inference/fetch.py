"""Fetching models from the store into the local cache, verified before anything loads them.

A base model comes from a local directory or a ``models/{id}`` publication; a checkpoint from
``checkpoints/{id}/``. Every file is checked against its publication manifest (sha256 and size) while
it is downloaded into a temporary directory beside the cache, which is renamed into place only once
complete: a failed fetch leaves no half-written model behind. No torch here: loading and the smoke
generation are ``ModelManager``'s.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.publish import NotPublished, fetch_published
from services.common.records import keys
from services.common.store import ChecksumMismatch, InvalidKey, ObjectStore
from services.inference.errors import CheckpointRefused

# The only files a checkpoint may hold: weights in safetensors, never a pickle.
CHECKPOINT_FILES = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
# The sample videos the trainer renders into a checkpoint (huvidpo.training.samples): media and their
# JSON index, shown by the API and never loaded here.
SAMPLE_SUFFIXES = (".mp4", ".gif", ".png", ".json")


def _allowed_extra(path: str) -> bool:
    """``state/`` (the trainer's resume state) and ``samples/`` media; never loaded by inference."""
    if path.startswith("state/"):
        return True
    return path.startswith("samples/") and path.count("/") == 1 and path.endswith(SAMPLE_SUFFIXES)


@dataclass(frozen=True)
class FetchedCheckpoint:
    """A checkpoint's verified files in the cache."""

    adapter_dir: Path
    manifest: dict[str, Any]
    manifest_sha256: str


def _cache_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _ensure(cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir


def fetch_base_model(store: ObjectStore, source: str, cache_dir: Path) -> Path:
    """The directory of the base model: ``source`` itself if it is a local directory, else its
    publication in the store, downloaded and verified into ``cache_dir/models/``.

    Raises ``NotPublished`` if the store has no such publication (yet), ``ChecksumMismatch`` or
    another ``StoreError`` if the download fails."""
    local = Path(source)
    if local.is_dir():
        return local
    model_dir = cache_dir / "models" / _cache_name(source)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=_ensure(cache_dir)))
    try:
        fetch_published(store, source, tmp)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


def fetch_checkpoint(store: ObjectStore, checkpoint_id: str, cache_dir: Path) -> FetchedCheckpoint:
    """Download and verify ``checkpoints/{checkpoint_id}/`` into ``cache_dir/checkpoints/``.

    Raises ``CheckpointRefused`` (stage ``fetch`` or ``checksum``) if it is not published or a file
    differs from its manifest, and (stage ``files``) if it holds anything but the safetensors adapter,
    the trainer's ``state/`` and its ``samples/`` (mp4, gif, png, json); other store errors (an outage) propagate to be retried."""
    prefix = keys.checkpoint_prefix(checkpoint_id)
    dest = _ensure(cache_dir) / "checkpoints" / _cache_name(checkpoint_id)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache_dir))
    try:
        try:
            manifest = fetch_published(store, prefix, tmp)
        except NotPublished as exc:
            raise CheckpointRefused(checkpoint_id, str(exc), "fetch") from exc
        except (ChecksumMismatch, InvalidKey) as exc:
            raise CheckpointRefused(checkpoint_id, str(exc), "checksum") from exc
        files = set(manifest["files"])
        # state/ is the trainer's resume state (optimizer, RNG: JSON and safetensors), samples/ its
        # sample videos; neither is ever loaded here.
        unexpected = sorted(f for f in files - CHECKPOINT_FILES if not _allowed_extra(f))
        if unexpected:
            raise CheckpointRefused(
                checkpoint_id,
                f"unexpected files {unexpected}: a checkpoint holds only {sorted(CHECKPOINT_FILES)} "
                "(weights as safetensors, never pickles)",
                "files",
            )
        missing = sorted(CHECKPOINT_FILES - files)
        if missing:
            raise CheckpointRefused(checkpoint_id, f"missing files {missing}", "files")
        info = store.stat(keys.checkpoint_manifest_key(checkpoint_id))
        manifest_sha = (info.sha256 if info else None) or ""
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return FetchedCheckpoint(dest / "adapter", manifest, manifest_sha)
