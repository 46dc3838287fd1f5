"""Settings of every HuViDPO service, read from the environment once at start and passed down.

One pydantic-settings class per env prefix (see docs/CONTRACTS.md). No other module reads
``os.environ``: a service builds its settings object in ``main`` and hands it to what needs it.
Secrets are ``SecretStr`` so they never appear in a repr, a log line or a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as _SourceError

from services.common.auth import AuthConfig, AuthConfigError, parse_entries


class StoreSettings(BaseSettings):
    """``HUVIDPO_STORE_*``: where objects live (a local directory or an S3 bucket)."""

    model_config = SettingsConfigDict(env_prefix="HUVIDPO_STORE_", extra="ignore")

    backend: Literal["local", "s3"] = "local"
    root: Path = Path("./var/store")
    endpoint: str = "127.0.0.1:9000"
    # Address presigned S3 URLs name, if clients reach the server elsewhere (empty: ``endpoint``).
    public_endpoint: str = ""
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    bucket: str = "huvidpo"
    secure: bool = False
    # PEM bundle of the CA that signed the S3 endpoint's certificate (https); empty: public roots.
    ca_bundle: Path | None = None
    region: str = "us-east-1"
    create_bucket: bool = True
    # Multipart part size for streamed uploads; S3 requires at least 5 MiB for every part but the last.
    part_size: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    # LocalStore presigned URLs: signed with this HMAC key and served by the control plane at this base
    # (empty: the address the client used to reach the control plane; set it behind a proxy).
    presign_secret: SecretStr = SecretStr("")
    public_base_url: str = ""
    # Seconds before a request to the S3 endpoint gives up (connect and read).
    timeout_seconds: float = Field(default=30.0, gt=0)


def parse_shape(shape: str) -> tuple[int, int]:
    """``"2x8"`` -> ``(2, 8)``: nodes and GPUs (trainer processes) per node, both >= 1."""
    nodes, sep, gpus = shape.strip().lower().partition("x")
    if not sep or not nodes.isdigit() or not gpus.isdigit() or int(nodes) < 1 or int(gpus) < 1:
        raise ValueError(f"a shape is NODESxGPUS_PER_NODE with both at least 1 (e.g. 2x8), got {shape!r}")
    return int(nodes), int(gpus)


class AuthFields(BaseSettings):
    """Who may call a service and how it is reached: one token table for REST and gRPC (parsed by
    ``services.common.auth``), dev mode, and TLS. The token settings and ``HUVIDPO_DEV_MODE`` carry no
    service prefix (both services read the same variables); TLS files are per service."""

    model_config = SettingsConfigDict(populate_by_name=True)

    # Entries ``name:scope[,scope...]:sha256hex`` (or plain digests, admin); see services/common/auth.py.
    # ``HUVIDPO_CONTROLPLANE_TOKENS`` is the older name, still read.
    tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("tokens", "HUVIDPO_TOKENS", "HUVIDPO_CONTROLPLANE_TOKENS"),
    )
    # Older read-only tokens (comma-separated sha256 digests): each a ``read`` token.
    read_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("read_tokens", "HUVIDPO_CONTROLPLANE_READ_TOKENS"),
    )
    # A file of entries, one per line (a mounted Secret), read at start.
    tokens_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("tokens_file", "HUVIDPO_TOKENS_FILE")
    )
    # Development only: allows running without tokens on a loopback address, the public dev token
    # and the dev store key, and gRPC reflection by default.
    dev_mode: bool = Field(default=False, validation_alias=AliasChoices("dev_mode", "HUVIDPO_DEV_MODE"))
    # Serve TLS with this certificate chain and key (PEM files, e.g. a mounted Secret); both or neither.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None

    @field_validator("tokens", "read_tokens", mode="before")
    @classmethod
    def _one_entry_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [value] if value.strip() else []
        return value

    @field_validator("tokens")
    @classmethod
    def _entries_parse(cls, value: list[str]) -> list[str]:
        for raw in value:
            try:
                parse_entries(raw, "the token table")
            except AuthConfigError as exc:
                raise ValueError(str(exc).removeprefix("the token table: ")) from None
        return value

    @field_validator("read_tokens")
    @classmethod
    def _split_read(cls, value: list[str]) -> list[str]:
        return [d.strip().lower() for v in value for d in v.split(",") if d.strip()]

    @field_validator("tls_keyfile")
    @classmethod
    def _tls_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (value is None) != (info.data.get("tls_certfile") is None):
            raise ValueError(
                "TLS needs both a certificate file (_TLS_CERTFILE) and a key file (_TLS_KEYFILE)"
            )
        return value

    def auth_config(self) -> AuthConfig:
        return AuthConfig(list(self.tokens), list(self.read_tokens), self.tokens_file, self.dev_mode)


class ControlPlaneSettings(AuthFields):
    """``HUVIDPO_CONTROLPLANE_*``: the REST control plane."""

    model_config = SettingsConfigDict(env_prefix="HUVIDPO_CONTROLPLANE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # local: a subprocess (world size 1 only); kubernetes: batch/v1 Jobs (an Indexed Job across
    # nodes); trainjob: Kubeflow Trainer v2 TrainJobs (executors/trainjob.py).
    executor: Literal["local", "kubernetes", "trainjob"] = "local"
    # The fine-tune shapes a request may ask for, "NODESxGPUS_PER_NODE"; the first is the default.
    shapes: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["1x1"])
    namespace: str = "huvidpo"
    trainer_image: str = "huvidpo-trainer:latest"
    gpu_count: int = Field(default=0, ge=0)
    max_upload_bytes: int = Field(default=10 * 1024**3, gt=0)
    # Every other request body (JSON): counted while it arrives, 413 past it.
    max_request_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # Concurrent streamed responses (log follows) per bearer token; more get 429.
    max_streams_per_token: int = Field(default=4, ge=1)
    # Seconds between the rollout gate's checks of canaries that carry a policy (0: no background
    # checks; POST /v1/rollouts/{deployment}/evaluate still checks on demand).
    rollout_gate_seconds: float = Field(default=30.0, ge=0)
    # Local scratch space of the control plane (dataset commits, pair compiles, local executor runs).
    work_dir: Path = Path("./var/controlplane")
    # LocalExecutor: retries of the trainer after a transient failure (exit 75 or a crash).
    local_max_retries: int = Field(default=2, ge=0)
    # KubernetesExecutor: the trainer Job.
    trainer_command: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["python", "-m", "services.trainer"]
    )
    # The evaluation Job: the trainer image with this command (services/evaluator).
    evaluator_command: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["python", "-m", "services.evaluator"]
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    cpu_request: str = "2"
    memory_request: str = "8Gi"
    memory_limit: str = "32Gi"
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, str]] = Field(default_factory=list)
    service_account: str | None = None
    store_secret: str = "huvidpo-store-trainer"
    # PriorityClass of trainer Jobs (deploy/ creates huvidpo-training; empty: the cluster's default).
    priority_class: str | None = None
    job_backoff_limit: int = Field(default=3, ge=0)
    job_active_deadline_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    job_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=0)
    delete_propagation: Literal["Background", "Foreground"] = "Background"
    watch_timeout_seconds: int = Field(default=60, ge=1)
    resync_seconds: float = Field(default=300.0, gt=0)
    kube_context: str | None = None
    # --- multi-process trainers (world size > 1) ---
    # Kubeflow Trainer runtime a TrainJob refers to (a ClusterTrainingRuntime).
    trainjob_runtime: str = "torch-distributed"
    # Size of /dev/shm (a memory emptyDir) in every trainer pod: NCCL and DataLoader workers use it.
    shm_size: str = "8Gi"
    # Ephemeral storage of the trainer's work dir (inputs, checkpoints) per pod, requested and limited.
    work_dir_size: str = "50Gi"
    # Kueue LocalQueue trainer Jobs/TrainJobs are created in (suspended; Kueue admits the whole gang).
    # Empty: no queue, created running.
    queue_name: str = ""
    # torchrun's rendezvous port on node 0 (index 0 of a multi-node Indexed Job).
    rendezvous_port: int = Field(default=29500, ge=1024, le=65535)
    # Attempts of a multi-process fine-tune the control plane starts (a failed Indexed Job or TrainJob
    # is one attempt; its own retry counters are not a reliable budget).
    max_attempts: int = Field(default=3, ge=1)

    @field_validator("shapes", mode="before")
    @classmethod
    def _split_shapes(cls, value: object) -> object:
        if isinstance(value, str):
            return [s.strip().lower() for s in value.split(",") if s.strip()]
        return value

    @field_validator("shapes")
    @classmethod
    def _shapes_are_nxg(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one shape is needed (e.g. 1x1)")
        for shape in value:
            parse_shape(shape)
        return value

    @model_validator(mode="after")
    def _shapes_fit_a_node(self) -> ControlPlaneSettings:
        # gpu_count is a trainer node's GPUs: a 1x1 trainer gets them all (as before shapes), a
        # larger shape one per process, so no pod ever asks for more than gpu_count (the
        # admission policy's per-pod ceiling, deploy/base/trainer/job-policy.yaml).
        if self.gpu_count > 0:
            for nodes, gpus in self.allowed_shapes():
                if gpus > self.gpu_count:
                    raise ValueError(
                        f"shape {nodes}x{gpus} needs {gpus} GPUs per node; GPU_COUNT is {self.gpu_count}"
                    )
        return self

    def allowed_shapes(self) -> list[tuple[int, int]]:
        """(nodes, gpus_per_node) of every allowed shape, the default first."""
        return [parse_shape(s) for s in self.shapes]

    @field_validator("trainer_command", "evaluator_command", mode="before")
    @classmethod
    def _split_command(cls, value: object) -> object:
        if isinstance(value, str):
            return value.split()
        return value


class InferenceSettings(AuthFields):
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
    # Cost budget of one batch in decoded pixels (frames x height x width over its videos): the
    # default holds max_batch videos of 16 frames at 512x512, or one 32-frame 1024x1024 video.
    max_batch_pixels: int = Field(default=4 * 16 * 512 * 512, ge=1)
    # Videos up to this size come back inline, larger ones as a download URL. Below gRPC's default
    # 4 MiB receive limit so a client with default options can take any inline result.
    inline_limit_bytes: int = Field(default=3 * 1024 * 1024, ge=0)
    # --- added with the inference service (services/inference) ---
    # Where the base model and checkpoints fetched from the store are kept; torch device of the model.
    cache_dir: Path = Path("./var/inference")
    device: str = "cpu"
    # Model precision (huvidpo.precision): auto is bf16 on CUDA, fp32 on the CPU; the VAE never fp16.
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # torch.compile of the UNet at load (huvidpo.precision.compile_unet): off, or the backend (inductor
    # on a GPU). Compiling takes minutes before the service is ready; it pays off on long-lived replicas.
    compile: Literal["off", "inductor", "aot_eager", "eager"] = "off"
    # Checkpoint ids loaded at start besides the rollout's (served when a request names them).
    checkpoints: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # How long the worker waits for compatible requests to fill a batch (0: run what is queued).
    batch_wait_ms: float = Field(default=20.0, ge=0)
    # Request bounds (INVALID_ARGUMENT beyond them) and defaults for fields left at 0 / unset.
    max_frames: int = Field(default=32, ge=2)
    min_side: int = Field(default=32, ge=8)
    max_side: int = Field(default=1024, ge=8)
    max_steps: int = Field(default=100, ge=1)
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    default_frames: int = Field(default=16, ge=2)
    default_height: int = Field(default=320, ge=8)
    default_width: int = Field(default=512, ge=8)
    default_steps: int = Field(default=25, ge=1)
    default_guidance_scale: float = Field(default=12.5, ge=0)
    default_fps: float = Field(default=8.0, gt=0)
    # Lifetime of download URLs of videos over the inline limit.
    url_ttl_seconds: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    # The smoke generation every new checkpoint must pass before it serves.
    smoke_steps: int = Field(default=1, ge=1)
    smoke_frames: int = Field(default=2, ge=2)
    smoke_size: int = Field(default=64, ge=8)
    # Seed of the canary routing draws (unset: OS entropy); a fixed seed makes a split reproducible.
    routing_seed: int | None = None
    # Drain deadline on SIGTERM: queued and running requests get this long to finish (drain.py).
    grace_seconds: float = Field(default=10.0, ge=0)
    # gRPC server reflection (grpcurl list/describe); unset: on in dev mode only. Needs a valid token.
    reflection: bool | None = None
    # grpc.health.v1 without a token (kubelet gRPC probes carry none).
    health_open: bool = True
    # Store key prefixes a first_frame_uri may name; any other key answers like a missing one.
    first_frame_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["first-frames/", "datasets/"]
    )
    # This replica's id in its heartbeat record (rollouts/{deployment}/replicas/{id}.json); empty:
    # the pod name (HOSTNAME), else the host name.
    replica_id: str = Field(default="", pattern=r"^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?)?$")
    # Clients' connections are closed (GOAWAY; running calls go on) after this long, so that
    # round_robin clients re-resolve DNS and reach replicas added since (0: never).
    max_connection_age_seconds: float = Field(default=300.0, ge=0)

    @field_validator("checkpoints", "first_frame_prefixes", mode="before")
    @classmethod
    def _split_checkpoints(cls, value: object) -> object:
        if isinstance(value, str):
            return [c.strip() for c in value.split(",") if c.strip()]
        return value


class TrainerSettings(BaseSettings):
    """``HUVIDPO_TRAINER_*``: the training Job's entrypoint (the store comes from ``StoreSettings``)."""

    model_config = SettingsConfigDict(env_prefix="HUVIDPO_TRAINER_", extra="ignore")

    finetune_id: str = ""
    work_dir: Path = Path("./var/trainer")
    device: str = "cpu"
    # Upload a checkpoint every this many optimizer steps (0: only at the end).
    checkpoint_every: int = Field(default=0, ge=0)
    # ... and whenever this many minutes passed since the last one (0: off), so losing a node costs
    # at most this much work whatever the step rate (a fine-tune's own checkpoint_minutes wins).
    checkpoint_minutes: float = Field(default=30.0, ge=0, le=10_080)
    # Serve /metrics (step, loss, implicit reward accuracy...) here while training; 0: no server.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Keep serving /metrics this long after training ends, so a scraper sees the final values of a
    # run shorter than its scrape interval (skipped on SIGTERM).
    metrics_linger_seconds: float = Field(default=0.0, ge=0, le=600)


class EvaluatorSettings(BaseSettings):
    """``HUVIDPO_EVALUATOR_*``: the evaluation Job's entrypoint (``python -m services.evaluator``)."""

    model_config = SettingsConfigDict(env_prefix="HUVIDPO_EVALUATOR_", extra="ignore")

    evaluation_id: str = ""
    work_dir: Path = Path("./var/evaluator")
    device: str = "cpu"


S = TypeVar("S", bound=BaseSettings)


class SettingsError(ValueError):
    """An environment variable holds a value a service cannot start with. The message is one line
    naming the variable(s) and what is wrong, never the value (it may be a secret)."""


def load_settings(cls: type[S]) -> S:
    """``cls()`` read from the environment, or ``SettingsError`` naming each invalid variable.

    pydantic's own message echoes the input (``input_value='...'``), which may be a token; this one
    names the variable and the rule only."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    try:
        return cls()
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            loc = err.get("loc") or ()
            name = (prefix + str(loc[0])).upper() if loc else prefix.rstrip("_")
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            problems.append(f"{name}: {msg}")
        raise SettingsError("invalid setting " + "; ".join(problems)) from None
    except _SourceError as exc:
        # "error parsing value for field "x" from source ...": name the variable, not pydantic's words.
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else ""
        name = (prefix + field).upper() if field else prefix + "*"
        raise SettingsError(f"invalid setting {name}: not valid JSON for this setting") from None
