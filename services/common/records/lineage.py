"""Identity and lineage: the one digest, the ``Lineage`` a checkpoint carries, and the manifests of
the two publications it links (a dataset version, a checkpoint).

``content_digest`` is the identity of every published directory (a dataset version, a base model, a
checkpoint): sha256 over the sorted ``path \\0 sha256 \\0 size`` lines of its file listing, the
``files`` mapping its manifest holds. ``huvidpo.models.directory_digest`` is the same digest of a
local directory (the library sits below the services and cannot import this; a test keeps the two
equal), so a model hashed on disk and the same model published in the store have one identity.

The walk dataset version → fine-tune → checkpoint → rollout → generation is one chain of equal
``dataset_digest`` and ``base_model_digest`` values (tests/e2e/test_lineage.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


def content_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 (hex) over the sorted ``path \\0 sha256 \\0 size`` lines of a file listing
    (``{relpath: {"sha256", "size"}}``, a manifest's ``files``)."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(f"{path}\0{files[path]['sha256']}\0{files[path]['size']}\n".encode())
    return h.hexdigest()


class FileEntry(BaseModel):
    """One file of a publication. ``key``: where the bytes are when they are not under the
    publication's own prefix (a dataset version referencing its staged upload or a base version's
    file); absent otherwise."""

    model_config = ConfigDict(extra="ignore")

    sha256: str
    size: int
    key: str | None = None

    @model_serializer(mode="wrap")
    def _without_absent_key(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if out.get("key") is None:
            out.pop("key", None)
        return out


class Lineage(BaseModel):
    """Where a checkpoint comes from. Digests are ``content_digest`` values; extra keys (the
    library's ``stage``, say) are kept."""

    model_config = ConfigDict(extra="allow")

    dataset: str | None = None
    dataset_digest: str | None = None
    base_model: str | None = None
    base_model_digest: str | None = None
    finetune_id: str | None = None
    job: str | None = None
    config: dict[str, Any] | None = None


class _Manifest(BaseModel):
    # allow: a manifest is read by services of other versions; what one does not know, it keeps.
    model_config = ConfigDict(extra="allow")

    files: dict[str, FileEntry]

    def content_digest(self) -> str:
        return content_digest({k: v.model_dump() for k, v in self.files.items()})


class DatasetVersionManifest(_Manifest):
    """``datasets/{name}/{digest}/manifest.json``: ``id`` is the version's ``content_digest``, written
    by the control plane's commit through ``services.common.publish.write_manifest`` (the checkpoint's
    path too). The counts describe the records; ``source`` is how the version was made (an upload, a
    base version plus changes)."""

    id: str
    dataset: str
    digest: str | None = None
    videos: int = 0
    prompts: int = 0
    raters: int = 0
    rating_records: int = 0
    size: int = 0
    source: dict[str, Any] = Field(default_factory=dict)
    created_at: str | None = None
    created_by: str = ""
    """Who made the version (the bearer token's name); "" before versions recorded it."""


class ModelManifest(_Manifest):
    """``models/{id}/manifest.json`` as ``POST /v1/models`` writes it: each file's ``key`` is where it
    was staged (``models/{id}/uploads/{upload_id}/...``). ``unet`` is ``video`` (a VideoUNet) or
    ``image`` (an SD-1.x 2D UNet, inflated when loaded). Models published with ``publish_dir`` carry
    only ``files`` and what their publisher added."""

    id: str
    unet: str | None = None
    description: str = ""
    created_at: str | None = None
    created_by: str = ""


class CheckpointManifest(_Manifest):
    """``checkpoints/{id}/manifest.json``: ``adapter/`` for inference, ``state/`` for resuming. The
    published directory is ``huvidpo.training``'s checkpoint directory as written, and this is its
    ``manifest.json`` too (the library writes the same shape; publishing sets ``id`` and ``lineage``)."""

    id: str
    step: int
    lineage: Lineage
    created_at: str | None = None
