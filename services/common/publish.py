"""Atomic publication of directories (datasets, models, checkpoints) and the rollout record.

A published directory is a set of objects under a prefix plus ``prefix/manifest.json`` written LAST:
``{"files": {relpath: {"sha256", "size"}}, ...extra}``. A reader that finds no manifest treats the
prefix as not existing (``NotPublished``), so it never sees half of a checkpoint; a reader that finds
one verifies every file against it (``ChecksumMismatch`` naming the file).

The rollout record ``rollouts/{deployment}.json`` (docs/CONTRACTS.md) is what the inference service
follows. Its ``revision`` must increase with every write (``RevisionConflict`` otherwise). Several
control-plane replicas may write it at once, so ``write_rollout`` is a compare-and-swap on every
backend: it reads the record with its etag, checks the revision, and writes with ``if_match=etag``
(``if_none_match`` when there was no record). Of writers that read the same revision exactly one
wins; the others get ``RevisionConflict`` and their change is not stored (no lost update).
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.common.records import keys
from services.common.records.lineage import CheckpointManifest, DatasetVersionManifest, Lineage, ModelManifest
from services.common.store import (
    ChecksumMismatch,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    join_key,
    validate_key,
    validate_prefix,
)

MANIFEST_NAME = "manifest.json"
MAX_ROLLOUT_HISTORY = 200
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


class NotPublished(StoreError):
    """The prefix has no ``manifest.json``: nothing is published there (or not yet)."""

    def __init__(self, prefix: str) -> None:
        super().__init__(f"nothing published at {prefix} (no {MANIFEST_NAME})")
        self.prefix = prefix


class RevisionConflict(StoreError):
    """A rollout write did not increase the revision (someone else wrote first)."""


def _dir_prefix(prefix: str) -> str:
    prefix = validate_prefix(prefix)
    if not prefix:
        raise ValueError("a publication needs a non-empty prefix")
    return prefix if prefix.endswith("/") else prefix + "/"


def publish_dir(
    store: ObjectStore,
    local_dir: str | os.PathLike[str],
    prefix: str,
    extra_manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Upload every file of ``local_dir`` under ``prefix``, then ``prefix/manifest.json`` last.

    Returns the manifest written: ``{**extra_manifest, "files": {relpath: {"sha256", "size"}}}``
    (digests as computed while uploading). ``local_dir`` must not hold its own top-level
    ``manifest.json`` and ``extra_manifest`` must not define ``files``.
    """
    prefix = _dir_prefix(prefix)
    root = Path(local_dir)
    if not root.is_dir():
        raise NotADirectoryError(str(root))
    if (root / MANIFEST_NAME).exists():
        raise ValueError(f"{root} already contains {MANIFEST_NAME}, which publishing writes itself")
    extra = dict(extra_manifest or {})
    if "files" in extra:
        raise ValueError("extra_manifest must not define 'files'")
    manifest = {**extra, "files": _upload_files(store, root, prefix)}
    store.put_json(prefix + MANIFEST_NAME, manifest)
    return manifest


def _upload_files(store: ObjectStore, root: Path, prefix: str) -> dict[str, dict[str, Any]]:
    """Upload every file of ``root`` but a top-level ``manifest.json``; their ``{sha256, size}``."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_NAME:
            continue
        info = store.put_file(join_key(prefix, rel), path)
        files[rel] = {"sha256": info.sha256, "size": info.size}
    return files


def write_manifest(
    store: ObjectStore,
    prefix: str,
    manifest: CheckpointManifest | DatasetVersionManifest | ModelManifest,
    if_none_match: bool = False,
) -> None:
    """The last write of a publication (a checkpoint, a dataset version, a base model): its typed manifest at
    ``prefix/manifest.json``. Until it lands nothing is published there; every file it names must be
    stored already. ``if_none_match``: only if none is there yet (``PreconditionFailed`` otherwise),
    for publications named by their content, which two writers may race to publish."""
    store.put_json(
        _dir_prefix(prefix) + MANIFEST_NAME, manifest.model_dump(mode="json"), if_none_match=if_none_match
    )


def publish_checkpoint(
    store: ObjectStore,
    checkpoint_dir: str | os.PathLike[str],
    checkpoint_id: str,
    lineage: Lineage,
    created_at: str | None = None,
) -> CheckpointManifest:
    """Upload a training checkpoint directory (``huvidpo.training.checkpoint``: ``adapter/``,
    ``state/``, ``manifest.json``) to ``checkpoints/{checkpoint_id}/`` as it lies, then the
    publication manifest last, in place of the library's own: ``id`` and ``lineage`` are the
    publication's, ``step`` and ``files`` the checkpoint's. A file that no longer matches the
    checkpoint's manifest (changed on disk since it was written) raises ``ChecksumMismatch`` and
    nothing is published."""
    root = Path(checkpoint_dir)
    local = json.loads((root / MANIFEST_NAME).read_text())
    prefix = _dir_prefix(keys.checkpoint_prefix(checkpoint_id))
    files = _upload_files(store, root, prefix)
    for rel in sorted(set(files) | set(local["files"])):
        want, got = local["files"].get(rel), files.get(rel)
        if want != got:
            raise ChecksumMismatch(
                join_key(prefix, rel), str((want or {}).get("sha256")), str((got or {}).get("sha256"))
            )
    manifest = CheckpointManifest.model_validate(
        {
            "id": checkpoint_id,
            "step": local["step"],
            "lineage": lineage,
            "created_at": created_at,
            "files": files,
        }
    )
    write_manifest(store, prefix, manifest)
    return manifest


def read_manifest(store: ObjectStore, prefix: str) -> dict[str, Any]:
    """The manifest at ``prefix`` (``NotPublished`` if there is none)."""
    prefix = _dir_prefix(prefix)
    try:
        manifest = store.get_json(prefix + MANIFEST_NAME)
    except ObjectNotFound as exc:
        raise NotPublished(prefix) from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise StoreError(f"{prefix}{MANIFEST_NAME} is not a manifest (no 'files' mapping)")
    return manifest


def is_published(store: ObjectStore, prefix: str) -> bool:
    return store.exists(_dir_prefix(prefix) + MANIFEST_NAME)


def fetch_published(
    store: ObjectStore, prefix: str, local_dir: str | os.PathLike[str], keep_manifest: bool = False
) -> dict[str, Any]:
    """Download a publication into ``local_dir``, verifying each file's sha256 and size (with
    ``keep_manifest`` its ``manifest.json`` too, written last: a published checkpoint downloaded so
    is a ``huvidpo.training`` checkpoint directory).

    Raises ``NotPublished`` without a manifest, ``ChecksumMismatch`` (naming the file) if a file
    differs from its manifest entry, ``InvalidKey`` if the manifest names an unsafe path. Each file
    appears atomically; a failed file is not left behind. Returns the manifest.
    """
    prefix = _dir_prefix(prefix)
    manifest = read_manifest(store, prefix)
    root = Path(local_dir)
    for rel, entry in sorted(manifest["files"].items()):
        validate_key(rel)  # a manifest must not steer a write outside local_dir
        # A file the publication references where it already lies (a dataset version's staged upload).
        key = validate_key(str(entry["key"])) if entry.get("key") else prefix + rel
        dest = root.joinpath(*rel.split("/"))
        info = store.get_file(key, dest, expected_sha256=str(entry["sha256"]))
        if info.size != int(entry["size"]):
            dest.unlink()
            raise ChecksumMismatch(key, f"{entry['size']} bytes", f"{info.size} bytes")
    if keep_manifest:
        (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


# -------------------------------------------------------------------------------------------- rollouts
def validate_deployment(name: str) -> str:
    """``name`` if it is a valid deployment name (1-63 of a-z 0-9 . _ -, alphanumeric ends)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"deployment must be 1-63 chars of a-z, 0-9, '.', '_' or '-', alphanumeric at both ends: {name!r}"
        )
    return name


class RolloutEvent(BaseModel):
    """One entry of a rollout's history: the state a revision set, and why."""

    model_config = ConfigDict(extra="ignore")

    revision: int
    action: str
    current: str | None = None
    canary: str | None = None
    canary_percent: int = 0
    updated_at: datetime
    reason: str | None = None
    # The name of the token that made the change ("" when written by a tool or before names).
    actor: str = ""
    # A rollout gate's decision ("promote" | "rollback" | "wait") and why; None for a manual change.
    decision: str | None = None
    reasons: list[str] = Field(default_factory=list)


class RolloutRecord(BaseModel):
    """``rollouts/{deployment}.json``: which checkpoint a deployment serves, and its canary.

    ``revision`` increases by one on every change (``next`` builds the following record);
    ``history`` keeps the last ``MAX_ROLLOUT_HISTORY`` events, oldest first.
    """

    model_config = ConfigDict(extra="ignore")

    deployment: str
    revision: int = Field(default=0, ge=0)
    current: str | None = None
    canary: str | None = None
    canary_percent: int = Field(default=0, ge=0, le=100)
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    history: list[RolloutEvent] = Field(default_factory=list)
    # The canary's promotion policy (checked by the control plane's rollout gate), while it has one.
    policy: dict[str, Any] | None = None

    @field_validator("deployment")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_deployment(value)

    @model_validator(mode="after")
    def _canary(self) -> RolloutRecord:
        if self.canary is None and self.canary_percent != 0:
            raise ValueError("canary_percent must be 0 when there is no canary")
        return self

    def next(
        self,
        action: str,
        *,
        current: str | None,
        canary: str | None = None,
        canary_percent: int = 0,
        reason: str | None = None,
        now: datetime | None = None,
        actor: str = "",
        policy: dict[str, Any] | None = None,
        decision: str | None = None,
        reasons: list[str] | None = None,
    ) -> RolloutRecord:
        """The record after this change: revision + 1, a new ``updated_at``, the event appended."""
        when = now or datetime.now(UTC)
        event = RolloutEvent(
            revision=self.revision + 1,
            action=action,
            current=current,
            canary=canary,
            canary_percent=canary_percent,
            updated_at=when,
            reason=reason,
            actor=actor,
            decision=decision,
            reasons=list(reasons or []),
        )
        return RolloutRecord(
            deployment=self.deployment,
            revision=self.revision + 1,
            current=current,
            canary=canary,
            canary_percent=canary_percent,
            updated_at=when,
            history=[*self.history, event][-MAX_ROLLOUT_HISTORY:],
            policy=policy,
        )


def rollout_key(deployment: str) -> str:
    return keys.rollout_key(validate_deployment(deployment))


def _read_rollout_with_etag(store: ObjectStore, deployment: str) -> tuple[RolloutRecord | None, str | None]:
    try:
        data, etag = store.get_json_with_etag(rollout_key(deployment))
    except ObjectNotFound:
        return None, None
    return RolloutRecord.model_validate(data), etag


def read_rollout(store: ObjectStore, deployment: str) -> RolloutRecord | None:
    """The deployment's rollout record, or None if none was ever written."""
    return _read_rollout_with_etag(store, deployment)[0]


def _landed(stored: RolloutRecord | None, record: RolloutRecord) -> bool:
    """Whether ``record`` was written after all: ``stored`` is it, or a later record built on it."""
    if stored is None or stored.revision < record.revision:
        return False
    if stored == record:
        return True
    mine = record.history[-1] if record.history else None
    return mine is not None and any(e == mine for e in stored.history)


def write_rollout(store: ObjectStore, record: RolloutRecord) -> RolloutRecord:
    """Write ``record`` if its revision is above the stored one (``RevisionConflict`` otherwise).

    Safe with several writers on any backend: the record is read with its etag and written only if
    it still has that etag (``if_none_match`` when there is none yet), so of several writers that
    read the same revision exactly one succeeds and the others get ``RevisionConflict``.
    """
    if record.revision < 1:
        raise RevisionConflict("a written rollout record needs revision >= 1 (use RolloutRecord.next)")
    key = rollout_key(record.deployment)
    stored, etag = _read_rollout_with_etag(store, record.deployment)
    if stored is not None and record.revision <= stored.revision:
        raise RevisionConflict(
            f"rollout {record.deployment}: revision {record.revision} is not above the stored "
            f"revision {stored.revision}; re-read and retry"
        )
    if stored is not None and etag is None:
        raise StoreError(f"{key} has no etag: {store!r} cannot compare-and-swap it")
    try:
        if stored is None:
            store.put_json(key, record.model_dump(mode="json"), if_none_match=True)
        else:
            store.put_json(key, record.model_dump(mode="json"), if_match=etag)
    except PreconditionFailed as exc:
        # Someone wrote between the read and the write. Unless the stored record is ours after all
        # (a retried request whose first attempt landed, or a store that cannot tell), we lost.
        now = read_rollout(store, record.deployment)
        if _landed(now, record):
            return record
        raise RevisionConflict(
            f"rollout {record.deployment}: changed by another writer while revision {record.revision} "
            f"was being written (now at revision {now.revision if now else 'none'}); re-read and retry"
        ) from exc
    return record


__all__ = [
    "MANIFEST_NAME",
    "NotPublished",
    "RevisionConflict",
    "RolloutEvent",
    "RolloutRecord",
    "fetch_published",
    "is_published",
    "publish_checkpoint",
    "publish_dir",
    "read_manifest",
    "read_rollout",
    "rollout_key",
    "validate_deployment",
    "write_manifest",
    "write_rollout",
]
