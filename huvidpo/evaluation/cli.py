"""``huvidpo eval``: evaluate LoRA checkpoints against their base model on this machine.

    huvidpo eval --model MODEL_DIR --checkpoint [NAME=]DIR [--checkpoint ...] \\
        [--pairs heldout.jsonl --data DATASET_DIR] [--prompts prompts.json] [--seeds 0 1] \\
        [--dpo-config run/config.json] [--clip-model CLIP_DIR] --out OUT_DIR

Writes ``OUT_DIR/report.json`` (the evaluation record's fields) and ``OUT_DIR/comparison.png``, and
prints a summary. Bad input exits with code 2 and a message naming the option or file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from huvidpo.cli import EXIT_BAD_INPUT, add_generation_options


def _cmd_eval(args: argparse.Namespace) -> int:
    from huvidpo.cli import generation_config
    from huvidpo.evaluation.evaluate import (
        EvaluationError,
        EvaluationSpec,
        default_checkpoint_names,
        read_prompt_set,
        run_evaluation,
        summary_lines,
        write_report,
    )
    from huvidpo.pipeline import GenerationError
    from huvidpo.training.config import ConfigError, DPOConfig

    try:
        checkpoints = default_checkpoint_names(args.checkpoint)
        prompts = read_prompt_set(args.prompts) if args.prompts else []
        generation = generation_config(args, seed=args.seeds[0])
        dpo_overrides = {
            "beta": args.beta, "timestep_min": args.timestep_min, "timestep_max": args.timestep_max,
            "eval_draws": args.eval_draws, "num_frames": args.pair_frames or args.frames,
            "height": args.pair_height or args.height, "width": args.pair_width or args.width,
        }  # fmt: skip
        if args.dpo_config:
            if not args.dpo_config.is_file():
                raise EvaluationError(f"--dpo-config {args.dpo_config} does not exist", field="dpo_config")
            # The fine-tune's own clip size applies unless a --pair-* flag overrides it.
            for key, flag in (
                ("num_frames", "pair_frames"),
                ("height", "pair_height"),
                ("width", "pair_width"),
            ):
                if getattr(args, flag) is None:
                    dpo_overrides[key] = None
        dpo = DPOConfig.load(args.dpo_config, dpo_overrides)
        spec = EvaluationSpec(
            model=str(args.model), checkpoints=checkpoints, output_dir=str(args.out), prompts=prompts,
            seeds=list(args.seeds), heldout_pairs=str(args.pairs) if args.pairs else None,
            dataset=str(args.data) if args.data else None, baseline=args.baseline, generation=generation,
            dpo=dpo, clip_model=str(args.clip_model) if args.clip_model else None,
            motion_collapse_ratio=args.motion_collapse_ratio, device=args.device, batch_size=args.batch_size,
        )  # fmt: skip
        progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        report = run_evaluation(spec, progress=progress)
    except (EvaluationError, ConfigError, GenerationError) as exc:
        field = getattr(exc, "field", None)
        print(f"huvidpo eval: error: {exc}" + (f" [{field}]" if field else ""), file=sys.stderr)
        return EXIT_BAD_INPUT
    report_path, png = write_report(report, args.out)
    for line in summary_lines(report):
        print(line)
    print(json.dumps({"report": str(report_path), "plot": str(png)}))
    return 0


def register(subparsers: Any) -> None:
    """Add ``eval`` to the ``huvidpo`` command."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate LoRA checkpoints vs their base: held-out pairs, video statistics, CLIP",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="the base model directory (diffusers layout)")
    p.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]DIR",
                   help="a LoRA adapter (or training checkpoint) directory; repeat to compare several; "
                        "the first is the one under evaluation")  # fmt: skip
    p.add_argument("--baseline", default="base", help="'base' (default) or the NAME of another --checkpoint")
    p.add_argument("--pairs", type=Path, help="held-out pairs (heldout.jsonl, the pairs.jsonl format)")
    p.add_argument("--data", "--dataset", dest="data", type=Path, help="the dataset directory of --pairs")
    p.add_argument("--prompts", type=Path, help="prompt set: JSON/JSONL of prompts or {prompt, first_frame}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one clip per prompt and seed")
    p.add_argument("--clip-model", type=Path, help="a local CLIP directory (Hugging Face layout)")
    p.add_argument("--dpo-config", type=Path,
                   help="the fine-tune's config (its run's config.json): beta, timesteps, clip size")  # fmt: skip
    p.add_argument("--beta", type=float)
    p.add_argument("--timestep-min", type=int)
    p.add_argument("--timestep-max", type=int)
    p.add_argument("--eval-draws", type=int, help="(t, noise) draws per held-out pair")
    p.add_argument("--pair-frames", type=int, help="frames of held-out clips (default: --frames)")
    p.add_argument("--pair-height", type=int, help="(default: --height)")
    p.add_argument("--pair-width", type=int, help="(default: --width)")
    p.add_argument("--motion-collapse-ratio", type=float, default=0.7,
                   help="flag a checkpoint moving less than this fraction of the base's motion")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4, help="clips generated per UNet batch")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, required=True, help="output directory (report.json, comparison.png)")
    p.add_argument("--quiet", action="store_true")
    add_generation_options(p, steps=25)
    p.set_defaults(func=_cmd_eval)
