"""Pydantic models of every request and response body of the ``/v1`` API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.controlplane.domain.names import DIGEST_PATTERN, NAME_PATTERN

Name = Field(pattern=NAME_PATTERN, min_length=1, max_length=63)


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


class DatasetVersion(BaseModel):
    id: str = Field(description="sha256 of the version's file listing; the version's immutable name")
    dataset: str
    digest: str
    files: dict[str, FileDigest]
    videos: int
    prompts: int
    raters: int
    rating_records: int
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
    base: str = Field(pattern=DIGEST_PATTERN, description="the version to start from")
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


class PairsReport(BaseModel):
    dataset: str
    version: str
    options: dict[str, Any]
    pairs: int
    pairs_sha256: str | None
    report: dict[str, Any]
    text: str


# --------------------------------------------------------------------------------------- fine-tunes
class FineTuneCreate(Strict):
    dataset: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=63)
    version: str = Field(pattern=DIGEST_PATTERN, description="dataset version (digest)")
    base_model: str = Field(
        pattern=NAME_PATTERN, min_length=1, max_length=63, description="models/{id} in the store"
    )
    stage: Literal["dpo", "stage1"] = "dpo"
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="training options (huvidpo.training config keys)", max_length=200
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
    updated_at: str
    finished_at: str | None
    dataset: str
    version: str
    base_model: str
    stage: str
    hyperparameters: dict[str, Any]
    lineage: dict[str, Any]
    job: dict[str, Any] | None
    progress: Progress
    checkpoints: list[str]


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


class Rollout(BaseModel):
    deployment: str
    revision: int
    current: str | None
    canary: str | None
    canary_percent: int
    updated_at: str
    history: list[RolloutHistoryEntry]


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
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
