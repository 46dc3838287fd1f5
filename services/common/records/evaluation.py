"""An evaluation of a checkpoint in the store: ``evaluations/{id}.json`` (``EvaluationRecord``).

The record is the report of ``huvidpo.evaluation.run_evaluation`` (``huvidpo eval`` writes the same
fields to ``report.json``) plus the evaluation's id and state. Its top-level fields are what a
rollout gate reads: the checkpoint's held-out implicit reward accuracy and mean reward margin
against the reference (the base model), and whether its motion collapsed against the base's.
``results`` holds every evaluated model (``"base"`` and the checkpoints by id): held-out statistics
overall and per prompt, video statistics overall and per prompt, the CLIP score or the reason it was
skipped. Its comparison PNG is stored at ``evaluations/{id}/comparison.png`` and its input, the
``EvaluationSpec``, at ``evaluations/{id}/spec.json``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.records import keys
from services.common.store import ObjectStore

EvaluationState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class PromptRef(BaseModel):
    """One prompt of an evaluation's prompt set; ``first_frame``: the store key of its image (None:
    drawn from the prompt)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    prompt: str = Field(min_length=1)
    first_frame: str | None = None


class EvaluationSpec(BaseModel):
    """What to evaluate: ``evaluations/{id}/spec.json``, written once at create, the evaluation Job's
    only input (``python -m services.evaluator``).

    ``checkpoint_id`` is evaluated against its base model ``base_model`` (``models/{id}/``) and,
    when ``baseline`` is another checkpoint id, beside that one. Held-out pairs: ``heldout.jsonl``
    under ``heldout_prefix`` (a compiled pairs directory of ``dataset`` at ``version``). ``dpo``:
    overrides of the DPO settings the held-out measure uses (beta, timestep_min/max, eval_draws, clip
    size); by default those the checkpoint was trained with (its lineage's config). ``generation``:
    ``huvidpo.pipeline.GenerationConfig`` fields for the clips. ``clip_model``: the store prefix of a
    published CLIP directory (Hugging Face layout), or None to skip text-video alignment."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    created_at: str
    checkpoint_id: str
    base_model: str
    baseline: str | None = "base"
    dataset: str | None = None
    version: str | None = None
    heldout_prefix: str | None = None
    prompts: list[PromptRef] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    generation: dict[str, Any] = Field(default_factory=dict)
    dpo: dict[str, Any] = Field(default_factory=dict)
    clip_model: str | None = None
    motion_collapse_ratio: float = Field(default=0.7, gt=0, le=1)
    created_by: str = ""


class HeldoutPromptResult(BaseModel):
    model_config = ConfigDict(extra="ignore")

    implicit_acc: float = Field(ge=0, le=1)
    reward_margin: float
    pairs: int = Field(ge=0)


class HeldoutResult(HeldoutPromptResult):
    """The DPO implicit reward accuracy (share of held-out pairs whose reward margin is > 0) and the
    mean reward margin, against the reference; overall and per prompt."""

    per_prompt: dict[str, HeldoutPromptResult] = Field(default_factory=dict)


class VideoStatistics(BaseModel):
    """Means over clips (``huvidpo.evaluation.video_stats`` defines each): ``motion`` in px/frame,
    ``warp_error`` and ``flicker`` in [0, 1] intensity units (lower is better), first-frame PSNR (dB)
    and mean absolute difference (None without given first frames)."""

    model_config = ConfigDict(extra="ignore")

    clips: int = Field(ge=0)
    frames: int = Field(ge=0)
    motion: float | None = None
    warp_error: float | None = None
    flicker: float | None = None
    first_frame_psnr: float | None = None
    first_frame_mae: float | None = None


class PromptVideoResult(VideoStatistics):
    prompt: str
    first_frame: str | None = None
    seeds: list[int] = Field(default_factory=list)
    clip_score: float | None = None


class CheckpointEvaluation(BaseModel):
    """One evaluated model: the base (``name == "base"``) or a checkpoint."""

    model_config = ConfigDict(extra="ignore")

    name: str
    adapter: str | None = None
    heldout: HeldoutResult | None = None
    heldout_skipped: str | None = None
    video: VideoStatistics | None = None
    prompts: list[PromptVideoResult] = Field(default_factory=list)
    clip_score: float | None = None
    clip_skipped: str | None = None
    # Against the base's motion on the same prompts, seeds and first frames (None for the base).
    motion_ratio: float | None = None
    motion_collapse: bool | None = None


class EvaluationRecord(BaseModel):
    """An evaluation of ``checkpoint_id`` (compared with ``baseline``: a checkpoint id, ``"base"`` or
    None). The three gate fields are None until the evaluation succeeded (or when not measured)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    checkpoint_id: str
    baseline: str | None = None
    created_at: str
    state: EvaluationState = "queued"
    heldout_implicit_acc: float | None = Field(default=None, ge=0, le=1)
    heldout_reward_margin: float | None = None
    motion_collapse: bool | None = None
    results: dict[str, CheckpointEvaluation] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    seconds: dict[str, float] = Field(default_factory=dict)
    error: str | None = None
    plot: str | None = None  # store key of the comparison PNG

    @classmethod
    def from_report(cls, report: dict[str, Any], evaluation_id: str, **changes: Any) -> EvaluationRecord:
        """The record of a library report (``run_evaluation``'s return value) under ``evaluation_id``."""
        return cls.model_validate({**report, "id": evaluation_id, **changes})


def write_spec(store: ObjectStore, spec: EvaluationSpec) -> None:
    store.put_bytes(
        keys.evaluation_spec_key(spec.id),
        spec.model_dump_json(indent=2).encode(),
        content_type="application/json",
    )


def read_spec(store: ObjectStore, evaluation_id: str) -> EvaluationSpec:
    """The stored spec (``ObjectNotFound`` when there is none)."""
    return EvaluationSpec.model_validate_json(store.get_bytes(keys.evaluation_spec_key(evaluation_id)))


def write_evaluation(
    store: ObjectStore, record: EvaluationRecord, *, if_match: str | None = None, if_none_match: bool = False
) -> str | None:
    """Write the record; returns its etag. With ``if_match`` only over the record of that etag, with
    ``if_none_match`` only where there is none (``PreconditionFailed`` otherwise): the evaluator and a
    cancel write so, and whichever comes second sees the other."""
    info = store.put_bytes(
        keys.evaluation_key(record.id),
        record.model_dump_json(indent=2).encode(),
        content_type="application/json",
        if_match=if_match,
        if_none_match=if_none_match,
    )
    return info.etag


def read_evaluation(store: ObjectStore, evaluation_id: str) -> EvaluationRecord:
    """The stored record (``ObjectNotFound`` when there is none)."""
    return EvaluationRecord.model_validate_json(store.get_bytes(keys.evaluation_key(evaluation_id)))


def read_evaluation_with_etag(store: ObjectStore, evaluation_id: str) -> tuple[EvaluationRecord, str | None]:
    """The stored record and the etag of the bytes read, for a later ``write_evaluation(if_match=)``."""
    data, etag = store.get_bytes_with_etag(keys.evaluation_key(evaluation_id))
    return EvaluationRecord.model_validate_json(data), etag
