"""The entrypoint an evaluation Job (or a local process) runs for one evaluation.

1. Read the evaluation's spec ``evaluations/{id}/spec.json`` (``records.evaluation.EvaluationSpec``),
   its only input, and record the evaluation as running (``evaluations/{id}.json``).
2. Fetch the base model, the checkpoint (and a baseline checkpoint), the dataset version and its
   held-out pairs, the first frames and the CLIP directory from the store, verifying every digest.
3. Run ``huvidpo.evaluation.run_evaluation`` with the DPO settings the checkpoint was trained with
   (its lineage's config; the spec's ``dpo`` overrides them).
4. Store the comparison PNG at ``evaluations/{id}/comparison.png`` and the record, succeeded, last.

Exit codes are the trainer's (``ExitCode``): 0 success; 2 bad input (a missing publication, held-out
pairs that do not fit the dataset, bad settings: the record says why, never retried); 75 the store is
unreachable (retried; the record stays running); 1 anything else (the record says failed).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from services.common.publish import NotPublished, fetch_published
from services.common.records import keys
from services.common.records.evaluation import (
    EvaluationRecord,
    EvaluationSpec,
    read_evaluation_with_etag,
    read_spec,
    write_evaluation,
)
from services.common.records.exit_codes import ExitCode
from services.common.settings import EvaluatorSettings, SettingsError, StoreSettings, load_settings
from services.common.store import (
    ChecksumMismatch,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    StoreUnavailable,
    make_store,
)

log = logging.getLogger("huvidpo.evaluator")


class BadInput(Exception):
    """The evaluation cannot run as specified (exit 2)."""


def _fetch(store: ObjectStore, prefix: str, target: Path, what: str) -> dict[str, Any]:
    shutil.rmtree(target, ignore_errors=True)
    try:
        return fetch_published(store, prefix, target)
    except NotPublished as exc:
        raise BadInput(f"{what} {prefix} is not published in the store") from exc


def _get(store: ObjectStore, key: str, dest: Path, what: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        store.get_file(key, dest)
    except ObjectNotFound as exc:
        raise BadInput(f"{what} {key} is not in the store") from exc
    return dest


def _dpo_settings(lineage_config: dict[str, Any], overrides: dict[str, Any], generation: Any) -> Any:
    """The DPO settings of the held-out measure: the checkpoint's training config (only the settings
    that define the measure), then the spec's overrides; without either, the clip size of the
    generated clips."""
    from huvidpo.evaluation.evaluate import DPO_SETTINGS
    from huvidpo.training.config import DPOConfig

    values: dict[str, Any] = {
        "num_frames": generation.num_frames, "height": generation.height, "width": generation.width,
    }  # fmt: skip
    values.update({k: v for k, v in lineage_config.items() if k in (*DPO_SETTINGS, "frame_stride")})
    values.update(overrides)
    return DPOConfig.from_mapping(values, source="dpo")


def evaluate(store: ObjectStore, spec: EvaluationSpec, work: Path, device: str) -> dict[str, Any]:
    """Fetch what ``spec`` names into ``work``, run the evaluation and return its report (checkpoint
    adapters named by their store prefixes)."""
    from huvidpo.evaluation.evaluate import EvaluationSpec as LibrarySpec
    from huvidpo.evaluation.evaluate import PromptCase, run_evaluation
    from huvidpo.pipeline import GenerationConfig

    try:
        generation = GenerationConfig(**spec.generation)
    except TypeError as exc:
        raise BadInput(f"generation: {exc}") from exc
    model = work / "model"
    _fetch(store, keys.model_prefix(spec.base_model), model, "base model")
    names = [spec.checkpoint_id]
    if spec.baseline not in (None, "base") and spec.baseline != spec.checkpoint_id:
        names.append(spec.baseline)
    checkpoints, lineage_config = {}, {}
    for cid in names:
        manifest = _fetch(store, keys.checkpoint_prefix(cid), work / "checkpoints" / cid, "checkpoint")
        if cid == spec.checkpoint_id:
            lineage_config = dict((manifest.get("lineage") or {}).get("config") or {})
        checkpoints[cid] = str(work / "checkpoints" / cid)
    heldout = dataset = None
    if spec.heldout_prefix:
        if not (spec.dataset and spec.version):
            raise BadInput("heldout_prefix needs the dataset and version its pairs belong to")
        _fetch(
            store,
            keys.dataset_version_prefix(spec.dataset, spec.version),
            work / "dataset",
            "dataset version",
        )
        dataset = str(work / "dataset" / "data")
        key = spec.heldout_prefix.rstrip("/") + "/heldout.jsonl"
        heldout = str(
            _get(store, key, work / "heldout.jsonl", "held-out pairs (compile with holdout_fraction > 0)")
        )
    prompts = []
    for i, p in enumerate(spec.prompts):
        first = None
        if p.first_frame:
            suffix = Path(p.first_frame).suffix or ".png"
            first = str(_get(store, p.first_frame, work / "first_frames" / f"{i:02d}{suffix}", "first frame"))
        prompts.append(PromptCase(p.prompt, first))
    clip = None
    if spec.clip_model:
        _fetch(store, spec.clip_model, work / "clip", "CLIP model")
        clip = str(work / "clip")
    lib = LibrarySpec(
        model=str(model), checkpoints=checkpoints, output_dir=str(work / "out"), prompts=prompts,
        seeds=list(spec.seeds), heldout_pairs=heldout, dataset=dataset, baseline=spec.baseline,
        generation=generation, dpo=_dpo_settings(lineage_config, spec.dpo, generation), clip_model=clip,
        motion_collapse_ratio=spec.motion_collapse_ratio, device=device, id=spec.id,
    )  # fmt: skip
    report = run_evaluation(lib, progress=log.info)
    for name, result in report["results"].items():
        result["adapter"] = keys.checkpoint_prefix(name) if name != "base" else None
    report["settings"]["base_model"] = spec.base_model
    return report


def _classify(exc: BaseException) -> tuple[ExitCode, str]:
    from huvidpo.data import DatasetError
    from huvidpo.evaluation import ClipModelError, EvaluationError
    from huvidpo.training.config import ConfigError

    if isinstance(exc, StoreUnavailable | ConnectionError | TimeoutError):
        return ExitCode.TRANSIENT, str(exc)
    bad = (BadInput, EvaluationError, ClipModelError, ConfigError, DatasetError, ChecksumMismatch, ValueError)
    if isinstance(exc, bad):
        return ExitCode.BAD_INPUT, str(exc)
    log.exception("evaluation failed")
    return ExitCode.FAILED, f"{type(exc).__name__}: {exc}"


def run(store: ObjectStore, settings: EvaluatorSettings) -> int:
    """Run one evaluation; returns the exit code (see the module docstring)."""
    eid = settings.evaluation_id
    if not eid:
        log.error("HUVIDPO_EVALUATOR_EVALUATION_ID is not set")
        return ExitCode.BAD_INPUT
    try:
        spec = read_spec(store, eid)
    except ObjectNotFound:
        log.error("evaluation %s has no spec in the store", eid)
        return ExitCode.BAD_INPUT
    except ValidationError as exc:
        log.error("evaluation %s: the stored spec is not valid: %s", eid, exc)
        return ExitCode.BAD_INPUT
    except StoreUnavailable as exc:
        log.warning("object store unavailable: %s", exc)
        return ExitCode.TRANSIENT
    try:
        stored, etag = read_evaluation_with_etag(store, eid)
    except ObjectNotFound:
        stored, etag = None, None
    except (ValidationError, ValueError):  # unreadable: written over, as its etag says
        info = store.stat(keys.evaluation_key(eid))
        stored, etag = None, info.etag if info is not None else None
    except StoreUnavailable as exc:
        log.warning("object store unavailable: %s", exc)
        return ExitCode.TRANSIENT
    if stored is not None and stored.state == "cancelled":  # before its Job started: nothing to run
        log.info("evaluation %s was cancelled; not running it", eid)
        return ExitCode.OK
    record = EvaluationRecord(
        id=eid,
        checkpoint_id=spec.checkpoint_id,
        baseline=spec.baseline,
        created_at=spec.created_at,
        state="running",
    )
    work = Path(settings.work_dir) / eid
    # Every write of the record is a compare-and-swap on the one before: a cancel in between (the
    # control plane writes "cancelled" the same way) makes the next write fail, and the cancel stands.
    try:
        etag = write_evaluation(store, record, if_match=etag, if_none_match=etag is None)
        work.mkdir(parents=True, exist_ok=True)
        report = evaluate(store, spec, work, settings.device)
        from huvidpo.evaluation.evaluate import plot_comparison

        png = plot_comparison(report, work / "comparison.png")
        store.put_file(keys.evaluation_plot_key(eid), png, content_type="image/png")
        final = EvaluationRecord.from_report(
            report, eid, checkpoint_id=spec.checkpoint_id, baseline=spec.baseline, created_at=spec.created_at,
            plot=keys.evaluation_plot_key(eid),
        )  # fmt: skip
        write_evaluation(store, final, if_match=etag)
    except PreconditionFailed:
        log.info("evaluation %s was cancelled while it ran; its result is not written", eid)
        return ExitCode.OK
    except Exception as exc:
        code, message = _classify(exc)
        # Name the user's objects, not this Job's local copies of them.
        message = message.replace(f"{work}/dataset/data/", "").replace(f"{work}/", "")
        if code == ExitCode.TRANSIENT:
            log.warning("evaluation %s: store unavailable, exit %d: %s", eid, code, message)
            return code
        log.error("evaluation %s failed (exit %d): %s", eid, code, message)
        try:
            failed = record.model_copy(update={"state": "failed", "error": message[:2000]})
            write_evaluation(store, failed, if_match=etag)
        except PreconditionFailed:
            log.info("evaluation %s was cancelled while it ran", eid)
            return ExitCode.OK
        except StoreUnavailable:
            return ExitCode.TRANSIENT
        return code
    log.info("evaluation %s of %s succeeded", eid, spec.checkpoint_id)
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout
    )
    try:
        settings = load_settings(EvaluatorSettings)
        store = make_store(load_settings(StoreSettings))
    except SettingsError as exc:
        print(f"huvidpo-evaluator: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return run(store, settings)
