"""A fine-tune's hyperparameters, typed: pydantic models made from the training library's own config
dataclasses (``huvidpo.training.config``), so the two cannot drift.

``DPOHyperparameters`` and ``Stage1Hyperparameters`` hold every option a caller may set (the config's
fields less ``RESERVED``, which the trainer sets from the fine-tune's inputs), with the config's types
and defaults. ``parse`` is the one check: the library's coercion and ``validate()`` (its documented
bounds included), raising ``ConfigError`` with the option's ``field``. A spec stores only the options
that were set (``model_dump(exclude_unset=True)``), typed as the library coerced them.

``huvidpo.training.config`` imports neither torch nor diffusers (tests/unit/test_light_imports.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeAlias

from pydantic import BaseModel, ConfigDict, create_model

from huvidpo.training.config import ConfigError, DPOConfig, Stage1Config, TrainConfig

# Set by the trainer from the fine-tune's inputs (paths, digests, device), never by the caller.
RESERVED = frozenset(
    {
        "model",
        "dataset",
        "output_dir",
        "unet_dir",
        "cache_dir",
        "device",
        "pairs_file",
        "heldout_file",
        "dataset_digest",
        "base_model_digest",
    }
)
# Placeholders for the reserved paths while checking options alone.
_PATHS = {"model": "m", "dataset": "d", "output_dir": "o"}


class _Hyperparameters(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def as_mapping(self) -> dict[str, Any]:
        """The options that were set, in JSON types (what a spec stores)."""
        return self.model_dump(mode="json", exclude_unset=True)


def _model(cls: type[TrainConfig], name: str) -> type[_Hyperparameters]:
    types_ = cls.field_types()
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in RESERVED:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        fields[f.name] = (types_[f.name], default)
    model: type[_Hyperparameters] = create_model(name, __base__=_Hyperparameters, **fields)
    model.__doc__ = f"The options of ``huvidpo.training.config.{cls.__name__}`` a fine-tune may set."
    return model


DPOHyperparameters = _model(DPOConfig, "DPOHyperparameters")
Stage1Hyperparameters = _model(Stage1Config, "Stage1Hyperparameters")
Hyperparameters: TypeAlias = _Hyperparameters

CONFIGS: dict[str, type[TrainConfig]] = {"dpo": DPOConfig, "stage1": Stage1Config}
MODELS: dict[str, type[_Hyperparameters]] = {"dpo": DPOHyperparameters, "stage1": Stage1Hyperparameters}


def parse(stage: str, values: Mapping[str, Any], source: str = "hyperparameters") -> _Hyperparameters:
    """Check ``values`` (keys with ``-`` or ``_``) as the training library does and return them typed.

    Raises ``ConfigError`` naming the option (``field``) for an unknown, reserved or invalid one."""
    cls = CONFIGS[stage]
    normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
    reserved = sorted(RESERVED & set(normalised))
    if reserved:
        raise ConfigError(
            f"{source} may not set {', '.join(reserved)}: the trainer sets them from the fine-tune's inputs",
            field=reserved[0],
        )
    cfg = cls.from_mapping({**normalised, **_PATHS}, source=source)
    cfg.validate()
    # The values as the library coerced them (1e4 -> 10000), only those that were set.
    return MODELS[stage].model_validate({k: getattr(cfg, k) for k in normalised})


def to_config(stage: str, hyperparameters: _Hyperparameters, **inputs: Any) -> TrainConfig:
    """The training config of a fine-tune: its hyperparameters plus what the trainer sets
    (``model``, ``dataset``, ``output_dir``, ...). Not validated; call ``validate()``."""
    return CONFIGS[stage].from_mapping(
        {**hyperparameters.model_dump(exclude_unset=True), **inputs}, source="fine-tune hyperparameters"
    )
