"""Evaluations of checkpoints: validated before anything runs, run as Jobs by the fine-tunes' executor.

Store layout (``records.evaluation``; keys in ``records.keys``)::

    evaluations/{id}/spec.json          EvaluationSpec: what to evaluate (written once; the Job's input)
    evaluations/{id}.json               EvaluationRecord: state and report (the evaluator writes it;
                                        the control plane writes "queued" at create, "failed" when the
                                        Job ended without the evaluator saying so)
    evaluations/{id}/comparison.png     the comparison plot (the evaluator)
    evaluations/{id}/idempotency.json   {"fingerprint"} of a create with an Idempotency-Key

The Job is the evaluator (``python -m services.evaluator``): the trainer image with another command,
submitted through the same executor as fine-tunes (``JobSpec.role == "evaluator"``), so it runs where
fine-tunes run (local process, Kubernetes Job, TrainJob) with the same exit-code policy.

Held-out pairs: by default those the checkpoint's fine-tune held out (its spec's ``pairs``:
``heldout.jsonl`` beside the pairs it trained on), or those of another dataset version compiled with
``pairs`` options (``holdout_fraction`` > 0). The default prompt set is the held-out prompts.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from services.common.records import keys
from services.common.records.evaluation import (
    EvaluationRecord,
    EvaluationSpec,
    PromptRef,
    read_evaluation,
    read_evaluation_with_etag,
    read_spec,
    write_evaluation,
    write_spec,
)
from services.common.records.finetune import FineTuneSpec
from services.common.records.finetune import read_spec as read_finetune_spec
from services.common.store import ObjectNotFound, ObjectReader, ObjectStore, PreconditionFailed
from services.controlplane.domain.checkpoints import CheckpointService
from services.controlplane.domain.datasets import DatasetService, PairOptions
from services.controlplane.domain.errors import Conflict, IdempotencyKeyReused, InvalidRequest, NotFound
from services.controlplane.domain.names import NAME_RE, validate_digest, validate_name
from services.controlplane.domain.ports import ExecStatus, Executor, JobSpec
from services.controlplane.domain.util import Clock, iso, new_id, paginate, read_json_or_none, utcnow

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ID_PREFIX = "ev-"
MAX_IDEMPOTENCY_KEY = 255
MAX_DEFAULT_PROMPTS = 16
# The fine-tune's hyperparameters that set the generated clips' size by default.
CLIP_SIZE = ("num_frames", "height", "width")


@dataclass(frozen=True)
class EvaluationRequest:
    """A request to evaluate ``checkpoint`` (see ``schemas.EvaluationCreate`` for each field)."""

    checkpoint: str
    baseline: str | None = "base"
    dataset: str | None = None
    version: str | None = None
    pairs: dict[str, Any] | None = None
    prompts: list[dict[str, Any]] | None = None
    seeds: list[int] | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    dpo: dict[str, Any] = field(default_factory=dict)
    clip_model: str | None = None
    motion_collapse_ratio: float = 0.7

    def fingerprint(self) -> str:
        blob = json.dumps(self.__dict__, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


def derive_state(record: EvaluationRecord | None, status: ExecStatus) -> tuple[str, str | None]:
    """(state, error) of an evaluation from its record and its Job's status. Pure.

    The evaluator's record wins once it is terminal; a Job that ended without the evaluator saying
    so (killed, lost, its record never written) is failed here."""
    state = record.state if record is not None else "queued"
    if state in TERMINAL:
        return state, record.error if record is not None else None
    if status.phase == "failed":
        return "failed", f"the evaluation Job failed ({status.reason}): {status.message or ''}".rstrip(": ")
    if status.phase == "succeeded":
        return "failed", "the evaluation Job ended without writing its result"
    if status.phase == "running" and state == "queued":
        return "running", None
    return state, None


class EvaluationService:
    """Creates, reconciles and lists evaluations over the store and an executor."""

    def __init__(
        self,
        store: ObjectStore,
        executor: Executor,
        datasets: DatasetService,
        checkpoints: CheckpointService,
        clock: Clock = utcnow,
    ) -> None:
        self.store = store
        self.executor = executor
        self.datasets = datasets
        self.checkpoints = checkpoints
        self.clock = clock

    # ------------------------------------------------------------------------------- create
    def create(
        self, req: EvaluationRequest, idempotency_key: str | None = None, created_by: str = ""
    ) -> tuple[dict[str, Any], bool]:
        """Validate, record and submit an evaluation. Returns (view, created); a retried key returns
        the first one (a different request with the same key: ``IdempotencyKeyReused``)."""
        fingerprint = req.fingerprint()
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY or not idempotency_key.isprintable():
                raise InvalidRequest(
                    f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable characters",
                    field="Idempotency-Key",
                )
            evaluation_id = ID_PREFIX + hashlib.sha256(idempotency_key.encode()).hexdigest()[:20]
            marker = keys.evaluation_prefix(evaluation_id) + "idempotency.json"
            prior = read_json_or_none(self.store, marker)
            if prior is not None:
                if prior.get("fingerprint") != fingerprint:
                    raise IdempotencyKeyReused(
                        "this Idempotency-Key was used with a different request; use a new key",
                        field="Idempotency-Key",
                    )
                if self.store.exists(keys.evaluation_spec_key(evaluation_id)):
                    return self.get(evaluation_id), False
        else:
            evaluation_id, marker = new_id("ev", 10), None
        spec = self.build_spec(req, evaluation_id, created_by)
        if marker is not None:
            self.store.put_json(marker, {"fingerprint": fingerprint, "created_at": spec.created_at})
        write_spec(self.store, spec)
        record = EvaluationRecord(
            id=spec.id, checkpoint_id=spec.checkpoint_id, baseline=spec.baseline, created_at=spec.created_at
        )
        write_evaluation(self.store, record)
        job = self._submit(spec)
        return self._view(spec, record, job), True

    def _submit(self, spec: EvaluationSpec) -> dict[str, str]:
        lineage = {"checkpoint_id": spec.checkpoint_id, "base_model": spec.base_model}
        if spec.dataset:
            lineage["dataset"] = spec.dataset
        return self.executor.submit(JobSpec(finetune_id=spec.id, lineage=lineage, role="evaluator"))

    def build_spec(self, req: EvaluationRequest, evaluation_id: str, created_by: str = "") -> EvaluationSpec:
        """The spec of ``req``: every input checked to exist (``InvalidRequest`` naming the field)."""
        manifest = self._checkpoint(req.checkpoint, "checkpoint")
        lineage = dict(manifest.get("lineage") or {})
        base_model = str(lineage.get("base_model") or "")
        if not base_model or not self.store.exists(keys.model_manifest_key(base_model)):
            raise InvalidRequest(
                f"checkpoint {req.checkpoint}'s base model {base_model!r} is not in the store",
                field="checkpoint",
            )
        baseline = req.baseline
        if baseline not in (None, keys.BASE_MODEL, req.checkpoint):
            assert baseline is not None
            other = self._checkpoint(baseline, "baseline")
            if (other.get("lineage") or {}).get("base_model") != base_model:
                raise InvalidRequest(
                    f"baseline {baseline} adapts another base model than {req.checkpoint} ({base_model})",
                    field="baseline",
                )
        ft = self._finetune(lineage.get("finetune_id"))
        dataset, version, heldout_prefix = self._heldout(req, ft)
        prompts = self._prompts(req, dataset, version, heldout_prefix)
        if not prompts and heldout_prefix is None:
            raise InvalidRequest(
                f"checkpoint {req.checkpoint} has no held-out pairs to evaluate on (its fine-tune held out "
                "no prompt: hyperparameters.holdout_fraction was 0); give pairs.holdout_fraction > 0 with "
                "a dataset and version, or a prompt set (prompts)",
                field="pairs",
            )
        generation: dict[str, Any] = {}
        if ft is not None:
            hp = ft.hyperparameters.model_dump()
            generation.update({k: hp[k] for k in CLIP_SIZE if hp.get(k) is not None})
        generation.update(req.generation)
        clip_model = None
        if req.clip_model is not None:
            validate_name(req.clip_model, "clip_model")
            if not self.store.exists(keys.model_manifest_key(req.clip_model)):
                raise InvalidRequest(
                    f"CLIP model {req.clip_model!r} not found in the store (models/{req.clip_model}/)",
                    field="clip_model",
                )
            clip_model = keys.model_prefix(req.clip_model)
        try:
            return EvaluationSpec(
                id=evaluation_id,
                created_at=iso(self.clock()),
                checkpoint_id=req.checkpoint,
                base_model=base_model,
                baseline=baseline,
                dataset=dataset if heldout_prefix or any(p.first_frame for p in prompts) else None,
                version=version if heldout_prefix or any(p.first_frame for p in prompts) else None,
                heldout_prefix=heldout_prefix,
                prompts=prompts,
                seeds=list(req.seeds) if req.seeds else [0, 1],
                generation=generation,
                dpo=dict(req.dpo),
                clip_model=clip_model,
                motion_collapse_ratio=req.motion_collapse_ratio,
                created_by=created_by,
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            raise InvalidRequest(f"{where}: {err.get('msg')}", field=where or None) from exc

    def _checkpoint(self, checkpoint_id: str, field: str) -> dict[str, Any]:
        if not self.checkpoints.exists(checkpoint_id):
            raise InvalidRequest(f"checkpoint {checkpoint_id!r} not found", field=field)
        return self.checkpoints.manifest(checkpoint_id)

    def _finetune(self, finetune_id: Any) -> FineTuneSpec | None:
        if not isinstance(finetune_id, str) or not NAME_RE.match(finetune_id):
            return None
        return read_finetune_spec(self.store, finetune_id)

    def _heldout(
        self, req: EvaluationRequest, ft: FineTuneSpec | None
    ) -> tuple[str | None, str | None, str | None]:
        """(dataset, version, heldout_prefix): where the held-out pairs are (prefix None: none)."""
        if (req.dataset is None) != (req.version is None):
            raise InvalidRequest(
                "give the dataset and its version together (or neither: the fine-tune's)",
                field="version" if req.version is None else "dataset",
            )
        if req.dataset is None:
            if ft is None:
                if req.pairs:
                    raise InvalidRequest(
                        "the checkpoint names no fine-tune: give the dataset and version to compile",
                        field="dataset",
                    )
                return None, None, None
            dataset, version = ft.dataset, ft.version
        else:
            assert req.version is not None
            dataset = validate_name(req.dataset, "dataset")
            version = validate_digest(req.version, "version")
            try:
                version = str(self.datasets.get_version(dataset, version)["id"])
            except NotFound as exc:
                raise InvalidRequest(
                    f"dataset {dataset!r} has no version {req.version}", field="version"
                ) from exc
        same = ft is not None and (dataset, version) == (ft.dataset, ft.version)
        if not req.pairs and same:
            assert ft is not None
            pairs = ft.pairs
            if pairs is None or not pairs.heldout_digest:
                return dataset, version, None
            return dataset, version, pairs.prefix
        # Another dataset version (or other options): compile its pairs with the options asked for,
        # else the fine-tune's own (its seed, tie policy ...).
        base = dict(ft.pairs.options) if ft is not None and ft.pairs is not None else {}
        values = {**base, **(req.pairs or {})}
        try:
            options = PairOptions(**values)
        except TypeError as exc:
            raise InvalidRequest(f"pairs: {exc}", field="pairs") from exc
        if not options.holdout_fraction:
            if req.pairs is None:
                return dataset, version, None
            raise InvalidRequest(
                "pairs.holdout_fraction must be > 0: the evaluation uses the held-out pairs",
                field="pairs.holdout_fraction",
            )
        try:
            report = self.datasets.compile_pairs(dataset, version, options)
        except InvalidRequest as exc:
            field = f"pairs.{exc.field}" if exc.field in ("holdout_fraction", "options") else exc.field
            raise InvalidRequest(str(exc), field=field) from exc
        if not report.get("heldout_sha256") or not report.get("heldout"):
            raise InvalidRequest(
                f"dataset {dataset!r} version {version[:12]} held out no pair with these options",
                field="pairs.holdout_fraction",
            )
        return dataset, version, self.datasets.pairs_prefix(dataset, version, options)

    def _prompts(
        self, req: EvaluationRequest, dataset: str | None, version: str | None, heldout_prefix: str | None
    ) -> builtins.list[PromptRef]:
        if req.prompts:
            files: dict[str, Any] = {}
            if any(p.get("first_frame") for p in req.prompts):
                if dataset is None or version is None:
                    raise InvalidRequest(
                        "first_frame names a file of the dataset version: give the dataset and version",
                        field="prompts[0].first_frame",
                    )
                files = dict(self.datasets.manifest(dataset, version).get("files") or {})
            out = []
            for i, p in enumerate(req.prompts):
                first = p.get("first_frame")
                key = None
                if first:
                    if first not in files:
                        raise InvalidRequest(
                            f"first_frame {first!r} is not a file of dataset {dataset!r} version {str(version)[:12]}",
                            field=f"prompts[{i}].first_frame",
                        )
                    assert dataset is not None and version is not None
                    key = self.datasets.object_key(dataset, version, first, files[first])
                out.append(PromptRef(prompt=str(p["prompt"]), first_frame=key))
            return out
        if heldout_prefix is None:
            return []
        # The held-out prompts (the compile report names them), else those of heldout.jsonl.
        report = read_json_or_none(self.store, heldout_prefix + "report.json") or {}
        prompts = list(((report.get("report") or {}).get("holdout") or {}).get("prompts") or [])
        if not prompts:
            try:
                text = self.store.get_bytes(heldout_prefix + "heldout.jsonl").decode()
            except ObjectNotFound as exc:
                raise InvalidRequest("the held-out pairs are missing from the store", field="pairs") from exc
            prompts = sorted({json.loads(line)["prompt"] for line in text.splitlines() if line.strip()})
        return [PromptRef(prompt=p) for p in prompts[:MAX_DEFAULT_PROMPTS]]

    # ------------------------------------------------------------------------------- read
    def _load(self, evaluation_id: str) -> tuple[EvaluationSpec, EvaluationRecord | None]:
        if not NAME_RE.match(evaluation_id or ""):
            raise NotFound(f"evaluation {evaluation_id!r} not found")
        try:
            spec = read_spec(self.store, evaluation_id)
        except ObjectNotFound as exc:
            raise NotFound(f"evaluation {evaluation_id!r} not found") from exc
        return spec, self._record(evaluation_id)

    def _record(self, evaluation_id: str) -> EvaluationRecord | None:
        try:
            return read_evaluation(self.store, evaluation_id)
        except (ObjectNotFound, ValidationError, ValueError):
            return None

    # ------------------------------------------------------------------------------- cancel
    def cancel(self, evaluation_id: str, by: str = "") -> dict[str, Any]:
        """Stop an evaluation that has not finished: the record becomes ``cancelled`` by a
        compare-and-swap, then the Job is stopped. The evaluator writes its records by
        compare-and-swap too, so whichever writes second sees the other: a cancel is never undone by
        an evaluator finishing meanwhile (its write fails and it stops). Cancelling a cancelled one is
        a no-op; a finished one is a ``Conflict``."""
        spec, _ = self._load(evaluation_id)
        message = "cancelled on request" + (f" by {by}" if by else "")
        for _attempt in range(5):
            try:
                stored, etag = read_evaluation_with_etag(self.store, evaluation_id)
            except (ObjectNotFound, ValidationError, ValueError):
                stored, etag = None, None
            record, _ = self.reconcile(spec, stored)
            if record.state in ("succeeded", "failed"):
                raise Conflict(f"evaluation {evaluation_id} already {record.state}; nothing to cancel")
            if record.state == "cancelled":
                break
            try:
                write_evaluation(
                    self.store,
                    record.model_copy(update={"state": "cancelled", "error": message}),
                    if_match=etag,
                    if_none_match=etag is None,
                )
                break
            except PreconditionFailed:
                continue  # the evaluator wrote meanwhile: look again
        self.executor.cancel(evaluation_id)
        return self.get(evaluation_id)

    def reconcile(
        self, spec: EvaluationSpec, record: EvaluationRecord | None, status: ExecStatus | None = None
    ) -> tuple[EvaluationRecord, dict[str, str]]:
        """The record in line with the Job: a Job that ended without the evaluator's word fails it."""
        if record is not None and record.state in TERMINAL:
            return record, {}
        if status is None:
            status = self.executor.status(spec.id)
        if status.phase == "missing" and (record is None or record.state == "queued"):
            # A create that stopped between the record and the submit (or a Job collected before it
            # ran): submitting again is idempotent.
            return record or self._queued(spec), self._submit(spec)
        state, error = derive_state(record, status)
        current = record or self._queued(spec)
        if state != current.state:
            current = current.model_copy(update={"state": state, "error": error})
            if state == "failed":  # the evaluator did not (could not) write it
                write_evaluation(self.store, current)
        return current, dict(status.job)

    def _queued(self, spec: EvaluationSpec) -> EvaluationRecord:
        return EvaluationRecord(
            id=spec.id, checkpoint_id=spec.checkpoint_id, baseline=spec.baseline, created_at=spec.created_at
        )

    def on_job_event(self, evaluation_id: str, status: ExecStatus) -> None:
        """A watched Job changed: reconcile its evaluation."""
        try:
            spec, record = self._load(evaluation_id)
        except NotFound:
            return
        self.reconcile(spec, record, status)

    def get(self, evaluation_id: str) -> dict[str, Any]:
        spec, record = self._load(evaluation_id)
        record, job = self.reconcile(spec, record)
        return self._view(spec, record, job)

    def _view(self, spec: EvaluationSpec, record: EvaluationRecord, job: dict[str, str]) -> dict[str, Any]:
        succeeded = record.state == "succeeded"
        return {
            "id": spec.id,
            "state": record.state,
            "error": record.error,
            "checkpoint_id": spec.checkpoint_id,
            "baseline": spec.baseline,
            "created_at": spec.created_at,
            "created_by": spec.created_by,
            "spec": spec.model_dump(mode="json", exclude={"id", "created_at", "created_by"}),
            "job": job or None,
            "summary": summary(record) if succeeded else None,
            "record": record.model_dump(mode="json") if succeeded or record.state == "failed" else None,
            "plot_url": f"/v1/evaluations/{spec.id}/comparison.png" if succeeded and record.plot else None,
        }

    def _ids(self) -> builtins.list[str]:
        ids = set()
        for d in self.store.list_dirs(keys.EVALUATIONS):
            ids.add(d[len(keys.EVALUATIONS) : -1])
        return sorted(ids)

    def list(
        self,
        checkpoint: str | None = None,
        state: str | None = None,
        page_size: int = 50,
        page_token: str | None = None,
    ) -> tuple[builtins.list[dict[str, Any]], str | None]:
        views = []
        for evaluation_id in self._ids():
            try:
                spec, record = self._load(evaluation_id)
            except NotFound:
                continue
            if checkpoint is not None and spec.checkpoint_id != checkpoint:
                continue
            record, job = self.reconcile(spec, record)
            if state is not None and record.state != state:
                continue
            views.append(self._view(spec, record, job))
        views.sort(key=_sort_key, reverse=True)
        return paginate(views, _sort_key, page_size, page_token, descending=True)

    def plot(self, evaluation_id: str) -> ObjectReader:
        """An open reader of the comparison PNG (``NotFound`` until the evaluation succeeded)."""
        _, record = self._load(evaluation_id)
        if record is None or record.state != "succeeded" or not record.plot:
            raise NotFound(f"evaluation {evaluation_id} has no comparison plot (yet)")
        try:
            return self.store.open_read(record.plot)
        except ObjectNotFound as exc:
            raise NotFound(f"evaluation {evaluation_id} has no comparison plot") from exc

    # ------------------------------------------------------------------------------- per checkpoint
    def records(self) -> builtins.list[EvaluationRecord]:
        """Every stored record (no reconciling: cheap enough for a metrics scrape)."""
        out = []
        for obj in self.store.list(keys.EVALUATIONS, recursive=False):
            if obj.key.endswith(".json"):
                record = self._record(obj.key[len(keys.EVALUATIONS) : -len(".json")])
                if record is not None:
                    out.append(record)
        return out

    def latest_by_checkpoint(self) -> dict[str, EvaluationRecord]:
        """Each checkpoint's most recent succeeded evaluation."""
        latest: dict[str, EvaluationRecord] = {}
        for r in self.records():
            if r.state != "succeeded":
                continue
            best = latest.get(r.checkpoint_id)
            if best is None or (r.created_at, r.id) > (best.created_at, best.id):
                latest[r.checkpoint_id] = r
        return latest

    def checkpoint_summary(self, checkpoint_id: str) -> dict[str, Any] | None:
        """The summary of the checkpoint's latest succeeded evaluation (the checkpoint view), or None."""
        record = self.latest_by_checkpoint().get(checkpoint_id)
        return None if record is None else summary(record)

    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for r in self.records():
            counts[r.state] += 1
        return counts


def summary(record: EvaluationRecord) -> dict[str, Any]:
    """What a reader of the checkpoint wants first: held-out accuracy and margin, motion against the
    base (ratio, collapse), per prompt, and where the full record and plot are."""
    mine = record.results.get(record.checkpoint_id)
    base = record.results.get(keys.BASE_MODEL)
    per_prompt: dict[str, dict[str, Any]] = {}
    if mine is not None and mine.heldout is not None:
        for prompt, r in mine.heldout.per_prompt.items():
            per_prompt.setdefault(prompt, {})["heldout"] = r.model_dump()
    if mine is not None:
        for p in mine.prompts:
            per_prompt.setdefault(p.prompt, {})["motion"] = p.motion
    return {
        "evaluation_id": record.id,
        "created_at": record.created_at,
        "baseline": record.baseline,
        "heldout_implicit_acc": record.heldout_implicit_acc,
        "heldout_reward_margin": record.heldout_reward_margin,
        "heldout_pairs": mine.heldout.pairs if mine is not None and mine.heldout is not None else None,
        "motion": mine.video.motion if mine is not None and mine.video is not None else None,
        "base_motion": base.video.motion if base is not None and base.video is not None else None,
        "motion_ratio": mine.motion_ratio if mine is not None else None,
        "motion_collapse": record.motion_collapse,
        "clip_score": mine.clip_score if mine is not None else None,
        "clip_skipped": mine.clip_skipped if mine is not None else None,
        **{
            f"{prefix}{stat}": getattr(r.video, stat) if r is not None and r.video is not None else None
            for prefix, r in (("", mine), ("base_", base))
            for stat in ("warp_error", "flicker", "first_frame_psnr")
        },
        "per_prompt": per_prompt,
        "url": f"/v1/evaluations/{record.id}",
        "plot_url": f"/v1/evaluations/{record.id}/comparison.png" if record.plot else None,
    }


def _sort_key(view: dict[str, Any]) -> str:
    return f"{view['created_at']}|{view['id']}"


def dispatch(
    finetunes: Callable[[str, ExecStatus], None], evaluations: Callable[[str, ExecStatus], None]
) -> Callable[[str, ExecStatus], None]:
    """One handler for the executor's watch: evaluation Jobs (``ev-`` ids) to the evaluations."""

    def on_event(job_id: str, status: ExecStatus) -> None:
        (evaluations if job_id.startswith(ID_PREFIX) else finetunes)(job_id, status)

    return on_event
