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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

from huvidpo.bounds import BOUNDS
from huvidpo.models.patterns import DEFAULT_STAGE1_PATTERNS


class ConfigError(ValueError):
    """A training configuration that cannot be run as given (the message names the key).

    ``field`` is the option refused (``lora_alpha``), or None when the error is not one option's (an
    unreadable config file): callers that name the field to a user read it, never the message."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass
class TrainConfig:
    """Settings shared by both stages. Paths are local directories."""

    model: str = ""
    """Base model directory (diffusers layout, see ``huvidpo.models.load_components``)."""
    dataset: str = ""
    """Dataset directory (``huvidpo.data.load_dataset``)."""
    output_dir: str = ""
    """Where checkpoints, metrics and the final weights go."""
    unet_dir: str | None = None
    """Optional UNet directory that replaces ``<model>/unet`` (e.g. a stage-1 result)."""
    dataset_digest: str | None = None
    """The dataset's identity recorded in checkpoint lineage; None: ``directory_digest(dataset)``.
    A caller that fetched the dataset from elsewhere passes the digest it was published under."""
    base_model_digest: str | None = None
    """The base model's identity recorded in checkpoint lineage; None: ``directory_digest(model)``."""
    sparse_causal: str = "first+prev"
    # clips
    num_frames: int = 16
    height: int = 320
    width: int = 512
    frame_stride: int = 1
    hflip_p: float = 0.5
    random_start: bool = True
    first_frame_mode: str = "replace_clean_latent"
    loss_skip_first_frame: bool = True
    # optimisation
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    batch_size: int = 1
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: ``epochs`` passes over the data)."""
    grad_clip: float = 1.0
    mixed_precision: str = "auto"
    """``auto``: bf16 autocast on CUDA (frozen weights bf16, LoRA and other trainable weights fp32),
    none on the CPU; or ``no``, ``fp16`` (CUDA only), ``bf16``."""
    gradient_checkpointing: bool = True
    timestep_min: int = 0
    timestep_max: int = 1000
    """Timesteps are drawn uniformly from ``[timestep_min, timestep_max)``."""
    seed: int = 33
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:1``...; None picks CUDA when present (accelerate decides under a launcher)."""
    # caching, checkpoints, logging
    cache_latents: bool = True
    cache_dir: str | None = None
    """Latent/text cache; None: ``<output_dir>/cache``."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0: only at the end (a stopped run checkpoints before it returns)."""
    checkpoint_minutes: float = 0.0
    """Also checkpoint when this much wall time passed since the last checkpoint (or the start), so a
    lost node costs at most that much work whatever the step rate; 0: by steps only. The main
    process decides (its clock) and every process follows."""
    keep_last: int = 3
    eval_every: int = 0
    """Steps between held-out evaluations (0: only at the end, when there is held-out data)."""
    log_every: int = 1
    plot: bool = True

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
                close = [k for k in types_ if k.split("_")[0] == key.split("_")[0]][:3]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(
                    f"{source}: unknown {cls.stage} training option {raw_key!r}{hint}", field=key
                )
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
        """Raise :class:`ConfigError` for a value that cannot work."""
        for name in ("model", "dataset", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required", field=name)
        if self.sparse_causal not in ("first+prev", "first"):
            raise ConfigError(
                f"sparse_causal must be 'first+prev' or 'first', got {self.sparse_causal!r}",
                field="sparse_causal",
            )
        if self.first_frame_mode != "replace_clean_latent":
            raise ConfigError(
                f"first_frame_mode {self.first_frame_mode!r} is not supported; the video UNet conditions on "
                "frame 0 by replacing it with its clean latent ('replace_clean_latent')",
                field="first_frame_mode",
            )
        if self.num_frames < 2:
            raise ConfigError(
                f"num_frames must be >= 2 (frame 0 is the condition), got {self.num_frames}",
                field="num_frames",
            )
        for name in ("height", "width"):
            v = getattr(self, name)
            if v <= 0 or v % 8:
                raise ConfigError(f"{name} must be a positive multiple of 8, got {v}", field=name)
        positive = ("frame_stride", "batch_size", "epochs", "keep_last", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}", field="max_steps")
        for name in ("checkpoint_every", "checkpoint_minutes", "eval_every", "lr_warmup_steps"):
            if not getattr(self, name) >= 0:  # (NaN too)
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}", field=name)
        if not 0.0 <= self.hflip_p <= 1.0:
            raise ConfigError(f"hflip_p must be in [0, 1], got {self.hflip_p}", field="hflip_p")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}", field="lr")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(
                f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}",
                field="lr_scheduler",
            )
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}", field=name)
        if self.adam_eps <= 0 or self.weight_decay < 0:
            bad = "adam_eps" if self.adam_eps <= 0 else "weight_decay"
            raise ConfigError("adam_eps must be > 0 and weight_decay >= 0", field=bad)
        if self.grad_clip < 0:
            raise ConfigError(
                f"grad_clip must be >= 0 (0 switches clipping off), got {self.grad_clip}", field="grad_clip"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}",
                field="mixed_precision",
            )
        if not 0 <= self.timestep_min < self.timestep_max <= 1000:
            bad = "timestep_min" if not 0 <= self.timestep_min < 1000 else "timestep_max"
            raise ConfigError(
                f"need 0 <= timestep_min < timestep_max <= 1000, got [{self.timestep_min}, {self.timestep_max})",
                field=bad,
            )
        for name, bound in BOUNDS.items():  # the documented bounds (huvidpo.bounds)
            value = getattr(self, name, None)
            if value is not None and not bound.contains(value):
                raise ConfigError(f"{name} must be {bound.describe()}, got {value}", field=name)


@dataclass
class Stage1Config(TrainConfig):
    """Stage 1: train the temporal layers and the SparseCausal query on clips of one motion."""

    trainable_patterns: tuple[str, ...] = DEFAULT_STAGE1_PATTERNS
    """Substrings of parameter names to train (all others stay frozen)."""
    prompt: str | None = None
    """One prompt for every clip; None: each video's own prompt from the dataset manifest."""
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

    beta: float = 50.0
    """DPO strength; logit = -0.5*beta*(d_model - d_ref) (the diffusers script's beta is 2x this)."""
    reference: str = "adapter_disabled"
    """``adapter_disabled`` (the same UNet, adapters off, no_grad) or ``frozen_copy`` (the reference code)."""
    sft_weight: float = 0.0
    shared_noise_timestep: bool = True
    """The chosen and rejected clip of a pair get the same noise and timestep (spec 4.2, as the
    reference and Diffusion-DPO); False: each clip its own draws. Held-out evaluation always shares."""
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: str = "all"
    """``all``, ``spatial``, ``temporal``, ``self`` or a regex over module names."""
    adapter_name: str = "huvidpo"
    tie_policy: str = "drop"
    min_margin: float = 0.0
    margin_weighting: bool = False
    pairs_file: str | None = None
    """A ``pairs.jsonl`` compiled beforehand (``huvidpo.data.write_pairs``) to train on; None: compile
    the dataset's ratings here with ``tie_policy``, ``min_margin``, ``margin_weighting`` and ``seed``."""
    heldout_file: str | None = None
    """With ``pairs_file``: the held-out pairs compiled beside it (``heldout.jsonl``) to evaluate on;
    the compiler already split them off, so no further split is made here (``holdout_fraction`` is
    then only recorded)."""
    holdout_fraction: float = 0.0
    """Fraction held out for evaluation (implicit reward accuracy): of the prompts, or of each
    prompt's videos (spread over its score range), see ``holdout_by``."""
    holdout_by: str = "prompt"
    """``prompt``: held-out pairs come from unseen prompts; ``video``: from unseen videos of the same
    prompts (pairs mixing a held-out and a training video are dropped)."""
    eval_draws: int = 4
    """(t, noise) draws averaged per held-out pair."""
    eval_batch_pixels: int = 8 * 16 * 320 * 512
    """Cost budget of one evaluation forward, in pixels (clips x frames x height x width; a pair
    sends ``2 x eval_draws`` clips): at most 4 pairs, fewer as clips grow (one at the method's size)."""
    lr: float = 1e-4
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    epochs: int = 12

    stage: ClassVar[str] = "dpo"

    def validate(self) -> None:
        super().validate()  # the documented bounds (beta > 0, lora_rank >= 1, eval_draws >= 1, ...) included
        if self.reference not in ("adapter_disabled", "frozen_copy"):
            raise ConfigError(
                f"reference must be 'adapter_disabled' or 'frozen_copy', got {self.reference!r}",
                field="reference",
            )
        if self.sft_weight < 0:
            raise ConfigError(f"sft_weight must be >= 0, got {self.sft_weight}", field="sft_weight")
        if self.eval_batch_pixels < 1:
            raise ConfigError(
                f"eval_batch_pixels must be >= 1, got {self.eval_batch_pixels}", field="eval_batch_pixels"
            )
        if self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            bad = "lora_alpha" if self.lora_alpha <= 0 else "lora_dropout"
            raise ConfigError("need lora_rank >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1", field=bad)
        if self.tie_policy not in ("drop", "keep"):
            raise ConfigError(
                f"tie_policy must be 'drop' or 'keep', got {self.tie_policy!r}", field="tie_policy"
            )
        if self.holdout_by not in ("prompt", "video"):
            raise ConfigError(
                f"holdout_by must be 'prompt' or 'video', got {self.holdout_by!r}", field="holdout_by"
            )
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(
                f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}", field="holdout_fraction"
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
        return _coerce(key, value, inner[0], source)
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
]
