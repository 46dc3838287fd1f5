"""A fine-tune's hyperparameters, typed: pydantic models made from the training library's own config
dataclasses (``huvidpo.training.config``), so the two cannot drift.

``DPOHyperparameters`` and ``Stage1Hyperparameters`` hold every option a caller may set (the config's
fields less ``RESERVED``, which the trainer sets from the fine-tune's inputs), with the config's types,
defaults, one-line descriptions and bounds (``huvidpo.training.options``), so OpenAPI shows them. ``parse`` is the one check: the library's coercion and ``validate()`` (its documented
bounds included), raising ``ConfigError`` with the option's ``field``. A spec stores only the options
that were set (``model_dump(exclude_unset=True)``), typed as the library coerced them.

``huvidpo.training.config`` imports neither torch nor diffusers (tests/unit/test_light_imports.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from huvidpo.training.config import ConfigError, DPOConfig, Stage1Config, TrainConfig
from huvidpo.training.options import info, infos

# Set by the trainer from the fine-tune's inputs (paths, digests, device), never by the caller: the
# options declared ``fine_tune=False`` (``huvidpo.training.options``).
RESERVED = frozenset(
    name for cls in (DPOConfig, Stage1Config) for name, i in infos(cls).items() if not i.fine_tune
)
# Placeholders for the reserved paths while checking options alone.
_PATHS = {"model": "m", "dataset": "d", "output_dir": "o"}


class _Hyperparameters(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def as_mapping(self) -> dict[str, Any]:
        """The options that were set, in JSON types (what a spec stores)."""
        return self.model_dump(mode="json", exclude_unset=True)


_SCHEMA_KEYWORDS = {
    "ge": "minimum",
    "gt": "exclusiveMinimum",
    "le": "maximum",
    "lt": "exclusiveMaximum",
    "multiple_of": "multipleOf",
}


def _field(
    cls: type[TrainConfig], name: str, typ: Any, default: Any, description: str = "", enforce: bool = True
) -> Any:
    """``(type, Field)`` of option ``name`` with its declared description and bounds (``ge``/``gt``/
    ``le``/``lt``, ``multiple_of``; choices as a ``Literal``, an ``enum`` in OpenAPI).

    ``enforce=False`` puts the bounds in the JSON schema only: a stored spec stays readable whatever
    later declarations say (it was checked by :func:`parse` when it was created)."""
    declared = info(cls, name)
    limits: dict[str, Any] = {}
    if declared.bound is not None:
        b = declared.bound
        if b.lo is not None:
            limits["gt" if b.lo_open else "ge"] = b.lo
        if b.hi is not None:
            limits["lt" if b.hi_open else "le"] = b.hi
    if declared.multiple_of is not None:
        limits["multiple_of"] = declared.multiple_of
    description = description or declared.help
    if not enforce:
        schema = {_SCHEMA_KEYWORDS[k]: v for k, v in limits.items()}
        if declared.choices is not None:
            schema["enum"] = list(declared.choices)
        return (typ, Field(default, description=description, json_schema_extra=schema or None))
    if declared.choices is not None:
        nullable = type(None) in get_args(typ)
        typ = Literal.__getitem__(declared.choices)  # type: ignore[attr-defined]
        typ = typ | None if nullable else typ
    return (typ, Field(default, description=description, **limits))


def _model(cls: type[TrainConfig], name: str) -> type[_Hyperparameters]:
    types_ = cls.field_types()
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in RESERVED:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        fields[f.name] = _field(cls, f.name, types_[f.name], default, enforce=False)
    model: type[_Hyperparameters] = create_model(name, __base__=_Hyperparameters, **fields)
    model.__doc__ = f"The options of ``huvidpo.training.config.{cls.__name__}`` a fine-tune may set."
    return model


class _Request(BaseModel):
    """The body of a fine-tune's ``hyperparameters``: a number outside its bound is refused with the
    library's message before pydantic converts it (``int`` cannot even parse ``1e23``). Unknown names
    are let through to :func:`parse`, which knows the stage and suggests the option meant."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    @field_validator("*", mode="before")
    @classmethod
    def _within_bound(cls, value: Any, validation: ValidationInfo) -> Any:
        name = validation.field_name or ""
        owner = next((c for c in (DPOConfig, Stage1Config) if name in infos(c)), None)
        if owner is not None and isinstance(value, int | float) and not isinstance(value, bool):
            problem = info(owner, name).problem(name, value)
            if problem is not None:
                raise ValueError(problem)
        return value


def request_model(name: str = "FineTuneHyperparameters") -> type[BaseModel]:
    """The REST body of a fine-tune's ``hyperparameters``: every option either stage takes, each
    optional (unset: the stage's default), with its description and bounds in the OpenAPI schema.

    The stage is a sibling field, so this model cannot tell a stage's options apart; :func:`parse`
    does (a ``beta`` for stage 1 is refused there, naming the stage it belongs to)."""
    fields: dict[str, Any] = {}
    for cls in (DPOConfig, Stage1Config):
        types_ = cls.field_types()
        for opt in infos(cls):
            if opt in RESERVED or opt in fields:
                continue
            only = [c.stage for c in (DPOConfig, Stage1Config) if opt in infos(c)]
            note = f" ({only[0]} only)" if len(only) == 1 else ""
            # Unset: the stage's default; null only where the option itself takes null (max_steps).
            fields[opt] = _field(cls, opt, types_[opt], None, description=info(cls, opt).help + note)
    model: type[BaseModel] = create_model(name, __base__=_Request, **fields)
    model.__doc__ = (
        "Training options (``huvidpo.training`` config keys, docs/hyperparameters.md); unset options "
        "take the stage's defaults. Unknown names are refused (422) with the option meant."
    )
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
