"""``huvidpo pairs DATASET``: validate a preference dataset, compile its pairs and print the report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _cmd_pairs(args: argparse.Namespace) -> int:
    from huvidpo.data.manifest import load_dataset
    from huvidpo.data.pairs import compile_pairs, write_pairs

    ds = load_dataset(args.dataset, min_frames=args.min_frames, check_videos=not args.no_video_check)
    pairset = compile_pairs(
        ds,
        tie_policy=args.tie_policy,
        min_margin=args.min_margin,
        margin_weighting=args.margin_weighting,
        seed=args.seed,
        motion_check=not args.no_motion_check,
        holdout_fraction=args.holdout_fraction,
        holdout_seed=args.holdout_seed,
    )
    heldout_file = heldout_path(args.out) if args.out is not None and args.holdout_fraction else None
    if args.out is not None:
        write_pairs(pairset, args.out)
    if heldout_file is not None:
        write_pairs(pairset.heldout, heldout_file)
    if args.json:
        out: dict[str, Any] = {"dataset": str(ds.root), "report": pairset.report.to_dict()}
        if args.out is not None:
            out["pairs_file"] = str(args.out)
        if heldout_file is not None:
            out["heldout_file"] = str(heldout_file)
        print(json.dumps(out, indent=2))
    else:
        print(f"dataset       {ds.root}")
        print(pairset.report.format())
        if args.out is not None:
            print(f"wrote {len(pairset.pairs)} pairs to {args.out}")
        if heldout_file is not None:
            print(f"wrote {len(pairset.heldout)} held-out pairs to {heldout_file}")
    return 0


def heldout_path(pairs_file: Path) -> Path:
    """Where the held-out pairs go, beside ``pairs_file``: ``heldout.jsonl`` next to a ``pairs.jsonl``
    (the control plane's layout), else ``<stem>.heldout<suffix>``."""
    if pairs_file.name == "pairs.jsonl":
        return pairs_file.with_name("heldout.jsonl")
    return pairs_file.with_name(f"{pairs_file.stem}.heldout{pairs_file.suffix or '.jsonl'}")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def register(subparsers: Any) -> None:
    """Add the ``pairs`` subcommand to ``huvidpo``'s subparsers."""
    p = subparsers.add_parser(
        "pairs", help="validate a preference dataset, compile its pairs and print a report"
    )
    p.add_argument("dataset", type=Path, help="dataset directory (manifest.jsonl or manifest.json + videos)")
    p.add_argument(
        "--tie-policy", choices=("drop", "keep"), default="drop", help="what to do with equal scores"
    )
    p.add_argument("--min-margin", type=float, default=0.0, help="drop score pairs closer than this (0..10)")
    p.add_argument("--margin-weighting", action="store_true", help="weight score pairs by their margin")
    p.add_argument("--seed", type=int, default=0, help="fixes the direction of kept ties")
    p.add_argument("--min-frames", type=int, default=2, help="reject videos with fewer frames")
    p.add_argument(
        "--no-video-check", action="store_true", help="do not decode the videos (faster, less safe)"
    )
    p.add_argument("--no-motion-check", action="store_true", help="skip the motion-bias check")
    p.add_argument(
        "--holdout-fraction",
        type=_fraction,
        default=0.0,
        help="hold out this fraction of the prompts (whole prompts, [0, 1)) for evaluation; with --out "
        "their pairs go to heldout.jsonl beside it (<stem>.heldout.jsonl for another name)",
    )
    p.add_argument("--holdout-seed", type=int, default=0, help="fixes which prompts are held out")
    p.add_argument("--out", type=Path, default=None, help="write the pairs as JSONL here (atomically)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_pairs)
