"""Fine-tunes: validated before anything runs, idempotent creation, states derived from the executor.

Store layout::

    finetunes/{id}/record.json        the record: request, lineage, state, job reference
    finetunes/{id}/progress.jsonl     written by the trainer (see ``progress``)
    idempotency/finetunes/{sha256(key)}.json   {"finetune_id", "fingerprint"}

The record holds the last state the control plane *derived*; the truth is the executor (a Kubernetes
Job or a local process) plus the trainer's progress records, and every read reconciles the two. So any
replica, or a restarted control plane, reports the same state, and nothing lives only in memory.

Creation is crash-safe and idempotent: with an ``Idempotency-Key`` the fine-tune id is derived from the
key, the key's record is written before the fine-tune's, and submission to the executor is itself
idempotent (the Job name is derived from the id), so a retry at any point converges on one Job.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from services.common.records import keys
from services.common.records.lineage import content_digest
from services.common.records.listing import published_checkpoints
from services.common.records.progress import EndEvent
from services.common.store import ObjectStore
from services.controlplane.domain import progress as progress_mod
from services.controlplane.domain.datasets import DatasetService
from services.controlplane.domain.errors import (
    Conflict,
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
)
from services.controlplane.domain.names import NAME_RE, validate_digest, validate_name
from services.controlplane.domain.ports import ExecStatus, Executor, JobSpec
from services.controlplane.domain.util import (
    Clock,
    iso,
    new_id,
    paginate,
    read_json,
    read_json_or_none,
    utcnow,
)

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"queued", "running"})
STAGES = ("dpo", "stage1")
# Set by the trainer from the fine-tune's inputs, never by the caller.
RESERVED_HYPERPARAMETERS = frozenset({"model", "dataset", "output_dir", "unet_dir", "cache_dir", "device"})
MAX_IDEMPOTENCY_KEY = 255


record_key = keys.finetune_record_key


@dataclass(frozen=True)
class FineTuneRequest:
    """A validated request to fine-tune ``base_model`` on one immutable dataset version."""

    dataset: str
    version: str
    base_model: str
    stage: str = "dpo"
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        blob = json.dumps(
            {
                "dataset": self.dataset,
                "version": self.version,
                "base_model": self.base_model,
                "stage": self.stage,
                "hyperparameters": self.hyperparameters,
            },
            sort_keys=True,
        ).encode()
        return hashlib.sha256(blob).hexdigest()


def validate_hyperparameters(stage: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """Check hyperparameters against the training library's own config (same rules as its CLI).

    Returns the normalised mapping (keys with ``_``). Raises :class:`InvalidRequest` naming the field."""
    if stage not in STAGES:
        raise InvalidRequest(f"stage must be one of {', '.join(STAGES)}", field="stage")
    normalised = {str(k).replace("-", "_"): v for k, v in hyperparameters.items()}
    reserved = sorted(RESERVED_HYPERPARAMETERS & set(normalised))
    if reserved:
        raise InvalidRequest(
            f"hyperparameters may not set {', '.join(reserved)}: the trainer sets them from the fine-tune's inputs",
            field=f"hyperparameters.{reserved[0]}",
        )
    from huvidpo.training.config import ConfigError, DPOConfig, Stage1Config

    cls = DPOConfig if stage == "dpo" else Stage1Config
    try:
        cfg = cls.from_mapping(
            {**normalised, "model": "m", "dataset": "d", "output_dir": "o"}, source="hyperparameters"
        )
        cfg.validate()
    except ConfigError as exc:
        field = f"hyperparameters.{exc.field}" if exc.field else "hyperparameters"
        raise InvalidRequest(str(exc), field=field) from exc
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(str(exc), field="hyperparameters") from exc
    return normalised


def check_clips_fit(stage: str, hyperparameters: dict[str, Any], stats: dict[str, Any] | None) -> None:
    """Refuse clips the dataset version's videos cannot give (``stats``: the version's
    ``video_stats``): too many frames, or frames larger than the smallest video. Raises
    :class:`InvalidRequest` naming the option. A version without stats is not checked here (the
    trainer still refuses too few frames, with exit 2)."""
    if not stats:
        return
    from huvidpo.data.stats import frames_problem, size_problem
    from huvidpo.training.config import DPOConfig, Stage1Config

    cls = DPOConfig if stage == "dpo" else Stage1Config
    cfg = cls.from_mapping({**hyperparameters, "model": "m", "dataset": "d", "output_dir": "o"})
    problem = frames_problem(stats.get("min_frames"), cfg.num_frames, cfg.frame_stride)
    if problem:
        raise InvalidRequest(problem, field="hyperparameters.num_frames")
    size = size_problem(stats, cfg.height, cfg.width)
    if size:
        raise InvalidRequest(size[1], field=f"hyperparameters.{size[0]}")


def derive_state(
    record: dict[str, Any], status: ExecStatus, end: EndEvent | None
) -> tuple[str, str | None, str | None]:
    """(state, reason, message) of a fine-tune from its record, its Job's status and the trainer's end record.

    Pure: the only place the state machine lives. Terminal states never change again; a cancel request
    wins over whatever the Job does afterwards.
    """
    state = record.get("state", "queued")
    if state in TERMINAL:
        return state, record.get("reason"), record.get("message")
    if record.get("cancel_requested_at"):
        return "cancelled", "CancelledByUser", "cancelled on request"
    if status.phase == "succeeded":
        return "succeeded", None, None
    if status.phase == "failed":
        if end is not None and end.state == "failed":
            return "failed", end.reason or status.reason or "TrainerFailed", end.message or status.message
        return "failed", status.reason or "JobFailed", status.message
    if status.phase == "running":
        return "running", None, None
    if status.phase == "pending":
        return "queued", None, None
    # missing: no Job. After a finished Job was garbage-collected, the trainer's end record still tells.
    if end is not None and end.state in ("succeeded", "failed"):
        if end.state == "succeeded":
            return "succeeded", None, None
        return "failed", end.reason or "TrainerFailed", end.message
    if record.get("submitted"):
        return "failed", "JobLost", "the Job disappeared before the trainer reported an end"
    return "queued", None, None


class FineTuneService:
    """Creates, reconciles, lists and cancels fine-tunes over the store and an executor."""

    def __init__(
        self,
        store: ObjectStore,
        executor: Executor,
        datasets: DatasetService,
        clock: Clock = utcnow,
        on_transition: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.executor = executor
        self.datasets = datasets
        self.clock = clock
        self.on_transition = on_transition

    # ------------------------------------------------------------------------------- create
    def validate(self, req: FineTuneRequest) -> tuple[FineTuneRequest, dict[str, Any]]:
        """Check every input exists and every hyperparameter is valid; returns (normalised request, lineage)."""
        validate_name(req.dataset, "dataset")
        req = FineTuneRequest(
            req.dataset,
            validate_digest(req.version, "version"),
            req.base_model,
            req.stage,
            req.hyperparameters,
        )
        validate_name(req.base_model, "base_model")
        hp = validate_hyperparameters(req.stage, dict(req.hyperparameters))
        try:
            dataset_manifest = self.datasets.get_version(req.dataset, req.version)
        except NotFound as exc:
            raise InvalidRequest(
                f"dataset {req.dataset!r} has no version {req.version}", field="version"
            ) from exc
        check_clips_fit(req.stage, hp, dataset_manifest.get("video_stats"))
        model_manifest = read_json_or_none(self.store, keys.model_manifest_key(req.base_model))
        if model_manifest is None:
            raise InvalidRequest(
                f"base model {req.base_model!r} not found in the store (models/{req.base_model}/manifest.json)",
                field="base_model",
            )
        lineage = {
            "dataset": req.dataset,
            "dataset_digest": dataset_manifest["id"],
            "base_model": req.base_model,
            "base_model_digest": _model_digest(model_manifest),
        }
        normalised = FineTuneRequest(req.dataset, req.version, req.base_model, req.stage, hp)
        return normalised, lineage

    def create(self, req: FineTuneRequest, idempotency_key: str | None = None) -> tuple[dict[str, Any], bool]:
        """Validate, record and submit a fine-tune. Returns (view, created); a retried key returns the first one."""
        idem_key = None
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY or not idempotency_key.isprintable():
                raise InvalidRequest(
                    f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable characters",
                    field="Idempotency-Key",
                )
            idem_key = hashlib.sha256(idempotency_key.encode()).hexdigest()
        req, lineage = self.validate(req)
        fingerprint = req.fingerprint()
        if idem_key is not None:
            finetune_id = "ft-" + idem_key[:20]
            prior = read_json_or_none(self.store, keys.idempotency_key(idem_key))
            if prior is not None:
                if prior["fingerprint"] != fingerprint:
                    raise IdempotencyKeyReused(
                        "this Idempotency-Key was used with a different request; use a new key",
                        field="Idempotency-Key",
                    )
                if self.store.exists(record_key(prior["finetune_id"])):
                    return self.get(prior["finetune_id"]), False
                # crashed between the key and the record: finish what the first request started
            else:
                self.store.put_json(
                    keys.idempotency_key(idem_key),
                    {"finetune_id": finetune_id, "fingerprint": fingerprint, "created_at": iso(self.clock())},
                )
        else:
            finetune_id = new_id("ft", 10)
        now = iso(self.clock())
        record: dict[str, Any] = {
            "id": finetune_id,
            "created_at": now,
            "updated_at": now,
            "state": "queued",
            "reason": None,
            "message": None,
            "request": {
                "dataset": req.dataset,
                "version": req.version,
                "base_model": req.base_model,
                "stage": req.stage,
                "hyperparameters": req.hyperparameters,
            },
            "lineage": {**lineage, "finetune_id": finetune_id},
            "fingerprint": fingerprint,
            "submitted": False,
            "job": None,
            "cancel_requested_at": None,
            "finished_at": None,
        }
        # The reference first, so the dataset cannot be deleted from under a recorded fine-tune.
        self.datasets.add_reference(req.dataset, req.version, finetune_id)
        self.store.put_json(record_key(finetune_id), record)
        record = self._submit(record)
        return self._view(record, progress_mod.summarize([])), True

    def _submit(self, record: dict[str, Any]) -> dict[str, Any]:
        spec = JobSpec(
            finetune_id=record["id"],
            lineage={k: str(v) for k, v in record["lineage"].items()},
            config={"stage": record["request"]["stage"]},
        )
        job = self.executor.submit(spec)
        record = {**record, "submitted": True, "job": job, "updated_at": iso(self.clock())}
        self.store.put_json(record_key(record["id"]), record)
        return record

    # ------------------------------------------------------------------------------- read
    def _load(self, finetune_id: str) -> dict[str, Any]:
        if not NAME_RE.match(finetune_id or ""):
            raise NotFound(f"fine-tune {finetune_id!r} not found")
        record: dict[str, Any] = read_json(self.store, record_key(finetune_id), f"fine-tune {finetune_id!r}")
        return record

    def reconcile(
        self, record: dict[str, Any], status: ExecStatus | None = None
    ) -> tuple[dict[str, Any], progress_mod.ProgressSummary]:
        """Bring the record in line with the executor and the trainer's progress; persist a changed state."""
        summary = progress_mod.summarize(progress_mod.read_progress(self.store, record["id"]))
        if record.get("state") in TERMINAL:
            return record, summary
        if not record.get("submitted") and not record.get("cancel_requested_at"):
            record = self._submit(record)  # a create that crashed before submitting
        if status is None:
            status = self.executor.status(record["id"])
        state, reason, message = derive_state(record, status, summary.end)
        if state != record.get("state") or reason != record.get("reason"):
            old = record.get("state", "queued")
            record = {
                **record,
                "state": state,
                "reason": reason,
                "message": message,
                "updated_at": iso(self.clock()),
            }
            if state in TERMINAL:
                record["finished_at"] = record["updated_at"]
            self.store.put_json(record_key(record["id"]), record)
            if self.on_transition is not None and old != state:
                self.on_transition(old, state)
        return record, summary

    def on_job_event(self, finetune_id: str, status: ExecStatus) -> None:
        """A watched Job changed: reconcile its fine-tune with the status the watch delivered."""
        try:
            record = self._load(finetune_id)
        except NotFound:
            return  # a Job we did not record (or a deleted fine-tune)
        self.reconcile(record, status)

    def require(self, finetune_id: str) -> None:
        """Raise ``NotFound`` unless the fine-tune exists (no reconciling: for routes about its children)."""
        self._load(finetune_id)

    def get(self, finetune_id: str) -> dict[str, Any]:
        record, summary = self.reconcile(self._load(finetune_id))
        return self._view(record, summary)

    def _view(self, record: dict[str, Any], summary: progress_mod.ProgressSummary) -> dict[str, Any]:
        return {
            "id": record["id"],
            "state": record["state"],
            "reason": record.get("reason"),
            "message": record.get("message"),
            "created_at": record["created_at"],
            "updated_at": record["updated_at"],
            "finished_at": record.get("finished_at"),
            **record["request"],
            "lineage": record["lineage"],
            "job": record.get("job"),
            "progress": summary.to_dict(),
            "checkpoints": self.checkpoint_ids(record["id"]),
        }

    def checkpoint_ids(self, finetune_id: str) -> builtins.list[str]:
        return [cid for _, _, cid in published_checkpoints(self.store, finetune_id)]

    def list(
        self,
        state: str | None = None,
        dataset: str | None = None,
        base_model: str | None = None,
        page_size: int = 50,
        page_token: str | None = None,
    ) -> tuple[builtins.list[dict[str, Any]], str | None]:
        if state is not None and state not in STATES:
            raise InvalidRequest(f"state must be one of {', '.join(STATES)}", field="state")
        records = []
        for d in self.store.list_dirs(keys.FINETUNES):
            rec = read_json_or_none(self.store, d + "record.json")
            if rec is not None:
                records.append(rec)
        views = []
        for rec in records:
            if dataset is not None and rec["request"]["dataset"] != dataset:
                continue
            if base_model is not None and rec["request"]["base_model"] != base_model:
                continue
            rec, summary = self.reconcile(rec)
            if state is not None and rec["state"] != state:
                continue
            views.append(self._view(rec, summary))
        views.sort(key=_sort_key, reverse=True)
        return paginate(views, _sort_key, page_size, page_token, descending=True)

    def count_by_state(self) -> dict[str, int]:
        """Fine-tunes per recorded state (no reconciliation: cheap enough for a metrics scrape)."""
        counts = dict.fromkeys(STATES, 0)
        for d in self.store.list_dirs(keys.FINETUNES):
            rec = read_json_or_none(self.store, d + "record.json")
            if rec is not None and rec.get("state") in counts:
                counts[rec["state"]] += 1
        return counts

    # ------------------------------------------------------------------------------- cancel, logs
    def cancel(self, finetune_id: str) -> dict[str, Any]:
        record, _ = self.reconcile(self._load(finetune_id))
        if record["state"] in ("succeeded", "failed"):
            raise Conflict(f"fine-tune {finetune_id} already {record['state']}; nothing to cancel")
        if record["state"] != "cancelled":
            now = iso(self.clock())
            old = record["state"]
            record = {
                **record,
                "cancel_requested_at": now,
                "state": "cancelled",
                "reason": "CancelledByUser",
                "message": "cancelled on request",
                "updated_at": now,
                "finished_at": now,
            }
            self.store.put_json(record_key(finetune_id), record)
            if self.on_transition is not None:
                self.on_transition(old, "cancelled")
        self.executor.cancel(finetune_id)
        return self.get(finetune_id)

    # ------------------------------------------------------------------------------- retention
    def holds(self, finetune_id: str) -> str | None:
        """Why this fine-tune still holds the dataset version it names: it is active (queued or
        running), or checkpoints of it still exist. ``None`` once it holds nothing (or is gone)."""
        try:
            view = self.get(finetune_id)
        except NotFound:
            return None
        if view["state"] in ACTIVE:
            return f"fine-tune {finetune_id} is {view['state']}"
        if view["checkpoints"]:
            return f"fine-tune {finetune_id} has checkpoint(s) {', '.join(view['checkpoints'])}"
        return None

    def delete(self, finetune_id: str) -> None:
        """Delete a finished fine-tune: its record, its progress, its dataset reference and its
        Idempotency-Key. Refused (``Conflict``) while it is active or while checkpoints of it exist:
        checkpoints are deleted one by one, each checked against the rollouts."""
        view = self.get(finetune_id)
        if view["state"] in ACTIVE:
            raise Conflict(f"fine-tune {finetune_id} is {view['state']}; cancel it before deleting it")
        if view["checkpoints"]:
            raise Conflict(
                f"fine-tune {finetune_id} still has checkpoint(s) {', '.join(view['checkpoints'])}; "
                "delete them first (DELETE /v1/checkpoints/{id})"
            )
        # The record first: the fine-tune stops existing before its progress and its reference go.
        self.store.delete(record_key(finetune_id))
        self.store.delete_prefix(keys.finetune_prefix(finetune_id))
        self.datasets.remove_reference(view["dataset"], finetune_id)
        if finetune_id.startswith("ft-"):
            # Its Idempotency-Key record goes too (the id is "ft-" + the start of the key's digest), so
            # nothing of it is left; the same key later starts a new fine-tune.
            for obj in self.store.list(keys.IDEMPOTENCY_FINETUNES + finetune_id[3:], recursive=False):
                prior = read_json_or_none(self.store, obj.key)
                if prior is not None and prior.get("finetune_id") == finetune_id:
                    self.store.delete(obj.key)

    def logs(self, finetune_id: str, follow: bool = False) -> Iterator[bytes]:
        self._load(finetune_id)
        return self.executor.logs(finetune_id, follow=follow)


def _sort_key(view: dict[str, Any]) -> str:
    return f"{view['created_at']}|{view['id']}"


def _model_digest(manifest: dict[str, Any]) -> str:
    """A base model's identity: the one digest (``content_digest``) of its published file listing,
    whatever else its publisher recorded, so the fine-tune, its checkpoints and the inference service
    (which hashes the same files on disk) agree."""
    return content_digest(manifest.get("files", {}))
