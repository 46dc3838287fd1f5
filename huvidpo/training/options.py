"""What each training option means and which values it takes, declared once beside its field.

Every field of the training configs (``huvidpo.training.config``) is declared with :func:`option`: its
default, a one-line description and its bounds (``ge``/``gt``/``le``/``lt``, ``multiple_of``,
``choices``). Everything that describes or checks an option reads it from there:

- ``TrainConfig.validate()`` refuses a value outside its bounds (:meth:`OptionInfo.problem`);
- ``huvidpo train dpo|stage1 --help`` shows the description and bounds of each flag;
- the control plane's typed hyperparameters (``services.common.records.hyperparameters``) carry them
  into the OpenAPI schema (``description``, ``ge``/``gt``/``le``/``lt``, ``multipleOf``, ``enum``);
- ``docs/hyperparameters.md`` is generated from them: ``python -m huvidpo.training.options --write
  docs/hyperparameters.md`` (a test fails when the committed table is stale).

An unknown option name gets a suggestion (:func:`suggest`), in the config files, the CLI and the REST API.
This module imports nothing heavy (the control plane reads it without torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huvidpo.training.config import TrainConfig

MAX_STEPS = 10_000_000
"""The largest step count any step option takes (room far above the method's tens of thousands)."""

_KEY = "huvidpo_option"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


@dataclass(frozen=True)
class Bound:
    """``lo <= value <= hi``; either end may be open (``lo_open``: ``lo < value``) or absent (None)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        # Written so that NaN is outside every bound.
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return bool(above and below) and value == value

    def describe(self) -> str:
        """In words, for error messages: ``at least 1 and at most 1024``."""
        parts = []
        if self.lo is not None:
            parts.append(f"greater than {_num(self.lo)}" if self.lo_open else f"at least {_num(self.lo)}")
        if self.hi is not None:
            parts.append(f"less than {_num(self.hi)}" if self.hi_open else f"at most {_num(self.hi)}")
        return " and ".join(parts)

    def interval(self) -> str:
        """Compactly, for help and tables: ``[1, 1024]``, ``(0, 1]``, ``>= 0``, ``> 0``."""
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return ""


@dataclass(frozen=True)
class OptionInfo:
    """One option's description and the values it takes."""

    help: str
    bound: Bound | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    fine_tune: bool = True
    """False for the paths and digests a fine-tune's trainer sets from its inputs (never the caller)."""

    def values(self) -> str:
        """The values it takes, compactly (``[8, 2048], multiple of 8``; ``one of a, b``); ``""``: any."""
        parts = []
        if self.bound is not None:
            parts.append(self.bound.interval())
        if self.multiple_of is not None:
            parts.append(f"multiple of {self.multiple_of}")
        if self.choices is not None:
            parts.append("one of " + ", ".join(self.choices))
        return ", ".join(parts)

    def problem(self, name: str, value: Any) -> str | None:
        """Why ``value`` is refused for option ``name``, or None when it is within the declared values."""
        if value is None or isinstance(value, bool):
            return None
        if self.choices is not None and value not in self.choices:
            return f"{name} must be one of {', '.join(self.choices)}, got {value!r}"
        if isinstance(value, int | float):
            if self.bound is not None and not self.bound.contains(value):
                return (
                    f"{name} must be {self.bound.describe()}, got {_num(value) if value == value else value}"
                )
            if self.multiple_of is not None and value % self.multiple_of:
                return f"{name} must be a multiple of {self.multiple_of}, got {_num(value)}"
        return None


def option(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    multiple_of: int | None = None,
    choices: Sequence[str] | None = None,
    fine_tune: bool = True,
) -> Any:
    """A config field with its one-line ``help`` and bounds (see the module docstring)."""
    bound = None
    if (ge, gt, le, lt) != (None, None, None, None):
        bound = Bound(lo=gt if gt is not None else ge, hi=lt if lt is not None else le,
                      lo_open=gt is not None, hi_open=lt is not None)  # fmt: skip
    info = OptionInfo(help, bound, multiple_of, tuple(choices) if choices else None, fine_tune)
    return dataclasses.field(default=default, metadata={_KEY: info})


def info(cls: type, name: str) -> OptionInfo:
    """The declared :class:`OptionInfo` of field ``name`` of config class ``cls``.

    A subclass that only changes a default (``lr: float = 3e-5``) keeps its base's declaration."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and _KEY in f.metadata:
            found: OptionInfo = f.metadata[_KEY]
            return found
    raise KeyError(f"{cls.__name__}.{name} is not declared with huvidpo.training.options.option()")


def infos(cls: type) -> dict[str, OptionInfo]:
    """Every field of config class ``cls`` with its :class:`OptionInfo`, in declaration order."""
    return {f.name: info(cls, f.name) for f in dataclasses.fields(cls)}


# Names other trainers use for our options (diffusers' training scripts, the OpenAI fine-tuning API,
# PEFT): suggested, never accepted, so a config means one thing.
SYNONYMS = {
    "learning_rate": "lr",
    "n_epochs": "epochs",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "train_batch_size": "batch_size",
    "max_train_steps": "max_steps",
    "steps": "max_steps",
    "warmup_steps": "lr_warmup_steps",
    "lr_warmup": "lr_warmup_steps",
    "max_grad_norm": "grad_clip",
    "rank": "lora_rank",
    "lora_r": "lora_rank",
    "r": "lora_rank",
    "dpo_beta": "beta",
    "beta_dpo": "beta",
    "frames": "num_frames",
    "video_length": "num_frames",
    "resolution": "height",
    "checkpointing_steps": "checkpoint_every",
    "validation_steps": "eval_every",
    "mixed_precision_dtype": "mixed_precision",
}


def suggest(name: str, known: Iterable[str]) -> str | None:
    """The known option a mistyped or foreign ``name`` most likely meant (``lerning_rate`` -> ``lr``),
    or None when nothing is close. ``-`` and ``_`` are the same; case is ignored."""
    known = list(known)
    key = name.strip().lstrip("-").replace("-", "_").lower()
    if key in known:
        return key
    if SYNONYMS.get(key) in known:
        return SYNONYMS[key]
    candidates = {k: k for k in known} | {s: t for s, t in SYNONYMS.items() if t in known}
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return candidates[close[0]] if close else None


# ---------------------------------------------------------------------------------- the docs table
def _type_name(typ: Any) -> str:
    text = typ.__name__ if isinstance(typ, type) else str(typ).replace("typing.", "")
    nullable = "None" in text
    text = text.replace(" | None", "").replace("tuple[str, ...]", "list of str")
    text = text.replace("Union[bool, Literal['auto']]", "bool or auto")
    return f"{text} or null" if nullable else text


def _default(value: Any) -> str:
    if isinstance(value, tuple):
        return ", ".join(f"`{v}`" for v in value)
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if value is None:
        return "`null`"
    return f"`{value}`" if value != "" else '`""`'


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown() -> str:
    """``docs/hyperparameters.md``: every option of both stages with its description, type, defaults
    and bounds."""
    from huvidpo.training.config import DPOConfig, Stage1Config, default_field_value

    stages: dict[str, type[TrainConfig]] = {"dpo": DPOConfig, "stage1": Stage1Config}
    names: list[str] = []
    for cls in stages.values():
        names += [n for n in infos(cls) if n not in names]
    rows = []
    for name in names:
        owner: type[TrainConfig] = next(cls for cls in stages.values() if name in infos(cls))
        i = info(owner, name)
        typ = owner.field_types()[name]
        defaults = [
            _default(default_field_value(cls, name)) if name in infos(cls) else "—" for cls in stages.values()
        ]
        rest = "yes" if i.fine_tune else "no (set by the trainer)"
        values = _md(i.values()) or "any"
        row = [f"`{name}`", _type_name(typ), *defaults, values, rest, _md(i.help)]
        rows.append("| " + " | ".join(row) + " |")
    head = [
        "# Training hyperparameters",
        "",
        "<!-- Generated by `python -m huvidpo.training.options --write docs/hyperparameters.md` from the",
        "     declarations in huvidpo/training/config.py; do not edit by hand (tests/unit/test_hyperparameter_docs.py",
        "     fails when this file is stale). -->",
        "",
        "Every option of the two trainers: `huvidpo train dpo` (stage 2, Diffusion-DPO with LoRA) and",
        "`huvidpo train stage1` (the temporal layers). The same names are used",
        "",
        "- on the command line as flags, `_` written `-` (`lora_rank` is `--lora-rank`, booleans also",
        "  `--no-...`; `output_dir` is `--out`); `huvidpo train dpo --help` shows this table's text;",
        "- in a `--config` YAML or JSON file (flags override it);",
        "- in a fine-tune's `hyperparameters` (`POST /v1/fine-tunes`; OpenAPI schema",
        "  `FineTuneHyperparameters`), except the options marked *no* in the REST column, which the",
        "  trainer sets from the fine-tune's dataset version and base model.",
        "",
        "Values outside the bounds are refused with a message naming the option (a 422 whose `field` is",
        "`hyperparameters.<name>` over REST), and an unknown name gets a suggestion",
        "(`unknown dpo training option 'learning_rate'; did you mean \"lr\"?`).",
        "`[a, b]` includes both ends, `(a, b]` excludes `a`; `—`: the stage has no such option.",
        "Beyond single options, `timestep_min < timestep_max` and `tie_policy: keep` takes no `min_margin`.",
        "",
        "| Option | Type | Default (dpo) | Default (stage1) | Values | REST | Description |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m huvidpo.training.options", description="Write the hyperparameter table (Markdown)."
    )
    parser.add_argument("--write", type=Path, help="write it to this file (default: print it)")
    parser.add_argument("--check", type=Path, help="exit 1 when this file differs from the table")
    args = parser.parse_args(argv)
    text = markdown()
    if args.check is not None:
        if not args.check.is_file() or args.check.read_text() != text:
            print(f"{args.check} is stale: run python -m huvidpo.training.options --write {args.check}")
            return 1
        return 0
    if args.write is not None:
        args.write.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


__all__ = ["MAX_STEPS", "SYNONYMS", "Bound", "OptionInfo", "info", "infos", "markdown", "option", "suggest"]

if __name__ == "__main__":
    raise SystemExit(main())
