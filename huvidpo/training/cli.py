"""``huvidpo train stage1|dpo``: the trainers on the command line.

Every config field is a flag (``beta`` -> ``--beta``, ``lora_rank`` -> ``--lora-rank``, booleans as
``--x/--no-x``); ``--config FILE`` (YAML or JSON) is read first and flags override it. ``--resume``
continues from the newest complete checkpoint under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from huvidpo.training.config import DPOConfig, Stage1Config, TrainConfig, unknown_option
from huvidpo.training.options import info

_ALIASES = {"output_dir": ("--out", "--output-dir"), "dataset": ("--dataset", "--data")}


def _flag_type(typ: Any) -> tuple[Any, dict[str, Any]]:
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        typ = next(a for a in get_args(typ) if a is not type(None))
        origin = get_origin(typ)
    if typ is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if origin is tuple:
        return None, {"nargs": "+"}
    if typ in (int, float, str):
        return typ, {}
    return str, {}


def add_config_flags(parser: argparse.ArgumentParser, cls: type[TrainConfig]) -> None:
    """One flag per config field; defaults are None so that unset flags never override the file."""
    hints = cls.field_types()
    for f in dataclasses.fields(cls):
        flags = _ALIASES.get(f.name, (f"--{f.name.replace('_', '-')}",))
        typ, extra = _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        declared = info(cls, f.name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        notes = [n for n in (declared.values(), "" if shown in ("", None) else f"default: {shown}") if n]
        help_ = declared.help + (f" ({'; '.join(notes)})" if notes else "")
        help_ = help_.replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_, **extra}
        if typ is not None:
            kwargs["type"] = typ
        parser.add_argument(*flags, **kwargs)


def flag_name(name: str) -> str:
    """The command-line flag of option ``name`` (``lora_rank`` -> ``--lora-rank``)."""
    return _ALIASES.get(name, (f"--{name.replace('_', '-')}",))[0]


class TrainParser(argparse.ArgumentParser):
    """The parser of ``train stage1|dpo``: an unknown ``--option`` is a usage error naming the flag
    it most likely meant (``--lerning-rate``: did you mean "--lr"?)."""

    config_class: type[TrainConfig] | None = None

    def parse_known_args(  # type: ignore[override]
        self, args: Any = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        unknown = [e.split("=", 1)[0] for e in extras if e.startswith("--")]
        if unknown and self.config_class is not None:
            self.error(unknown_option(self.config_class, unknown[0], spell=flag_name))
        return parsed, extras


def config_from_args(cls: type[TrainConfig], args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls.load(args.config, overrides)


class TqdmProgress:
    """A tqdm bar over optimizer steps showing loss (and implicit accuracy for DPO).

    The bar appears at the first callback, so the other processes of a data-parallel run (which get
    no callbacks) show none."""

    def __init__(self, total: int, initial: int = 0, disable: bool = False) -> None:
        self._args = {"total": total, "initial": initial, "disable": disable}
        self._bar: Any = None
        self._acc: list[float] = []

    @property
    def bar(self) -> Any:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(unit="step", dynamic_ncols=True, **self._args)
        return self._bar

    def on_step(self, metrics: dict[str, Any]) -> None:
        if metrics.get("total_steps"):
            self.bar.total = int(metrics["total_steps"])
        self.bar.n = int(metrics["step"])
        post = {"loss": f"{metrics['loss']:.4f}"}
        if "implicit_acc" in metrics:
            self._acc = [*self._acc[-49:], float(metrics["implicit_acc"])]
            post["acc50"] = f"{sum(self._acc) / len(self._acc):.2f}"
        if "eval_implicit_acc" in metrics:
            post["heldout_acc"] = f"{metrics['eval_implicit_acc']:.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.bar.write(f"checkpoint {path} (step {step})")

    def on_end(self, summary: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()


def _cmd_train(args: argparse.Namespace) -> int:
    from huvidpo.training.checkpoint import latest_checkpoint
    from huvidpo.training.dpo import run_dpo
    from huvidpo.training.stage1 import run_stage1

    cls: type[TrainConfig] = DPOConfig if args.stage == "dpo" else Stage1Config
    cfg = config_from_args(cls, args)
    cfg.validate()
    initial = 0
    if args.resume:
        last = latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
        initial = int(last.name.split("-")[-1]) if last else 0
        print(f"resuming from {last}" if last else f"no checkpoint under {cfg.output_dir}: starting fresh")
    # The total is known once the data is compiled; the bar reads it from the step metrics.
    progress = TqdmProgress(total=cfg.max_steps or 0, initial=initial, disable=args.quiet)
    runner = run_dpo if isinstance(cfg, DPOConfig) else run_stage1
    result = runner(cfg, callbacks=[progress], resume=args.resume)  # type: ignore[arg-type]
    if not result.main_process:
        return 0  # one summary per run, from the main process of a data-parallel launch
    summary = {
        "steps": result.steps,
        "stopped": result.stopped,
        "weights": str(result.weights_dir) if result.weights_dir else None,
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        "metrics": str(result.metrics_path),
        "plot": str(result.plot_path) if result.plot_path else None,
        **{k: v for k, v in result.eval_metrics.items()},
    }
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Add ``train stage1`` and ``train dpo`` to the ``huvidpo`` command."""
    train = subparsers.add_parser("train", help="train stage 1 (temporal layers) or stage 2 (DPO LoRA)")
    stages = train.add_subparsers(dest="stage", required=True, parser_class=TrainParser)
    for stage, cls, help_ in (
        (
            "stage1",
            Stage1Config,
            "fine-tune the temporal layers and the SparseCausal query on clips of one motion",
        ),
        ("dpo", DPOConfig, "Diffusion-DPO with LoRA on a preference dataset"),
    ):
        p = stages.add_parser(stage, help=help_, description=(cls.__doc__ or "") + "\n\n" + (__doc__ or ""),
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        p.add_argument(
            "--config", type=Path, default=None, help="YAML or JSON file of options (flags override it)"
        )
        p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        add_config_flags(p, cls)
        p.config_class = cls
        p.set_defaults(func=_cmd_train)
