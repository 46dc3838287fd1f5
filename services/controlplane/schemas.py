"""Pydantic models of every request and response body of the ``/v1`` API."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from huvidpo.bounds import BOUNDS
from services.common.records import hyperparameters
from services.controlplane.domain.datasets import ALLOWED_EXTENSIONS
from services.controlplane.domain.gate import RolloutPolicy
from services.controlplane.domain.names import MAX_PATH_LEN, NAME_PATTERN, VERSION_PATTERN, validate_digest

Name = Field(pattern=NAME_PATTERN, min_length=1, max_length=63)
VersionRef = Annotated[
    str,
    Field(
        pattern=VERSION_PATTERN,
        description="a dataset version: its `id` (64 hex) or its `digest` (`sha256:<id>`)",
    ),
    AfterValidator(validate_digest),
]
"""A dataset version in a request body; either form is accepted and becomes the ``id`` form."""


def _is_number(annotation: Any) -> bool:
    types = get_args(annotation) or (annotation,)
    return bool not in types and any(t in (int, float) for t in types)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true/false as 1/0 for a number; the schema says "integer"/"number".
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _is_number(field.annotation):
            raise ValueError("must be a number, not true or false")
        return value


def _any_case(extension: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in extension)


# A file of a dataset as a request body names it: a relative path (as ``validate_relative_path``)
# whose name ends in one of the dataset file types (as ``check_file_type``, any case).
DATASET_FILE_PATTERN = (
    r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}/){0,7}[A-Za-z0-9_-][A-Za-z0-9._-]{0,121}("
    + "|".join(_any_case(e) for e in sorted(ALLOWED_EXTENSIONS))
    + ")$"
)
DatasetFile = Annotated[str, Field(pattern=DATASET_FILE_PATTERN, min_length=1, max_length=MAX_PATH_LEN)]
# A checkpoint id (``ckpt-<finetune_id>-<step>``); what a rollout serves is one or ``base``, the base
# model without a fine-tune (a canary is always a checkpoint).
CHECKPOINT_PATTERN = r"^ckpt-[a-z0-9-]{1,63}-[0-9]{1,10}$"
SERVED_PATTERN = r"^(base|ckpt-[a-z0-9-]{1,63}-[0-9]{1,10})$"


# ---------------------------------------------------------------------------------------- datasets
class DatasetCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=63, examples=["cats-smile"])
    description: str = Field(default="", max_length=2000)


class Dataset(BaseModel):
    name: str
    description: str
    created_at: str
    versions: list[str]


class DatasetList(BaseModel):
    items: list[Dataset]
    next_page_token: str | None = None


class FileDigest(BaseModel):
    sha256: str | None
    size: int


class SkippedRating(BaseModel):
    """A stored rating record left out of a version, and why (delete it to stop seeing it)."""

    id: str
    reason: str


class VersionValidation(BaseModel):
    state: Literal["pending", "passed", "failed"]
    video_stats: dict[str, int | None] | None = None
    problems: list[str] = Field(default_factory=list, description="each bad file, named as uploaded")
    validated_at: str | None = None


class DatasetVersion(BaseModel):
    id: str = Field(description="sha256 of the version's file listing; the version's immutable name")
    dataset: str
    digest: str
    files: dict[str, FileDigest]
    videos: int
    prompts: int
    raters: int
    rating_records: int
    created_by: str = Field(default="", description="name of the token that built the version")
    skipped_ratings: list[SkippedRating] = Field(
        default_factory=list,
        description="in the answer to the request that built the version: the stored rating records "
        "left out because they name videos this version lacks (empty when read later)",
    )
    video_stats: dict[str, int | None] | None = Field(
        default=None,
        description="videos, min_frames, min_height, min_width: the bounds of a fine-tune's clips "
        "(null until the validation passed)",
    )
    validation: VersionValidation | None = Field(
        default=None,
        description="the background check that decodes every video (frame counts, sizes); commit "
        "answers before it ran",
    )
    size: int
    source: dict[str, Any]
    created_at: str


class DatasetVersionList(BaseModel):
    items: list[DatasetVersion]


class UploadSession(BaseModel):
    id: str
    dataset: str
    created_at: str
    files: dict[str, FileDigest] = Field(default_factory=dict)


class UploadedFile(BaseModel):
    path: str
    size: int
    sha256: str | None


class UploadResult(BaseModel):
    files: list[UploadedFile]


class PresignRequest(Strict):
    files: list[DatasetFile] = Field(
        min_length=1, max_length=1000, description="relative paths inside the dataset"
    )
    expires_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)


class PresignResponse(BaseModel):
    urls: dict[str, str]
    expires_seconds: int


class CommitRequest(Strict):
    include_ratings: bool = True


class DeriveRequest(Strict):
    base: VersionRef = Field(description="the version to start from (id or digest)")
    include_ratings: bool = True


class RatingRecord(Strict):
    """An absolute score of one video by one rater."""

    type: Literal["rating"] = "rating"
    video_id: str = Field(min_length=1, max_length=256)
    rater_id: str = Field(min_length=1, max_length=256)
    score: float = Field(ge=0, le=10)
    time: str | None = Field(default=None, max_length=64)


class ChoiceRecord(Strict):
    """An explicit preference of one rater between two videos of the same prompt."""

    type: Literal["choice"] = "choice"
    chosen: str = Field(min_length=1, max_length=256)
    rejected: str = Field(min_length=1, max_length=256)
    rater_id: str = Field(min_length=1, max_length=256)
    time: str | None = Field(default=None, max_length=64)


class RatingsCreate(Strict):
    records: list[RatingRecord | ChoiceRecord] = Field(min_length=1, max_length=500)


class RatingsCreated(BaseModel):
    ids: list[str]


class StoredRating(BaseModel):
    id: str
    record: dict[str, Any]


class RatingList(BaseModel):
    items: list[StoredRating]
    next_page_token: str | None = None


class PairsRequest(Strict):
    tie_policy: Literal["drop", "keep"] = "drop"
    min_margin: float = Field(default=0.0, ge=0, le=10)
    margin_weighting: bool = False
    # The fine-tune's ``seed`` hyperparameter (default 33): the same options and seed give the pairs
    # a fine-tune trains on.
    seed: int = Field(default=33, ge=0, le=BOUNDS["seed"].hi)
    # Whole prompts held out for evaluation (heldout.jsonl beside pairs.jsonl); a DPO fine-tune with
    # the hyperparameters holdout_fraction and seed S trains on the pairs of seed S, holdout_seed S.
    holdout_fraction: float = Field(default=0.0, ge=0, lt=1)
    holdout_seed: int | None = Field(default=None, ge=0, le=BOUNDS["seed"].hi, description="default: seed")


class PairsReport(BaseModel):
    dataset: str
    version: str
    options: dict[str, Any]
    pairs: int
    pairs_sha256: str | None
    # The held-out pairs (heldout.jsonl; report.holdout names their prompts); 0 and null without.
    heldout: int = 0
    heldout_sha256: str | None = None
    report: dict[str, Any]
    text: str
    # False while the version's validation has not measured its videos' motion: the report's motion
    # check is pending (the pairs are the same either way; the report is compiled again after).
    motion_measured: bool = True


# ------------------------------------------------------------------------------------------ models
ModelId = Field(
    pattern=NAME_PATTERN,
    min_length=1,
    max_length=63,
    description="the model's id: its store prefix models/{id}/ and the base_model of fine-tunes",
    examples=["sd15"],
)


class ModelRegister(Strict):
    """Register files already in the object store (put under ``imports/``) as a base model."""

    id: str = ModelId
    from_prefix: str = Field(
        pattern=r"^imports/[A-Za-z0-9_-][A-Za-z0-9._/-]*$",
        max_length=512,
        description="the store prefix (a folder under imports/) holding the diffusers model directory",
        examples=["imports/sd15/"],
    )
    description: str = Field(default="", max_length=2000)


class Model(BaseModel):
    id: str
    prefix: str = Field(description="models/{id}/: where its manifest is published")
    digest: str = Field(
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="sha256 over the sorted path, sha256 and size of its files (the lineage digest)",
    )
    unet: Literal["video", "image"] = Field(
        description="video: a HuViDPO VideoUNet; image: an SD-1.x 2D UNet, inflated to video on first use"
    )
    files: int
    size_bytes: int
    created_at: str | None
    created_by: str = Field(default="", description="name of the token that registered it")
    description: str = ""


class ModelList(BaseModel):
    items: list[Model]
    next_page_token: str | None = None


# --------------------------------------------------------------------------------------- fine-tunes
# Every option either stage takes, with its description and bounds (declared once, in
# huvidpo.training.config); unknown names are refused by the domain's check, which suggests one.
if TYPE_CHECKING:
    FineTuneHyperparameters = BaseModel
else:
    FineTuneHyperparameters = hyperparameters.request_model("FineTuneHyperparameters")


class FineTuneCreate(Strict):
    dataset: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=63)
    version: VersionRef = Field(description="dataset version (id or digest)")
    base_model: str = Field(
        pattern=NAME_PATTERN, min_length=1, max_length=63, description="models/{id} in the store"
    )
    stage: Literal["dpo", "stage1"] = "dpo"
    hyperparameters: FineTuneHyperparameters = Field(
        default_factory=FineTuneHyperparameters,
        description="training options (huvidpo.training config keys)",
    )
    nodes: int | None = Field(
        default=None, ge=1, le=1024, description="nodes to train on (default: the default shape's)"
    )
    gpus_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="GPUs (trainer processes) per node; nodes x gpus_per_node must be one of the "
        "control plane's allowed shapes (HUVIDPO_CONTROLPLANE_SHAPES)",
    )


class Progress(BaseModel):
    step: int
    total_steps: int | None
    loss: float | None
    reward_accuracy: float | None
    reward_margin: float | None
    eta_seconds: float | None
    attempts: int
    resumed_from_step: int | None
    updated_at: str | None


class FineTune(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    reason: str | None
    message: str | None
    created_at: str
    created_by: str = Field(default="", description="name of the token that created it")
    updated_at: str
    finished_at: str | None
    dataset: str
    version: str
    base_model: str
    stage: str
    hyperparameters: dict[str, Any]
    nodes: int = 1
    gpus_per_node: int = 1
    world_size: int = Field(default=1, description="trainer processes: nodes x gpus_per_node")
    lineage: dict[str, Any]
    job: dict[str, Any] | None
    attempt: int = Field(default=1, description="attempts started (a failed group restarts whole)")
    progress: Progress
    checkpoints: list[str]
    # The compiled pairs a DPO fine-tune trains on: {"prefix", "digest" (pairs.jsonl's sha256), "options"}.
    pairs: dict[str, Any] | None = None


class FineTuneList(BaseModel):
    items: list[FineTune]
    next_page_token: str | None = None


class FineTuneEvent(BaseModel):
    """One progress record of the trainer (``services.common.records.progress``) with its position;
    the fields are the event's own (start: total_steps, resumed_from_step, attempt; step: step, loss,
    implicit_acc, reward_margin, ...; checkpoint: step, checkpoint_id; end: state, exit_code, reason,
    message)."""

    model_config = ConfigDict(extra="allow")

    seq: int = Field(ge=0, description="0-based position in the fine-tune's event log")
    event: Literal["start", "step", "checkpoint", "end"]
    time: str | None = None


class FineTuneEventPage(BaseModel):
    items: list[FineTuneEvent]
    next_after: int | None = Field(description="the last item's seq (pass it as after); null when no item")


class FineTuneMetrics(BaseModel):
    finetune_id: str
    steps: list[int] = Field(
        description="optimizer steps, ascending (a step redone after a retry: its last value)"
    )
    metrics: dict[str, list[int | float | None]] = Field(
        description="every numeric field of the step events, one value per entry of steps"
    )


# -------------------------------------------------------------------------------------- checkpoints
class EvaluationSummary(BaseModel):
    """A succeeded evaluation in brief: the checkpoint's held-out accuracy and margin, its motion
    against the base's, per prompt."""

    evaluation_id: str
    created_at: str
    baseline: str | None
    heldout_implicit_acc: float | None
    heldout_reward_margin: float | None
    heldout_pairs: int | None
    motion: float | None = Field(description="mean optical-flow magnitude of its clips (px/frame)")
    base_motion: float | None
    motion_ratio: float | None
    motion_collapse: bool | None
    clip_score: float | None
    clip_skipped: str | None = Field(None, description="why text-video alignment was not measured")
    warp_error: float | None = Field(
        None, description="mean frame-to-frame difference after optical-flow warping (lower: more consistent)"
    )
    base_warp_error: float | None = None
    flicker: float | None = Field(None, description="high-frequency temporal energy (lower: less flicker)")
    base_flicker: float | None = None
    first_frame_psnr: float | None = Field(
        None, description="frame 0 against the given first frame (dB; null: no first frame given)"
    )
    base_first_frame_psnr: float | None = None
    per_prompt: dict[str, dict[str, Any]] = Field(
        description="prompt -> {heldout: {implicit_acc, reward_margin, pairs}, motion}"
    )
    url: str
    plot_url: str | None


class CheckpointSample(BaseModel):
    index: int
    prompt: str
    seed: int
    url: str = Field(description="GET it for the mp4: /v1/checkpoints/{id}/samples/{index}")


class Checkpoint(BaseModel):
    id: str
    finetune_id: str
    step: int
    created_at: str | None
    files: dict[str, FileDigest]
    lineage: dict[str, Any]
    samples: list[CheckpointSample] = Field(
        default_factory=list, description="sample videos rendered at this checkpoint (empty when none)"
    )
    evaluation: EvaluationSummary | None = Field(
        default=None,
        description="its latest succeeded evaluation (GET /v1/checkpoints/{id} only; null in listings)",
    )


class CheckpointList(BaseModel):
    items: list[Checkpoint]
    next_page_token: str | None = None


class CheckpointDownload(BaseModel):
    id: str
    urls: dict[str, str]
    expires_at: str


# ----------------------------------------------------------------------------------------- rollouts
class RolloutHistoryEntry(BaseModel):
    revision: int
    action: str
    current: str | None
    canary: str | None
    canary_percent: int
    updated_at: str
    reason: str | None = None
    actor: str = Field(default="", description="name of the token that made the change")
    decision: Literal["promote", "rollback", "wait"] | None = Field(
        default=None, description="the rollout gate's decision (null for a manual change)"
    )
    reasons: list[str] = Field(default_factory=list, description="why the gate decided so")


class RolloutTarget(BaseModel):
    revision: int
    # A checkpoint id, or "base" for the base model.
    current: str
    canary: str | None
    canary_percent: int


class ReplicaStatus(RolloutTarget):
    """What one live inference replica serves (its heartbeat, refreshed every poll)."""

    replica: str = Field(description="The replica's id: its pod name in Kubernetes.")
    state: Literal["loading", "serving", "draining"]
    updated_at: str
    up_to_date: bool = Field(description="Serving (not loading or draining) exactly what is desired.")


class Condition(BaseModel):
    type: Literal["Ready"]
    status: Literal["True", "False"]
    reason: str
    message: str


class RolloutStatus(BaseModel):
    """Desired vs served, as KServe's InferenceService status: Ready is True when at least one
    replica takes requests and every one that does serves the desired revision and checkpoints."""

    desired: RolloutTarget
    replicas: list[ReplicaStatus]
    conditions: list[Condition]


class Rollout(BaseModel):
    deployment: str
    revision: int
    current: str | None
    canary: str | None
    canary_percent: int
    updated_at: str
    history: list[RolloutHistoryEntry]
    policy: RolloutPolicy | None = Field(default=None, description="the canary's promotion policy")
    # Only on GET /v1/rollouts/{deployment} (a list does not read every replica's heartbeat).
    status: RolloutStatus | None = None


class RolloutList(BaseModel):
    items: list[Rollout]
    next_page_token: str | None = None


class SetCurrent(Strict):
    # A checkpoint id, or "base" for the base model without a fine-tune.
    checkpoint: str = Field(
        min_length=1, max_length=200, pattern=SERVED_PATTERN, examples=["ckpt-ft-abc-100", "base"]
    )
    expected_revision: int | None = Field(default=None, ge=0)


class SetCanary(Strict):
    checkpoint: str = Field(min_length=1, max_length=200, pattern=CHECKPOINT_PATTERN)
    percent: int = Field(ge=1, le=100, description="the canary's share of requests")
    expected_revision: int | None = Field(default=None, ge=0)
    policy: RolloutPolicy | None = Field(
        default=None, description="promote or roll back automatically by this policy (the rollout gate)"
    )


class GateDecision(BaseModel):
    deployment: str
    revision: int = Field(description="the rollout revision the decision was made on")
    decision: Literal["promote", "rollback", "wait"]
    reasons: list[str]
    applied: bool = Field(description="whether this call promoted or rolled back (or recorded the wait)")
    rollout: Rollout


class RolloutAction(Strict):
    expected_revision: int | None = Field(default=None, ge=0)


# ------------------------------------------------------------------------------------------- health
class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


# -------------------------------------------------------------------------------------- evaluations
class EvaluationPrompt(Strict):
    prompt: str = Field(min_length=1, max_length=1000)
    first_frame: str | None = Field(
        default=None,
        max_length=MAX_PATH_LEN,
        description="an image file of the evaluation's dataset version (a path as its `files` list it); "
        "none: a first frame drawn from the prompt",
    )


class EvaluationGeneration(Strict):
    """How the clips are generated (``huvidpo.pipeline.GenerationConfig``); the clip size defaults
    to the fine-tune's training size, the rest to the pipeline's defaults."""

    num_frames: int | None = Field(default=None, ge=2, le=128)
    height: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)
    width: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)
    steps: int | None = Field(default=None, ge=1, le=999)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    eta: float | None = Field(default=None, ge=0, le=1)
    negative_prompt: str | None = Field(default=None, max_length=1000)
    shared_noise_ratio: float | None = Field(default=None, ge=0, lt=1)
    first_frame_steps: int | None = Field(default=None, ge=1, le=999)


class EvaluationDPO(Strict):
    """Overrides of the DPO settings of the held-out measure (default: the checkpoint's training config)."""

    beta: float | None = Field(default=None, gt=0, le=1e6)
    timestep_min: int | None = Field(default=None, ge=0, le=999)
    timestep_max: int | None = Field(default=None, ge=1, le=1000)
    eval_draws: int | None = Field(default=None, ge=1, le=64)
    seed: int | None = Field(default=None, ge=0, le=BOUNDS["seed"].hi)
    loss_skip_first_frame: bool | None = None


class EvaluationCreate(Strict):
    checkpoint: str = Field(
        max_length=80, pattern=CHECKPOINT_PATTERN, description="the checkpoint to evaluate"
    )
    baseline: str | None = Field(
        default="base",
        max_length=80,
        pattern=r"^(base|ckpt-[a-z0-9-]{1,63}-[0-9]{1,10})$",
        description="compared with: 'base' (the base model), another checkpoint id, or null (none)",
    )
    dataset: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        min_length=1,
        max_length=63,
        description="whose held-out pairs (default: the checkpoint's fine-tune's dataset)",
    )
    version: VersionRef | None = Field(default=None, description="with dataset: its version (id or digest)")
    pairs: PairsRequest | None = Field(
        default=None,
        description="compile the version's pairs with these options (holdout_fraction > 0) and use their "
        "held-out pairs; default: the pairs the fine-tune held out",
    )
    prompts: list[EvaluationPrompt] | None = Field(
        default=None, min_length=1, max_length=64, description="the prompt set; default: the held-out prompts"
    )
    seeds: list[Annotated[int, Field(ge=0, le=BOUNDS["seed"].hi)]] | None = Field(
        default=None, min_length=1, max_length=16, description="one clip per prompt and seed (default [0, 1])"
    )
    generation: EvaluationGeneration = Field(default_factory=EvaluationGeneration)
    dpo: EvaluationDPO = Field(default_factory=EvaluationDPO)
    clip_model: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        min_length=1,
        max_length=63,
        description="a CLIP model in the store (models/{id}/, Hugging Face layout) for text-video "
        "alignment; none: skipped",
    )
    motion_collapse_ratio: float = Field(
        default=0.7, gt=0, le=1, description="motion below this share of the base's is motion collapse"
    )


class Evaluation(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    error: str | None
    checkpoint_id: str
    baseline: str | None
    created_at: str
    created_by: str = ""
    spec: dict[str, Any] = Field(description="what the Job evaluates (records.evaluation.EvaluationSpec)")
    job: dict[str, Any] | None
    summary: EvaluationSummary | None = Field(description="once succeeded")
    record: dict[str, Any] | None = Field(
        description="the full report once finished (records.evaluation.EvaluationRecord)"
    )
    plot_url: str | None


class EvaluationList(BaseModel):
    items: list[Evaluation]
    next_page_token: str | None = None
