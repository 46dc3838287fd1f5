"""Settings of every HuViDPO service, read from the environment once at start and passed down.

One pydantic-settings class per env prefix (see docs/CONTRACTS.md). No other module reads
``os.environ``: a service builds its settings object in ``main`` and hands it to what needs it.
Secrets are ``SecretStr`` so they never appear in a repr, a log line or a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class StoreSettings(BaseSettings):
    """``HUVIDPO_STORE_*``: where objects live (a local directory or an S3 bucket)."""

    model_config = SettingsConfigDict(env_prefix="HUVIDPO_STORE_", extra="ignore")

    backend: Literal["local", "s3"] = "local"
    root: Path = Path("./var/store")
    endpoint: str = "127.0.0.1:9000"
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    bucket: str = "huvidpo"
    secure: bool = False
    region: str = "us-east-1"
    create_bucket: bool = True
    # Multipart part size for streamed uploads; S3 requires at least 5 MiB for every part but the last.
    part_size: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024)
    # LocalStore presigned URLs: signed with this HMAC key and served by the control plane at this base.
    presign_secret: SecretStr = SecretStr("")
    public_base_url: str = "http://127.0.0.1:8080"
    # Seconds before a request to the S3 endpoint gives up (connect and read).
    timeout_seconds: float = Field(default=30.0, gt=0)


class ControlPlaneSettings(BaseSettings):
    """``HUVIDPO_CONTROLPLANE_*``: the REST control plane."""

    model_config = SettingsConfigDict(env_prefix="HUVIDPO_CONTROLPLANE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # sha256 hex digests of accepted bearer tokens (comma-separated in the environment).
    tokens: Annotated[list[str], NoDecode] = Field(default_factory=list)
    executor: Literal["local", "kubernetes"] = "local"
    namespace: str = "huvidpo"
    trainer_image: str = "huvidpo-trainer:latest"
    gpu_count: int = Field(default=0, ge=0)
    max_upload_bytes: int = Field(default=10 * 1024**3, gt=0)

    @field_validator("tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return [t.strip().lower() for t in value.split(",") if t.strip()]
        return value

    @field_validator("tokens")
    @classmethod
    def _tokens_are_sha256(cls, value: list[str]) -> list[str]:
        for token in value:
            if len(token) != 64 or any(c not in "0123456789abcdef" for c in token.lower()):
                raise ValueError("each token must be a sha256 hex digest (64 hex characters)")
        return [t.lower() for t in value]


class InferenceSettings(BaseSettings):
    """``HUVIDPO_INFERENCE_*``: the gRPC inference service."""

    model_config = SettingsConfigDict(env_prefix="HUVIDPO_INFERENCE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    # A local directory or ``models/{id}`` in the object store.
    base_model: str = "models/tiny"
    deployment: str = "default"
    poll_seconds: float = Field(default=5.0, gt=0)
    max_queue: int = Field(default=16, ge=1)
    max_batch: int = Field(default=4, ge=1)
    inline_limit_bytes: int = Field(default=4 * 1024 * 1024, ge=0)


class TrainerSettings(BaseSettings):
    """``HUVIDPO_TRAINER_*``: the training Job's entrypoint (the store comes from ``StoreSettings``)."""

    model_config = SettingsConfigDict(env_prefix="HUVIDPO_TRAINER_", extra="ignore")

    finetune_id: str = ""
    work_dir: Path = Path("./var/trainer")
    device: str = "cpu"
    # Upload a checkpoint every this many optimizer steps (0: only at the end).
    checkpoint_every: int = Field(default=0, ge=0)
