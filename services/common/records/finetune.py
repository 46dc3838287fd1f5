"""A fine-tune in the store, split as Kubernetes splits an object (docs/CONTRACTS.md, "Store layout")::

    finetunes/{id}/spec.json     FineTuneSpec: what to train; written once at create, never changed
    finetunes/{id}/status.json   FineTuneStatus: what became of it; written only by the control plane
    finetunes/{id}/record.json   older stores: spec and status in one object (read, never written)

The spec is the trainer's only input. The status is written by every control-plane replica (requests,
the Job watch thread), so every write is a compare-and-swap on the stored object's etag
(``update_status``): a change is applied to the status as stored, and re-applied to the newer one
when another writer got there first, so no update is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

from services.common.records import keys
from services.common.records.hyperparameters import MODELS, Hyperparameters
from services.common.store import ObjectNotFound, ObjectStore, PreconditionFailed, StoreError

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Stage = Literal["dpo", "stage1"]

# Writers racing on one status each win a round; this many lost rounds means something is wrong.
MAX_CAS_ATTEMPTS = 50


class StatusConflict(Exception):
    """A status change lost ``MAX_CAS_ATTEMPTS`` compare-and-swap rounds in a row."""


class SpecConflict(Exception):
    """A different spec is already stored under this fine-tune id (specs are written once)."""


class PairsRef(BaseModel):
    """The compiled pairs a fine-tune trains on: ``pairs.jsonl`` and ``report.json`` under ``prefix``,
    compiled from the spec's dataset version with ``options`` (``huvidpo.data.pairs.PairOptions``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    prefix: str
    digest: str
    options: dict[str, Any] = Field(default_factory=dict)
    # With a hold-out (options' holdout_fraction > 0): the digest of ``heldout.jsonl`` beside the
    # pairs, which the trainer evaluates on and never trains on.
    heldout_digest: str | None = None


class FineTuneSpec(BaseModel):
    """What to train: the dataset version (and its compiled pairs), the base model, the stage and
    hyperparameters the control plane validated against the training library's config.

    ``hyperparameters`` is the stage's typed model (``records.hyperparameters``); the stored JSON holds
    only the options that were set, so the library's defaults apply to the rest."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    created_at: str
    dataset: str
    version: str
    base_model: str
    stage: Stage = "dpo"
    hyperparameters: Hyperparameters
    lineage: dict[str, str] = Field(default_factory=dict)
    fingerprint: str = ""
    pairs: PairsRef | None = None
    # The name of the token that created it ("" on records written before tokens had names).
    created_by: str = ""
    # The shape it trains on: world size = nodes x gpus_per_node trainer processes (older specs: 1x1).
    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=1, ge=1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @model_validator(mode="before")
    @classmethod
    def _typed_hyperparameters(cls, data: Any) -> Any:
        # The model depends on the stage: a mapping (as stored) becomes that stage's typed model.
        if isinstance(data, dict):
            stage = data.get("stage", "dpo")
            hp = data.get("hyperparameters") or {}
            if stage in MODELS and not isinstance(hp, BaseModel):
                data = {**data, "hyperparameters": MODELS[stage].model_validate(hp)}
        return data

    @field_serializer("hyperparameters")
    def _set_only(self, hp: Hyperparameters) -> dict[str, Any]:
        return hp.as_mapping()

    def request(self) -> dict[str, Any]:
        """The request fields as the REST view shows them."""
        return {
            "dataset": self.dataset,
            "version": self.version,
            "base_model": self.base_model,
            "stage": self.stage,
            "hyperparameters": self.hyperparameters.as_mapping(),
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "world_size": self.world_size,
        }


class FineTuneStatus(BaseModel):
    """What the control plane derived of the fine-tune (from its Job and the trainer's progress)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state: State = "queued"
    reason: str | None = None
    message: str | None = None
    submitted: bool = False
    job: dict[str, str] | None = None
    # Attempts started (a multi-process group restarted whole is a new attempt, started by the
    # control plane; an executor's own retry counters are not the budget: see executors/).
    attempt: int = 1
    cancel_requested_at: str | None = None
    finished_at: str | None = None
    updated_at: str


# ------------------------------------------------------------------------------------------- read
def _legacy(store: ObjectStore, finetune_id: str) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = store.get_json(keys.finetune_record_key(finetune_id))
    except ObjectNotFound:
        return None
    return record


def _spec_of_legacy(record: dict[str, Any]) -> FineTuneSpec:
    return FineTuneSpec.model_validate(
        {
            "id": record["id"],
            "created_at": record.get("created_at", ""),
            **record.get("request", {}),
            "lineage": record.get("lineage") or {},
            "fingerprint": record.get("fingerprint", ""),
        }
    )


def _status_of_legacy(record: dict[str, Any]) -> FineTuneStatus:
    updated = record.get("updated_at") or record.get("created_at") or ""
    return FineTuneStatus.model_validate({**record, "updated_at": updated})


def read_spec(store: ObjectStore, finetune_id: str) -> FineTuneSpec | None:
    """The fine-tune's spec, or None when there is no such fine-tune (an older store's
    ``record.json`` is read when ``spec.json`` is absent)."""
    try:
        return FineTuneSpec.model_validate(store.get_json(keys.finetune_spec_key(finetune_id)))
    except ObjectNotFound:
        pass
    record = _legacy(store, finetune_id)
    return None if record is None else _spec_of_legacy(record)


def _read_status_with_etag(store: ObjectStore, finetune_id: str) -> tuple[FineTuneStatus | None, str | None]:
    """(status, its etag); etag None when ``status.json`` does not exist yet (then the status of an
    older store's ``record.json``, if any, is the starting point and the first write creates it)."""
    try:
        data, etag = store.get_json_with_etag(keys.finetune_status_key(finetune_id))
    except ObjectNotFound:
        record = _legacy(store, finetune_id)
        return (None if record is None else _status_of_legacy(record)), None
    if etag is None:
        raise StoreError(
            f"{keys.finetune_status_key(finetune_id)} has no etag: {store!r} cannot compare-and-swap it"
        )
    return FineTuneStatus.model_validate(data), etag


def read_status(store: ObjectStore, finetune_id: str) -> FineTuneStatus | None:
    """The fine-tune's status as last written, or None when none was written yet."""
    return _read_status_with_etag(store, finetune_id)[0]


# ------------------------------------------------------------------------------------------ write
def write_spec(store: ObjectStore, spec: FineTuneSpec) -> FineTuneSpec:
    """Write the spec once (``if_none_match``). A retry of the same create (same fingerprint) finds
    its spec stored and returns it; any other spec under that id raises ``SpecConflict``."""
    try:
        store.put_json(keys.finetune_spec_key(spec.id), spec.model_dump(mode="json"), if_none_match=True)
    except PreconditionFailed as exc:
        stored = read_spec(store, spec.id)
        if stored is not None and stored.fingerprint == spec.fingerprint:
            return stored
        raise SpecConflict(f"fine-tune {spec.id} already has a different spec") from exc
    return spec


def _put_status(store: ObjectStore, key: str, status: FineTuneStatus, etag: str | None) -> None:
    """The one write of a status: conditional on the etag read (or on absence when there was none)."""
    value = status.model_dump(mode="json")
    if etag is None:
        store.put_json(key, value, if_none_match=True)
    else:
        store.put_json(key, value, if_match=etag)


def update_status(
    store: ObjectStore,
    finetune_id: str,
    change: Callable[[FineTuneStatus | None], FineTuneStatus | None],
) -> tuple[FineTuneStatus | None, FineTuneStatus | None]:
    """Apply ``change`` to the stored status with compare-and-swap; returns ``(before, after)`` of
    the round that landed (``after is before`` when ``change`` returned None: nothing to write).

    ``change`` gets the status as stored (None when none exists) and returns the new status, or None
    to leave it; it may raise to refuse. When another writer changed the status between the read and
    the write, the status is read again and ``change`` applied again, so it must be a pure function
    of its argument (and of what the caller knew before)."""
    key = keys.finetune_status_key(finetune_id)
    for _ in range(MAX_CAS_ATTEMPTS):
        current, etag = _read_status_with_etag(store, finetune_id)
        new = change(current)
        if new is None:
            return current, current
        try:
            _put_status(store, key, new, etag)
        except PreconditionFailed:
            continue
        return current, new
    raise StatusConflict(
        f"fine-tune {finetune_id}: status changed by others {MAX_CAS_ATTEMPTS} times in a row"
    )
