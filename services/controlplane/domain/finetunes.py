"""Fine-tunes: validated before anything runs, idempotent creation, states derived from the executor.

Store layout::

    finetunes/{id}/spec.json          FineTuneSpec: request, lineage (written once; the trainer's input)
    finetunes/{id}/status.json        FineTuneStatus: state, job reference (compare-and-swap writes)
    finetunes/{id}/progress.jsonl     written by the trainer (see ``progress``)
    idempotency/finetunes/{sha256(key)}.json   {"finetune_id", "fingerprint"}

The status holds the last state the control plane *derived*; the truth is the executor (a Kubernetes
Job or a local process) plus the trainer's progress records, and every read reconciles the two. So any
replica, or a restarted control plane, reports the same state, and nothing lives only in memory.

Creation is crash-safe and idempotent: with an ``Idempotency-Key`` the fine-tune id is derived from the
key, the key's record is written before the fine-tune's, and submission to the executor is itself
idempotent (the Job name is derived from the id), so a retry at any point converges on one Job.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from huvidpo.training.config import ConfigError
from services.common.records import hyperparameters as hyperparameters_mod
from services.common.records import keys
from services.common.records.finetune import (
    FineTuneSpec,
    FineTuneStatus,
    PairsRef,
    SpecConflict,
    read_spec,
    read_status,
    update_status,
    write_spec,
)
from services.common.records.hyperparameters import Hyperparameters
from services.common.records.lineage import content_digest
from services.common.records.listing import published_checkpoints
from services.common.records.progress import EndEvent
from services.common.store import ObjectStore
from services.controlplane.domain import progress as progress_mod
from services.controlplane.domain.datasets import DatasetService, PairOptions
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
    read_json_or_none,
    utcnow,
)

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"queued", "running"})
STAGES = ("dpo", "stage1")
MAX_IDEMPOTENCY_KEY = 255


@dataclass(frozen=True)
class FineTuneRequest:
    """A validated request to fine-tune ``base_model`` on one immutable dataset version."""

    dataset: str
    version: str
    base_model: str
    stage: str = "dpo"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    # The shape asked for (None: the control plane's default shape supplies it).
    nodes: int | None = None
    gpus_per_node: int | None = None

    def fingerprint(self) -> str:
        fields: dict[str, Any] = {
            "dataset": self.dataset,
            "version": self.version,
            "base_model": self.base_model,
            "stage": self.stage,
            "hyperparameters": self.hyperparameters,
        }
        if (self.nodes or 1, self.gpus_per_node or 1) != (1, 1):
            # only then: a 1x1 fine-tune's fingerprint is what it was before shapes existed
            fields["shape"] = [self.nodes, self.gpus_per_node]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def validate_hyperparameters(stage: str, hyperparameters: dict[str, Any]) -> Hyperparameters:
    """Check hyperparameters against the training library's own config (same rules as its CLI) and
    return them typed (``records.hyperparameters``). Raises :class:`InvalidRequest` naming the field."""
    if stage not in STAGES:
        raise InvalidRequest(f"stage must be one of {', '.join(STAGES)}", field="stage")
    try:
        return hyperparameters_mod.parse(stage, hyperparameters)
    except ConfigError as exc:
        field = f"hyperparameters.{exc.field}" if exc.field else "hyperparameters"
        raise InvalidRequest(str(exc), field=field) from exc
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(str(exc), field="hyperparameters") from exc


def check_clips_fit(hp: Hyperparameters, stats: dict[str, Any] | None) -> None:
    """Refuse clips the dataset version's videos cannot give (``stats``: the version's
    ``video_stats``): too many frames, or frames larger than the smallest video. Raises
    :class:`InvalidRequest` naming the option. A version without stats is not checked here (the
    trainer still refuses too few frames, with exit 2)."""
    if not stats:
        return
    from huvidpo.data.stats import frames_problem, size_problem

    problem = frames_problem(stats.get("min_frames"), hp.num_frames, hp.frame_stride)  # type: ignore[attr-defined]
    if problem:
        raise InvalidRequest(problem, field="hyperparameters.num_frames")
    size = size_problem(stats, hp.height, hp.width)  # type: ignore[attr-defined]
    if size:
        raise InvalidRequest(size[1], field=f"hyperparameters.{size[0]}")


def pair_options(stage: str, hp: Hyperparameters) -> PairOptions | None:
    """The pair-compiler options a fine-tune's hyperparameters give; None for stage 1, which trains
    on single clips."""
    if stage != "dpo":
        return None
    h: Any = hp
    if h.holdout_by == "prompt" and h.holdout_fraction > 0:
        # The prompts are held out where the pairs are compiled (heldout.jsonl), with the seed the
        # trainer would use: the trainer never receives their pairs to train on.
        return PairOptions(h.tie_policy, h.min_margin, h.margin_weighting, h.seed, h.holdout_fraction, h.seed)
    return PairOptions(h.tie_policy, h.min_margin, h.margin_weighting, h.seed)


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
        shapes: builtins.list[tuple[int, int]] | None = None,
        max_attempts: int = 1,
    ) -> None:
        """``shapes``: the (nodes, gpus_per_node) a request may ask for, the default first.
        ``max_attempts``: attempts of a fine-tune whose executor hands a failed group's restart
        to the control plane (``ExecStatus.retryable``)."""
        self.store = store
        self.executor = executor
        self.datasets = datasets
        self.clock = clock
        self.on_transition = on_transition
        self.shapes = list(shapes or [(1, 1)])
        self.max_attempts = max_attempts

    def validate_shape(self, nodes: int | None, gpus_per_node: int | None) -> tuple[int, int]:
        """The shape a request asks for (missing values from the default shape), if it is allowed
        and the executor can run it; else :class:`InvalidRequest` naming the allowed shapes."""
        default = self.shapes[0]
        shape = (nodes or default[0], gpus_per_node or default[1])
        allowed = ", ".join(f"{n}x{g}" for n, g in self.shapes)
        if shape not in self.shapes:
            field = (
                "nodes" if nodes is not None and nodes not in {n for n, _ in self.shapes} else "gpus_per_node"
            )
            raise InvalidRequest(
                f"shape {shape[0]}x{shape[1]} (nodes x gpus_per_node) is not allowed here; allowed shapes: {allowed}",
                field=field,
            )
        limit = getattr(self.executor, "max_world_size", None)
        if limit is not None and shape[0] * shape[1] > limit:
            raise InvalidRequest(
                f"shape {shape[0]}x{shape[1]} needs {shape[0] * shape[1]} trainer processes; the "
                f"{self.executor.kind} executor runs at most {limit} (use the kubernetes or trainjob executor)",
                field="gpus_per_node" if shape[0] == 1 else "nodes",
            )
        return shape

    # ------------------------------------------------------------------------------- create
    def validate(self, req: FineTuneRequest) -> tuple[FineTuneRequest, Hyperparameters, dict[str, Any]]:
        """Check every input exists and every hyperparameter is valid; returns (normalised request,
        typed hyperparameters, lineage)."""
        validate_name(req.dataset, "dataset")
        req = dataclasses.replace(req, version=validate_digest(req.version, "version"))
        validate_name(req.base_model, "base_model")
        hp = validate_hyperparameters(req.stage, dict(req.hyperparameters))
        # The request's own fields first, then what needs the store.
        nodes, gpus = self.validate_shape(req.nodes, req.gpus_per_node)
        try:
            dataset_manifest = self.datasets.get_version(req.dataset, req.version)
        except NotFound as exc:
            raise InvalidRequest(
                f"dataset {req.dataset!r} has no version {req.version}", field="version"
            ) from exc
        check_clips_fit(hp, dataset_manifest.get("video_stats"))
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
        # Keys as the library names them (``_``), values as sent: the fingerprint of a retry is the same.
        as_sent = {str(k).replace("-", "_"): v for k, v in req.hyperparameters.items()}
        normalised = FineTuneRequest(
            req.dataset, req.version, req.base_model, req.stage, as_sent, nodes, gpus
        )
        return normalised, hp, lineage

    def create(
        self, req: FineTuneRequest, idempotency_key: str | None = None, created_by: str = ""
    ) -> tuple[dict[str, Any], bool]:
        """Validate, record and submit a fine-tune (``created_by``: the caller's token name). Returns
        (view, created); a retried key returns the first one."""
        idem_key = None
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY or not idempotency_key.isprintable():
                raise InvalidRequest(
                    f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable characters",
                    field="Idempotency-Key",
                )
            idem_key = hashlib.sha256(idempotency_key.encode()).hexdigest()
        req, hp, lineage = self.validate(req)
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
                if read_spec(self.store, prior["finetune_id"]) is not None:
                    return self.get(prior["finetune_id"]), False
                # crashed between the key and the record: finish what the first request started
            else:
                self.store.put_json(
                    keys.idempotency_key(idem_key),
                    {"finetune_id": finetune_id, "fingerprint": fingerprint, "created_at": iso(self.clock())},
                )
        else:
            finetune_id = new_id("ft", 10)
        pairs = self._compile_pairs(req, hp)
        spec = FineTuneSpec(
            id=finetune_id,
            created_at=iso(self.clock()),
            dataset=req.dataset,
            version=req.version,
            base_model=req.base_model,
            stage=req.stage,  # type: ignore[arg-type]  # checked by validate_hyperparameters
            hyperparameters=hp,
            lineage={**lineage, "finetune_id": finetune_id},
            fingerprint=fingerprint,
            pairs=pairs,
            created_by=created_by,
            nodes=req.nodes or 1,
            gpus_per_node=req.gpus_per_node or 1,
        )
        # The reference first, so the dataset cannot be deleted from under a recorded fine-tune.
        self.datasets.add_reference(req.dataset, req.version, finetune_id)
        try:
            spec = write_spec(self.store, spec)
        except SpecConflict as exc:  # an id collision: vanishingly rare, and never silently merged
            raise Conflict(str(exc)) from exc
        status = self._submit(spec)
        return self._view(spec, status, progress_mod.summarize([])), True

    def _compile_pairs(self, req: FineTuneRequest, hp: Hyperparameters) -> PairsRef | None:
        """Compile (or find already compiled, e.g. by a preview with the same options) the pairs a
        DPO fine-tune trains on; the trainer reads exactly these."""
        options = pair_options(req.stage, hp)
        if options is None:
            return None
        try:
            report = self.datasets.compile_pairs(req.dataset, req.version, options)
        except InvalidRequest as exc:
            if exc.field == "options":  # the options are the fine-tune's hyperparameters
                raise InvalidRequest(str(exc), field="hyperparameters") from exc
            raise
        return PairsRef(
            prefix=self.datasets.pairs_prefix(req.dataset, req.version, options),
            digest=str(report["pairs_sha256"]),
            options=options.as_dict(),
            heldout_digest=report.get("heldout_sha256"),
        )

    def _initial_status(self, spec: FineTuneSpec) -> FineTuneStatus:
        return FineTuneStatus(updated_at=spec.created_at)

    def _update(
        self,
        spec: FineTuneSpec,
        change: Callable[[FineTuneStatus], FineTuneStatus | None],
    ) -> FineTuneStatus:
        """Change the stored status with compare-and-swap (``update_status``); reports a state
        change to ``on_transition`` once, from the replica whose write landed."""
        before, after = update_status(
            self.store, spec.id, lambda cur: change(cur if cur is not None else self._initial_status(spec))
        )
        old = before.state if before is not None else "queued"
        assert after is not None  # change() always gets a status, so an unchanged one is returned
        if after is not before and self.on_transition is not None and old != after.state:
            self.on_transition(old, after.state)
        return after

    def _job_spec(self, spec: FineTuneSpec, attempt: int) -> JobSpec:
        return JobSpec(
            finetune_id=spec.id,
            lineage={k: str(v) for k, v in spec.lineage.items()},
            config={"stage": spec.stage},
            nodes=spec.nodes,
            gpus_per_node=spec.gpus_per_node,
            attempt=attempt,
        )

    def _submit(self, spec: FineTuneSpec) -> FineTuneStatus:
        job = self.executor.submit(self._job_spec(spec, 1))
        now = iso(self.clock())
        return self._update(
            spec, lambda cur: cur.model_copy(update={"submitted": True, "job": job, "updated_at": now})
        )

    def _next_attempt(
        self, spec: FineTuneSpec, status: FineTuneStatus, observed: ExecStatus, end: EndEvent | None
    ) -> FineTuneStatus | None:
        """Start the next attempt of a group that failed whole, if the budget allows; the new status,
        or None when this failure is final. The attempt count lives here, in the fine-tune's status,
        not in the executor's retry counters: a failed TrainJob's or Indexed Job's own retries are
        not a reliable budget (a JobSet restart or a per-index retry resets or splits them)."""
        if not observed.retryable or status.attempt >= self.max_attempts:
            return None
        if observed.attempt is not None and observed.attempt != status.attempt:
            return None  # an older attempt's Job: already handled
        if end is not None and end.state == "failed" and end.exit_code == 2:
            return None  # bad data or config (torchrun exits 1 whatever the rank's code was)
        nxt = status.attempt + 1

        def claim(cur: FineTuneStatus) -> FineTuneStatus | None:
            if cur.state in TERMINAL or cur.attempt != status.attempt:
                return None  # cancelled meanwhile, or another replica claimed this attempt
            return cur.model_copy(update={"attempt": nxt, "state": "queued", "updated_at": iso(self.clock())})

        before, after = update_status(self.store, spec.id, lambda cur: claim(cur or status))
        if after is None or after is before:
            return None if after is None or after.attempt == status.attempt else after
        log.info(
            "fine-tune %s: attempt %d failed (%s); starting attempt %d",
            spec.id,
            status.attempt,
            observed.reason,
            nxt,
        )
        job = self.executor.submit(self._job_spec(spec, nxt))
        return self._update(spec, lambda cur: cur.model_copy(update={"job": job}))

    # ------------------------------------------------------------------------------- read
    def _load(self, finetune_id: str) -> tuple[FineTuneSpec, FineTuneStatus]:
        if not NAME_RE.match(finetune_id or ""):
            raise NotFound(f"fine-tune {finetune_id!r} not found")
        spec = read_spec(self.store, finetune_id)
        if spec is None:
            raise NotFound(f"fine-tune {finetune_id!r} not found")
        return spec, read_status(self.store, finetune_id) or self._initial_status(spec)

    def reconcile(
        self, spec: FineTuneSpec, status: FineTuneStatus, exec_status: ExecStatus | None = None
    ) -> tuple[FineTuneStatus, progress_mod.ProgressSummary]:
        """Bring the status in line with the executor and the trainer's progress; persist a changed state."""
        summary = progress_mod.summarize(progress_mod.read_progress(self.store, spec.id))
        if status.state in TERMINAL:
            return status, summary
        if not status.submitted and not status.cancel_requested_at:
            status = self._submit(spec)  # a create that crashed before submitting
        if exec_status is None:
            exec_status = self.executor.status(spec.id)
        if exec_status.attempt is not None and exec_status.attempt < status.attempt:
            return status, summary  # a watch event of an attempt that was already followed by another
        observed = exec_status
        now = iso(self.clock())
        if observed.phase == "failed" and not status.cancel_requested_at:
            restarted = self._next_attempt(spec, status, observed, summary.end)
            if restarted is not None:
                return restarted, summary

        def change(cur: FineTuneStatus) -> FineTuneStatus | None:
            # Derived from the status as stored *now*: a cancel another replica wrote wins.
            state, reason, message = derive_state(cur.model_dump(), observed, summary.end)
            if state == cur.state and reason == cur.reason:
                return None
            update: dict[str, Any] = {"state": state, "reason": reason, "message": message, "updated_at": now}
            if state in TERMINAL:
                update["finished_at"] = now
            return cur.model_copy(update=update)

        return self._update(spec, change), summary

    def on_job_event(self, finetune_id: str, status: ExecStatus) -> None:
        """A watched Job changed: reconcile its fine-tune with the status the watch delivered."""
        try:
            spec, current = self._load(finetune_id)
        except NotFound:
            return  # a Job we did not record (or a deleted fine-tune)
        self.reconcile(spec, current, status)

    def require(self, finetune_id: str) -> None:
        """Raise ``NotFound`` unless the fine-tune exists (no reconciling: for routes about its children)."""
        self._load(finetune_id)

    def get(self, finetune_id: str) -> dict[str, Any]:
        spec, status = self._load(finetune_id)
        status, summary = self.reconcile(spec, status)
        return self._view(spec, status, summary)

    def _view(
        self, spec: FineTuneSpec, status: FineTuneStatus, summary: progress_mod.ProgressSummary
    ) -> dict[str, Any]:
        return {
            "id": spec.id,
            "state": status.state,
            "reason": status.reason,
            "message": status.message,
            "created_at": spec.created_at,
            "created_by": spec.created_by,
            "updated_at": status.updated_at,
            "finished_at": status.finished_at,
            **spec.request(),
            "lineage": spec.lineage,
            "job": status.job,
            "attempt": status.attempt,
            "progress": summary.to_dict(),
            "checkpoints": self.checkpoint_ids(spec.id),
            "pairs": None if spec.pairs is None else spec.pairs.model_dump(mode="json"),
        }

    def checkpoint_ids(self, finetune_id: str) -> builtins.list[str]:
        return [cid for _, _, cid in published_checkpoints(self.store, finetune_id)]

    def _ids(self) -> builtins.list[str]:
        return [d[len(keys.FINETUNES) : -1] for d in self.store.list_dirs(keys.FINETUNES)]

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
        views = []
        for finetune_id in self._ids():
            spec = read_spec(self.store, finetune_id)
            if spec is None:
                continue
            if dataset is not None and spec.dataset != dataset:
                continue
            if base_model is not None and spec.base_model != base_model:
                continue
            status = read_status(self.store, finetune_id) or self._initial_status(spec)
            status, summary = self.reconcile(spec, status)
            if state is not None and status.state != state:
                continue
            views.append(self._view(spec, status, summary))
        views.sort(key=_sort_key, reverse=True)
        return paginate(views, _sort_key, page_size, page_token, descending=True)

    def count_by_state(self) -> dict[str, int]:
        """Fine-tunes per recorded state (no reconciliation: cheap enough for a metrics scrape)."""
        counts = dict.fromkeys(STATES, 0)
        for finetune_id in self._ids():
            status = read_status(self.store, finetune_id)
            if status is None and read_spec(self.store, finetune_id) is not None:
                counts["queued"] += 1  # created, its first status not written yet
            elif status is not None:
                counts[status.state] += 1
        return counts

    # ------------------------------------------------------------------------------- cancel, logs
    def cancel(self, finetune_id: str) -> dict[str, Any]:
        spec, status = self._load(finetune_id)
        self.reconcile(spec, status)
        now = iso(self.clock())

        def change(cur: FineTuneStatus) -> FineTuneStatus | None:
            if cur.state in ("succeeded", "failed"):
                raise Conflict(f"fine-tune {finetune_id} already {cur.state}; nothing to cancel")
            if cur.state == "cancelled":
                return None
            return cur.model_copy(
                update={
                    "cancel_requested_at": now,
                    "state": "cancelled",
                    "reason": "CancelledByUser",
                    "message": "cancelled on request",
                    "updated_at": now,
                    "finished_at": now,
                }
            )

        self._update(spec, change)
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
        # The spec first: the fine-tune stops existing before its status, progress and reference go.
        self.store.delete(keys.finetune_spec_key(finetune_id))
        self.store.delete(keys.finetune_record_key(finetune_id))
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
