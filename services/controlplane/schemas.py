"""Pydantic models of every request and response body of the ``/v1`` API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from huvidpo.bounds import BOUNDS
from services.controlplane.domain.names import NAME_PATTERN, VERSION_PATTERN, validate_digest

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


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    files: list[str] = Field(min_length=1, max_length=1000, description="relative paths inside the dataset")
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


# --------------------------------------------------------------------------------------- fine-tunes
def _bounded(name: str) -> Any:
    """An optional option with its documented bound (``huvidpo.bounds``), shown in OpenAPI."""
    b = BOUNDS[name]
    return Field(default=None, gt=b.lo if b.lo_open else None, ge=None if b.lo_open else b.lo, le=b.hi)


class FineTuneHyperparameters(BaseModel):
    """Training options (``huvidpo.training`` config keys). The bounded ones are listed here; any
    other key is checked against the stage's config (unknown keys are refused)."""

    model_config = ConfigDict(extra="allow")

    num_frames: int | None = _bounded("num_frames")
    height: int | None = _bounded("height")
    width: int | None = _bounded("width")
    frame_stride: int | None = _bounded("frame_stride")
    lr: float | None = _bounded("lr")
    lr_warmup_steps: int | None = _bounded("lr_warmup_steps")
    batch_size: int | None = _bounded("batch_size")
    epochs: int | None = _bounded("epochs")
    max_steps: int | None = _bounded("max_steps")
    seed: int | None = _bounded("seed")
    checkpoint_every: int | None = _bounded("checkpoint_every")
    keep_last: int | None = _bounded("keep_last")
    eval_every: int | None = _bounded("eval_every")
    log_every: int | None = _bounded("log_every")
    beta: float | None = _bounded("beta")
    lora_rank: int | None = _bounded("lora_rank")
    eval_draws: int | None = _bounded("eval_draws")

    @field_validator(*(n for n in BOUNDS), mode="before")
    @classmethod
    def _within_bound(cls, value: Any, info: Any) -> Any:
        # Before the int conversion, which cannot even parse 1e23; the message says the bound.
        bound = BOUNDS[info.field_name]
        if isinstance(value, int | float) and not isinstance(value, bool) and not bound.contains(value):
            raise ValueError(f"{info.field_name} must be {bound.describe()}, got {value:g}")
        return value


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


# -------------------------------------------------------------------------------------- checkpoints
class Checkpoint(BaseModel):
    id: str
    finetune_id: str
    step: int
    created_at: str | None
    files: dict[str, FileDigest]
    lineage: dict[str, Any]


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
    # Only on GET /v1/rollouts/{deployment} (a list does not read every replica's heartbeat).
    status: RolloutStatus | None = None


class RolloutList(BaseModel):
    items: list[Rollout]
    next_page_token: str | None = None


class SetCurrent(Strict):
    # A checkpoint id, or "base" for the base model without a fine-tune.
    checkpoint: str = Field(min_length=1, max_length=200, examples=["ckpt-ft-abc-100", "base"])
    expected_revision: int | None = Field(default=None, ge=0)


class SetCanary(Strict):
    checkpoint: str = Field(min_length=1, max_length=200)
    percent: int = Field(ge=1, le=100)
    expected_revision: int | None = Field(default=None, ge=0)


class RolloutAction(Strict):
    expected_revision: int | None = Field(default=None, ge=0)


# ------------------------------------------------------------------------------------------- health
class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
