"""Trainer configuration: every knob of the method spec (section 9) as a plain dataclass field.

A config is built from the dataclass defaults, then a YAML or JSON file, then explicit overrides
(command-line flags), in that order. Unknown keys and bad values raise :class:`ConfigError` naming
the key, so a typo never silently falls back to a default (the reference code ignored most of its YAML).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from huvidpo.models.patterns import DEFAULT_STAGE1_PATTERNS
from huvidpo.precision import COMPILE_BACKENDS
from huvidpo.training.options import MAX_STEPS, infos, option, suggest


class ConfigError(ValueError):
    """A training configuration that cannot be run as given (the message names the key).

    ``field`` is the option refused (``lora_alpha``), or None when the error is not one option's (an
    unreadable config file): callers that name the field to a user read it, never the message."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
CACHE_DTYPES = ("auto", "fp32", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass
class TrainConfig:
    """Settings shared by both stages. Paths are local directories.

    Each field is declared with :func:`~huvidpo.training.options.option`: its one-line description and
    bounds live there (``--help``, the OpenAPI schema and ``docs/hyperparameters.md`` read them)."""

    model: str = option("", "base model directory (diffusers layout); required", fine_tune=False)
    dataset: str = option("", "dataset directory (manifest.jsonl and videos); required", fine_tune=False)
    output_dir: str = option(
        "", "where checkpoints, metrics and the final weights go; required", fine_tune=False
    )
    unet_dir: str | None = option(
        None, "UNet directory that replaces <model>/unet (e.g. a stage-1 result)", fine_tune=False
    )
    # A caller that fetched the dataset or model from elsewhere passes the digest it was published under.
    dataset_digest: str | None = option(
        None,
        "dataset identity recorded in checkpoint lineage (null: digest of the directory)",
        fine_tune=False,
    )
    base_model_digest: str | None = option(
        None,
        "base model identity recorded in checkpoint lineage (null: digest of the directory)",
        fine_tune=False,
    )
    sparse_causal: str = option(
        "first+prev", "frames each frame's attention sees: the first and previous, or the first only",
        choices=("first+prev", "first"),
    )  # fmt: skip
    # clips
    num_frames: int = option(16, "frames per training clip, frame 0 (the condition) included", ge=2, le=256)
    height: int = option(320, "clip height in pixels", ge=8, le=2048, multiple_of=8)
    width: int = option(512, "clip width in pixels", ge=8, le=2048, multiple_of=8)
    frame_stride: int = option(1, "take every n-th frame of the video", ge=1, le=64)
    hflip_p: float = option(
        0.5, "probability of flipping a clip (both clips of a pair) horizontally", ge=0, le=1
    )
    random_start: bool = option(True, "start clips at a random frame (false: at frame 0)")
    first_frame_mode: str = option(
        "replace_clean_latent", "how frame 0 conditions the video UNet", choices=("replace_clean_latent",)
    )
    loss_skip_first_frame: bool = option(True, "leave frame 0 (the condition) out of the loss")
    # optimisation
    lr: float = option(1e-4, "AdamW learning rate", gt=0, le=1)
    lr_scheduler: str = option("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, "steps of linear warmup of the learning rate", ge=0, le=MAX_STEPS)
    adam_beta1: float = option(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = option(0.999, "AdamW beta2", ge=0, lt=1)
    weight_decay: float = option(1e-2, "AdamW weight decay", ge=0)
    adam_eps: float = option(1e-8, "AdamW epsilon", gt=0)
    batch_size: int = option(1, "clips (DPO: pairs) per optimizer step and process", ge=1, le=1024)
    epochs: int = option(1, "passes over the data (when max_steps is null)", ge=1, le=1_000_000)
    max_steps: int | None = option(
        None, "stop after this many optimizer steps (null: epochs passes over the data)", ge=1, le=MAX_STEPS
    )
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: no clipping)", ge=0)
    # auto: bf16 autocast on CUDA (frozen weights bf16, LoRA and other trainable weights fp32), none on the CPU.
    mixed_precision: str = option(
        "auto", "auto: bf16 on CUDA, none on the CPU; fp16 is CUDA only", choices=MIXED_PRECISION
    )
    gradient_checkpointing: bool | Literal["auto"] = option(
        "auto",
        "recompute activations in backward (+27% FLOPs); auto: when the step would not fit the device",
    )
    timestep_min: int = option(0, "smallest diffusion timestep drawn (timesteps in [min, max))", ge=0, le=999)
    timestep_max: int = option(
        1000, "timesteps are drawn below this (greater than timestep_min)", ge=1, le=1000
    )
    seed: int = option(
        33, "random seed (data order, noise, held-out split, pair compilation)", ge=0, le=2**32 - 1
    )
    compile: str = option(
        "off",
        "torch.compile the UNet: off, or a backend (inductor on a GPU; eager backends only check it)",
        choices=COMPILE_BACKENDS,
    )
    device: str | None = option(
        None,
        "cpu, cuda, cuda:1...; null: CUDA when present (accelerate decides under a launcher)",
        fine_tune=False,
    )
    # caching, checkpoints, logging
    cache_latents: bool = option(True, "encode each clip once and cache its latents and prompt embeddings")
    cache_dir: str | None = option(
        None, "latent/text cache directory (null: <output_dir>/cache)", fine_tune=False
    )
    cache_memory_mb: float = option(
        4096.0,
        "host memory the latent/text cache holds (least recently used entries leave it)",
        ge=0,
        le=16 * 2**20,
    )
    cache_dtype: str = option(
        "auto", "cached latents in memory: auto (bf16 and pinned on CUDA, fp32 on the CPU), fp32, bf16",
        choices=CACHE_DTYPES,
    )  # fmt: skip
    checkpoint_every: int = option(
        0,
        "steps between checkpoints (0: only at the end; a stopped run checkpoints first)",
        ge=0,
        le=MAX_STEPS,
    )
    # The main process decides (its clock) and every process follows: a lost node costs at most this
    # much work whatever the step rate.
    checkpoint_minutes: float = option(
        0.0, "also checkpoint after this many minutes since the last one (0: by steps only)", ge=0
    )
    keep_last: int = option(3, "checkpoints kept (older ones are deleted)", ge=1, le=1000)
    eval_every: int = option(
        0,
        "steps between held-out evaluations (0: only at the end, when there is held-out data)",
        ge=0,
        le=MAX_STEPS,
    )
    log_every: int = option(1, "steps between metric lines", ge=1, le=MAX_STEPS)
    plot: bool = option(True, "write a loss plot (metrics.png) next to the metrics")
    # sample videos rendered into every checkpoint (huvidpo.training.samples)
    sample_count: int = option(
        0, "sample videos rendered into each checkpoint (samples/); 0: none", ge=0, le=16
    )
    # empty: the held-out prompts, then the training prompts, each sorted, with frame 0 of the prompt's
    # first video as first frame
    sample_prompts: tuple[str, ...] = option(
        (), "the samples' prompts, cycled to sample_count (empty: the data's)"
    )
    sample_first_frames: tuple[str, ...] = option(
        (), "one first frame per sample prompt: a dataset file, relative to it (empty: the prompt's video)"
    )
    sample_num_frames: int | None = option(None, "frames of each sample (null: num_frames)", ge=2, le=128)
    sample_height: int | None = option(
        None, "sample height in pixels (null: height)", ge=8, le=2048, multiple_of=8
    )
    sample_width: int | None = option(
        None, "sample width in pixels (null: width)", ge=8, le=2048, multiple_of=8
    )
    sample_steps: int = option(25, "DDIM steps of each sample", ge=1, le=999)
    sample_guidance_scale: float = option(7.5, "classifier-free guidance scale of the samples", ge=0)
    sample_seed: int = option(0, "sample i uses seed sample_seed + i at every checkpoint", ge=0, le=2**32 - 1)

    stage: ClassVar[str] = "base"

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def from_mapping(cls: type[C], values: Mapping[str, Any], source: str = "config") -> C:
        """Build a config from ``values`` (keys may use ``-`` or ``_``); unknown keys are errors."""
        types_ = cls.field_types()
        kwargs: dict[str, Any] = {}
        for raw_key, raw in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in types_:
                raise ConfigError(f"{source}: {unknown_option(cls, str(raw_key))}", field=key)
            kwargs[key] = _coerce(key, raw, types_[key], source)
        cfg = cls(**kwargs)
        return cfg

    @classmethod
    def load(
        cls: type[C], path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
    ) -> C:
        """Defaults, then the YAML/JSON file ``path`` (if any), then ``overrides`` (None values skipped)."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(read_config_file(path))
        for k, v in (overrides or {}).items():
            if v is not None:
                values[k.replace("-", "_")] = v
        return cls.from_mapping(values, source=str(path) if path else "config")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    # -- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` for a value that cannot work: outside the option's declared
        values (``huvidpo.training.options``), or a combination of options that cannot work."""
        for name in ("model", "dataset", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required", field=name)
        if self.first_frame_mode != "replace_clean_latent":
            raise ConfigError(
                f"first_frame_mode {self.first_frame_mode!r} is not supported; the video UNet conditions on "
                "frame 0 by replacing it with its clean latent ('replace_clean_latent')",
                field="first_frame_mode",
            )
        for name, declared in infos(type(self)).items():
            problem = declared.problem(name, getattr(self, name))
            if problem is not None:
                raise ConfigError(problem, field=name)
        if not math.isfinite(self.lr):
            raise ConfigError(f"lr must be a finite number, got {self.lr}", field="lr")
        if not (isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto"):
            raise ConfigError(
                f"gradient_checkpointing must be true, false or 'auto', got {self.gradient_checkpointing!r}",
                field="gradient_checkpointing",
            )
        if not self.timestep_min < self.timestep_max:
            raise ConfigError(
                f"need timestep_min < timestep_max, got [{self.timestep_min}, {self.timestep_max})",
                field="timestep_min",
            )
        self._validate_samples()

    def _validate_samples(self) -> None:
        for name in ("sample_height", "sample_width"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % 8):
                raise ConfigError(f"{name} must be a positive multiple of 8, got {v}", field=name)
        if not (self.sample_guidance_scale >= 0 and math.isfinite(self.sample_guidance_scale)):
            raise ConfigError(
                f"sample_guidance_scale must be a finite number >= 0, got {self.sample_guidance_scale}",
                field="sample_guidance_scale",
            )
        if self.sample_first_frames and len(self.sample_first_frames) != len(self.sample_prompts):
            raise ConfigError(
                f"sample_first_frames names {len(self.sample_first_frames)} files for "
                f"{len(self.sample_prompts)} sample_prompts: give one per prompt, or none",
                field="sample_first_frames",
            )
        for f in self.sample_first_frames:
            # Files of the dataset only: a fine-tune's options never name a path of the trainer's machine.
            if not f or f.startswith(("/", "\\")) or ".." in Path(f).parts:
                raise ConfigError(
                    f"sample_first_frames: {f!r} must be a file of the dataset, relative to it",
                    field="sample_first_frames",
                )


@dataclass
class Stage1Config(TrainConfig):
    """Stage 1: train the temporal layers and the SparseCausal query on clips of one motion."""

    trainable_patterns: tuple[str, ...] = option(
        DEFAULT_STAGE1_PATTERNS, "substrings of parameter names to train (all others stay frozen)"
    )
    prompt: str | None = option(
        None, "one prompt for every clip (null: each video's prompt from the manifest)"
    )
    lr: float = 3e-5
    weight_decay: float = 1e-2
    max_steps: int | None = 25_000
    epochs: int = 1_000_000
    checkpoint_every: int = 5_000
    eval_every: int = 0

    stage: ClassVar[str] = "stage1"

    def validate(self) -> None:
        super().validate()
        if not self.trainable_patterns:
            raise ConfigError(
                "trainable_patterns must name at least one parameter pattern", field="trainable_patterns"
            )


@dataclass
class DPOConfig(TrainConfig):
    """Stage 2: Diffusion-DPO on preference pairs with LoRA adapters."""

    # logit = -0.5*beta*(d_model - d_ref): the diffusers script's beta is 2x this.
    beta: float = option(
        50.0, "DPO strength: how far the model may move from the reference", gt=0, le=100_000
    )
    reference: str = option(
        "adapter_disabled", "reference model: the same UNet with adapters off, or a frozen copy",
        choices=("adapter_disabled", "frozen_copy"),
    )  # fmt: skip
    sft_weight: float = option(0.0, "weight of an added denoising loss on the chosen clip", ge=0)
    # Spec 4.2, as the reference and Diffusion-DPO; held-out evaluation always shares.
    shared_noise_timestep: bool = option(
        True, "the chosen and rejected clip of a pair get the same noise and timestep"
    )
    lora_rank: int = option(16, "LoRA rank", ge=1, le=1024)
    lora_alpha: float = option(32.0, "LoRA alpha (the update is scaled by alpha / rank)", gt=0)
    lora_dropout: float = option(0.1, "LoRA dropout", ge=0, lt=1)
    lora_targets: str = option(
        "all", "modules with LoRA: all, spatial, temporal, self or a regex over module names"
    )
    adapter_name: str = option("huvidpo", "name of the LoRA adapter in the saved weights")
    tie_policy: str = option(
        "drop",
        "pairs of equal mean score: drop them, or keep them in a fixed arbitrary direction",
        choices=("drop", "keep"),
    )
    min_margin: float = option(
        0.0, "drop score pairs whose difference is below this (score points)", ge=0, le=10
    )
    margin_weighting: bool = option(False, "weight each pair by its score margin")
    # None: compile the dataset's ratings here with tie_policy, min_margin, margin_weighting and seed.
    pairs_file: str | None = option(
        None, "a compiled pairs.jsonl to train on (null: compile the dataset's ratings)", fine_tune=False
    )
    # The compiler already split them off: no further split is made here (holdout_fraction only recorded).
    heldout_file: str | None = option(
        None, "with pairs_file: the held-out pairs compiled beside it to evaluate on", fine_tune=False
    )
    holdout_fraction: float = option(
        0.0, "fraction held out for evaluation (implicit reward accuracy), see holdout_by", ge=0, lt=1
    )
    # video: pairs mixing a held-out and a training video are dropped.
    holdout_by: str = option(
        "prompt", "hold out unseen prompts, or unseen videos of the same prompts", choices=("prompt", "video")
    )
    eval_draws: int = option(4, "(t, noise) draws averaged per held-out pair", ge=1, le=1000)
    # clips x frames x height x width; a pair sends 2 x eval_draws clips: at most 4 pairs, fewer as clips
    # grow (one at the method's size).
    eval_batch_pixels: int = option(
        8 * 16 * 320 * 512, "pixel budget of one evaluation forward (clips x frames x height x width)", ge=1
    )
    lr: float = 1e-4
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    epochs: int = 12

    stage: ClassVar[str] = "dpo"

    def validate(self) -> None:
        super().validate()  # every option's declared values (beta > 0, lora_rank >= 1, tie_policy, ...)
        if self.tie_policy == "keep" and self.min_margin > 0:
            raise ConfigError(
                "tie_policy 'keep' with min_margin > 0 contradicts itself: ties have margin 0",
                field="min_margin",
            )


C = TypeVar("C", bound=TrainConfig)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a flat mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ConfigError(f"{p}: cannot parse: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of option names to values")
    return data


def _coerce(key: str, value: Any, typ: Any, source: str) -> Any:
    """Check/convert one value to the field's type (ints from YAML floats like 1e4, strings to numbers)."""
    origin = get_origin(typ)
    args = get_args(typ)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:  # a literal member (gradient_checkpointing: "auto") is taken as written
            if get_origin(a) is Literal and value in get_args(a):
                return value
        return _coerce(key, value, next(a for a in inner if get_origin(a) is not Literal), source)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in (
                "true",
                "yes",
                "1",
                "on",
                "false",
                "no",
                "0",
                "off",
            ):
                return value.lower() in ("true", "yes", "1", "on")
            raise ValueError("not a boolean")
        if typ is int:
            if isinstance(value, bool):
                raise ValueError("not an integer")
            f = float(value)
            if not f.is_integer():
                raise ValueError("not an integer")
            return int(f)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError("not a number")
            return float(value)
        if typ is str:
            if not isinstance(value, str | int | float):
                raise ValueError("not a string")
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list | tuple):
                raise ValueError("not a list")
            return tuple(str(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: option {key!r} = {value!r}: {exc}", field=key) from exc
    return value


def unknown_option(cls: type[TrainConfig], name: str, spell: Callable[[str], str] = str) -> str:
    """Why ``name`` is refused, with the option it most likely meant: ``unknown dpo training option
    'lerning_rate'; did you mean "lr"?``. ``spell`` writes an option name as the caller knows it
    (``--lora-rank`` on the command line)."""
    key = name.lstrip("-").replace("-", "_")
    message = f"unknown {cls.stage} training option {name!r}"
    elsewhere = [c.stage for c in (DPOConfig, Stage1Config) if c is not cls and key in infos(c)]
    if elsewhere:
        return f"{message}: it is an option of {elsewhere[0]} training only"
    guess = suggest(key, infos(cls))
    return f'{message}; did you mean "{spell(guess)}"?' if guess else message


def default_field_value(cls: type[TrainConfig], name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(name)


__all__ = [
    "ConfigError",
    "DPOConfig",
    "Stage1Config",
    "TrainConfig",
    "default_field_value",
    "field",
    "read_config_file",
    "unknown_option",
]
