"""Evaluate LoRA checkpoints against their base model: held-out pairs, video statistics, CLIP.

One call, :func:`run_evaluation`, takes an :class:`EvaluationSpec` and returns the report (a plain
dict, the shape of ``services.common.records.evaluation.EvaluationRecord`` less its ``id``):

- **held-out pairs** (per checkpoint): the DPO implicit reward accuracy and mean reward margin of the
  checkpoint against the reference (the base: the same UNet with the adapter off), by
  :func:`huvidpo.training.dpo.evaluate_pairs` with the fine-tune's beta, timestep range and number
  of draws, per prompt and over all pairs (the pair-weighted mean of the prompts). The base model is
  the reference itself (its margin is 0 by definition): its held-out result is skipped with a reason.
- **video statistics** (every model, the base included): clips generated from each prompt of the
  prompt set, each of ``seeds``, from the prompt's given first frame (or one drawn from the prompt),
  scored by :mod:`huvidpo.evaluation.video_stats`, per prompt and overall. Every model sees the
  same prompts, seeds and first frames, so the differences come from the weights.
- **motion collapse** (per checkpoint): its mean motion against the base's.
- **text-video alignment**: with ``clip_model`` (a local CLIP directory) the mean CLIP cosine of
  every clip with its prompt; without it, skipped with the reason.

The top-level ``heldout_implicit_acc``, ``heldout_reward_margin`` and ``motion_collapse`` are the
first checkpoint's (``checkpoint_id``); ``baseline`` names what it is compared with (``"base"`` or
another checkpoint of the spec).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from huvidpo.evaluation.video_stats import (
    MOTION_COLLAPSE_RATIO,
    ClipStatistics,
    clip_statistics,
    mean_statistics,
    motion_collapse,
)

BASE = "base"
# The fine-tune's DPO settings that define the held-out measure (recorded in the report's settings).
DPO_SETTINGS = ("beta", "timestep_min", "timestep_max", "eval_draws", "seed", "num_frames", "height", "width",
                "loss_skip_first_frame")  # fmt: skip
Progress = Callable[[str], None]


class EvaluationError(ValueError):
    """An evaluation that cannot run as given; ``field`` names the option or file at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class PromptCase:
    """One prompt of the prompt set, with its first frame: an image file or a video whose frame 0 is
    used; None: frame 0 of a held-out video of the prompt when the evaluation has held-out pairs of it
    (``EvaluationSpec.heldout_first_frames``), else drawn from the prompt."""

    prompt: str
    first_frame: str | None = None


@dataclass
class EvaluationSpec:
    """What to evaluate.

    ``checkpoints``: name -> LoRA adapter directory (``adapter_config.json`` inside, or a training
    checkpoint directory holding ``adapter/``), in order; the first is the checkpoint under evaluation.
    ``baseline``: ``"base"``, another name of ``checkpoints``, or None (no comparison asked for; the
    base is generated anyway, motion collapse is measured against it). ``heldout_pairs`` and
    ``dataset``: a ``heldout.jsonl`` (``pairs.jsonl`` line format) and the dataset directory its
    video ids belong to; both or neither. ``dpo``: the fine-tune's DPO settings (a
    ``huvidpo.training.DPOConfig``: beta, timestep_min/max, eval_draws, seed, num_frames, height,
    width, loss_skip_first_frame); None: the defaults at the generation's size. ``generation``: a
    ``huvidpo.pipeline.GenerationConfig`` (its ``seed`` is replaced by each of ``seeds``).
    """

    model: str
    checkpoints: dict[str, str]
    output_dir: str
    prompts: list[PromptCase] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    heldout_pairs: str | None = None
    dataset: str | None = None
    baseline: str | None = BASE
    generation: Any = None
    dpo: Any = None
    clip_model: str | None = None
    motion_collapse_ratio: float = MOTION_COLLAPSE_RATIO
    device: str | None = None
    batch_size: int = 4
    id: str = "local"
    heldout_first_frames: bool = True


# -- inputs ------------------------------------------------------------------------------------
def read_prompt_set(path: str | os.PathLike[str]) -> list[PromptCase]:
    """A prompt set file: JSON (a list, or ``{"prompts": [...]}``) or JSONL; each item a prompt string
    or ``{"prompt": str, "first_frame": "<image path, relative to the file>"}``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise EvaluationError(f"prompt set {path}: cannot be read ({exc.strerror})", field="prompts") from exc
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise EvaluationError(
                f"prompt set {path}: line {exc.lineno} is not JSON ({exc.msg})", field="prompts"
            ) from exc
    if isinstance(data, dict):
        data = data.get("prompts", data.get("items"))
    if not isinstance(data, list) or not data:
        raise EvaluationError(f"prompt set {path}: expected a non-empty list of prompts", field="prompts")
    cases = []
    for n, item in enumerate(data, start=1):
        if isinstance(item, str):
            item = {"prompt": item}
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("prompt"), str)
            or not item["prompt"].strip()
        ):
            raise EvaluationError(f"prompt set {path}: item {n} has no prompt", field="prompts")
        first = item.get("first_frame")
        if first is not None:
            image = (p.parent / str(first)).resolve()
            if not image.is_file():
                raise EvaluationError(
                    f"prompt set {path}: item {n}: first_frame {first} does not exist", field="prompts"
                )
            first = str(image)
        cases.append(PromptCase(item["prompt"], first))
    return cases


def adapter_directory(path: str | os.PathLike[str], name: str) -> Path:
    """The LoRA adapter directory of checkpoint ``name``: ``path`` itself or its ``adapter/``."""
    d = Path(path)
    for candidate in (d, d / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise EvaluationError(
        f"checkpoint {name}: {path} holds no LoRA adapter (adapter_config.json, or adapter/ inside)",
        field="checkpoint",
    )


def _check_spec(spec: EvaluationSpec) -> None:
    if not spec.checkpoints:
        raise EvaluationError("name at least one checkpoint to evaluate", field="checkpoint")
    if BASE in spec.checkpoints:
        raise EvaluationError(
            f"{BASE!r} names the base model; give the checkpoint another name", field="checkpoint"
        )
    if spec.baseline is not None and spec.baseline != BASE and spec.baseline not in spec.checkpoints:
        raise EvaluationError(
            f"baseline {spec.baseline!r} is neither 'base' nor one of the checkpoints", field="baseline"
        )
    if not spec.prompts and spec.heldout_pairs is None:
        raise EvaluationError(
            "nothing to evaluate: give held-out pairs, a prompt set, or both", field="prompts"
        )
    if (spec.heldout_pairs is None) != (spec.dataset is None):
        raise EvaluationError(
            "held-out pairs need the dataset their videos belong to (and a dataset needs the pairs)",
            field="dataset" if spec.dataset is None else "pairs",
        )
    if not spec.seeds:
        raise EvaluationError("give at least one seed", field="seeds")
    if not 0 < spec.motion_collapse_ratio <= 1:
        raise EvaluationError(
            f"motion_collapse_ratio must be in (0, 1], got {spec.motion_collapse_ratio}",
            field="motion_collapse_ratio",
        )
    for name, path in spec.checkpoints.items():
        adapter_directory(path, name)
    model = Path(spec.model)
    if not (model / "unet").is_dir():
        raise EvaluationError(f"model {spec.model} is not a model directory (no unet/)", field="model")


def _load_heldout(spec: EvaluationSpec, dpo: Any) -> tuple[list[Any], dict[str, str], dict[str, int]]:
    from huvidpo.data import DatasetError, load_dataset, read_pairs
    from huvidpo.training.common import check_clip_frames
    from huvidpo.training.config import ConfigError

    assert spec.heldout_pairs is not None and spec.dataset is not None
    if not Path(spec.heldout_pairs).is_file():
        raise EvaluationError(f"held-out pairs {spec.heldout_pairs} do not exist", field="pairs")
    try:
        pairs = read_pairs(spec.heldout_pairs)
    except DatasetError as exc:
        raise EvaluationError(f"held-out pairs: {exc}", field="pairs") from exc
    if not pairs:
        raise EvaluationError(f"held-out pairs {spec.heldout_pairs} hold no pair", field="pairs")
    try:
        ds = load_dataset(spec.dataset)
        check_clip_frames(ds, dpo)
    except (DatasetError, ConfigError) as exc:
        raise EvaluationError(f"dataset {spec.dataset}: {exc}", field="dataset") from exc
    for n, p in enumerate(pairs, start=1):
        missing = [v for v in (p.chosen_id, p.rejected_id) if v not in ds.videos]
        if missing:
            raise EvaluationError(
                f"held-out pairs line {n}: video {missing[0]!r} is not in the dataset {spec.dataset}",
                field="pairs",
            )
    paths = {vid: str(v.path) for vid, v in ds.videos.items()}
    frames = {str(v.path): int(v.num_frames) for v in ds.videos.values() if v.num_frames}
    return pairs, paths, frames


def _first_frames(
    spec: EvaluationSpec, heldout: tuple[list[Any], dict[str, str], dict[str, int]] | None
) -> tuple[list[Any], list[str | None]]:
    """Each prompt's first frame as an image (None: drawn from the prompt) and the file it came from.
    A prompt without one takes frame 0 of a video it was held out with (the chosen video of its first
    held-out pair, by id), so the default evaluation conditions on a real first frame and measures
    first-frame fidelity, as generation does in the product."""
    from huvidpo.video_io import ImageDecodeError, VideoDecodeError, load_first_frame

    images: list[Any] = []
    names: list[str | None] = []
    for case in spec.prompts:
        path = case.first_frame
        if path is None and heldout is not None and spec.heldout_first_frames:
            own = sorted((p.chosen_id, p.rejected_id) for p in heldout[0] if p.prompt == case.prompt)
            path = heldout[1][own[0][0]] if own else None
        if path is None:
            images.append(None)
            names.append(None)
            continue
        try:
            images.append(load_first_frame(path))
        except (OSError, ImageDecodeError, VideoDecodeError) as exc:
            raise EvaluationError(
                f"first frame {Path(path).name} of prompt {case.prompt!r} is not a readable image or video",
                field="prompts",
            ) from exc
        names.append(Path(path).name)
    return images, names


def _dpo_config(spec: EvaluationSpec, generation: Any) -> Any:
    from huvidpo.training.config import ConfigError, DPOConfig

    base = (
        spec.dpo
        if spec.dpo is not None
        else DPOConfig(num_frames=generation.num_frames, height=generation.height, width=generation.width)
    )
    work = Path(spec.output_dir) / "work"
    cfg = DPOConfig.from_mapping({
        **base.to_dict(), "model": spec.model, "dataset": spec.dataset or str(work),
        "output_dir": str(work), "cache_dir": str(work / "cache"), "random_start": False,
        "cache_latents": True, "hflip_p": 0.0, "device": spec.device,
    })  # fmt: skip
    try:
        cfg.validate()
    except ConfigError as exc:
        raise EvaluationError(f"DPO settings: {exc}", field=exc.field) from exc
    return cfg


# -- the evaluation ----------------------------------------------------------------------------
def _heldout(
    unet: Any, pairs: list[Any], paths: dict[str, str], source: Any, sched: Any, dpo: Any
) -> dict[str, Any]:
    """Held-out accuracy and margin per prompt and over all pairs (pair-weighted mean of the prompts)."""
    from huvidpo.training.dpo import evaluate_pairs

    by_prompt: dict[str, list[Any]] = {}
    for p in pairs:
        by_prompt.setdefault(p.prompt, []).append(p)
    per_prompt = {}
    for prompt, group in sorted(by_prompt.items()):
        m = evaluate_pairs(unet, group, paths, source, sched, dpo)
        per_prompt[prompt] = {
            "implicit_acc": m["eval_implicit_acc"],
            "reward_margin": m["eval_reward_margin"],
            "pairs": len(group),
        }
    n = len(pairs)
    return {
        "implicit_acc": sum(r["implicit_acc"] * r["pairs"] for r in per_prompt.values()) / n,
        "reward_margin": sum(r["reward_margin"] * r["pairs"] for r in per_prompt.values()) / n,
        "pairs": n,
        "per_prompt": per_prompt,
    }


def _generate(
    pipe: Any, spec: EvaluationSpec, generation: Any, images: list[Any]
) -> list[tuple[int, int, np.ndarray]]:
    """Every (prompt index, seed, frames) of the prompt set, in batches of ``batch_size``."""
    cases = [(i, seed) for i, _ in enumerate(spec.prompts) for seed in spec.seeds]
    out: list[tuple[int, int, np.ndarray]] = []
    for lo in range(0, len(cases), max(1, spec.batch_size)):
        chunk = cases[lo : lo + spec.batch_size]
        results = pipe.generate_batch(
            [spec.prompts[i].prompt for i, _ in chunk],
            [images[i] for i, _ in chunk],
            generation,
            seeds=[s for _, s in chunk],
        )
        out.extend((i, s, r.frames) for (i, s), r in zip(chunk, results, strict=True))
    return out


def _video_results(
    spec: EvaluationSpec,
    clips: list[tuple[int, int, np.ndarray]],
    firsts: list[np.ndarray | None],
    names: list[str | None],
    scorer: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]], float | None]:
    per_case: dict[int, list[tuple[int, ClipStatistics, float | None]]] = {}
    for i, seed, frames in clips:
        stats = clip_statistics(frames, firsts[i])
        score = scorer.score(frames, spec.prompts[i].prompt) if scorer is not None else None
        per_case.setdefault(i, []).append((seed, stats, score))
    prompts = []
    for i, case in enumerate(spec.prompts):
        rows = per_case.get(i, [])
        scores = [s for _, _, s in rows if s is not None]
        prompts.append({
            "prompt": case.prompt,
            "first_frame": names[i],
            "seeds": [seed for seed, _, _ in rows],
            **mean_statistics([st for _, st, _ in rows]),
            "clip_score": float(np.mean(scores)) if scores else None,
        })  # fmt: skip
    all_scores = [p["clip_score"] for p in prompts if p["clip_score"] is not None]
    overall = mean_statistics([st for rows in per_case.values() for _, st, _ in rows])
    return overall, prompts, (float(np.mean(all_scores)) if all_scores else None)


def run_evaluation(spec: EvaluationSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Run the evaluation ``spec`` describes and return its report (see the module docstring).

    Inputs are checked before any model is loaded (:class:`EvaluationError` naming the option or
    file). Work files (the latent cache of the held-out clips) go under ``output_dir/work``."""
    import torch

    from huvidpo.evaluation.clip_score import ClipModelError, ClipScorer
    from huvidpo.lora import load_lora
    from huvidpo.models import load_components
    from huvidpo.pipeline import GenerationConfig, HuViDPOPipeline
    from huvidpo.training.common import make_clip_source
    from huvidpo.video_io import resize_center_crop

    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    _check_spec(spec)
    generation = spec.generation or GenerationConfig()
    try:
        generation.validate()
    except ValueError as exc:
        raise EvaluationError(f"generation settings: {exc}", field="generation") from exc
    dpo = _dpo_config(spec, generation)
    heldout = _load_heldout(spec, dpo) if spec.heldout_pairs else None
    images, names = _first_frames(spec, heldout)
    firsts = [
        None if im is None else resize_center_crop(im, generation.height, generation.width) for im in images
    ]
    scorer, clip_skipped = None, None
    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.clip_model:
        try:
            scorer = ClipScorer.from_directory(spec.clip_model, device=device)
        except ClipModelError as exc:
            raise EvaluationError(str(exc), field="clip_model") from exc
    else:
        clip_skipped = "no CLIP model configured (clip_model): text-video alignment not measured"

    say(f"loading {spec.model}")
    components = load_components(spec.model, device=device, dtype=torch.float32)
    pipe = HuViDPOPipeline(components)
    unet = components.unet
    source = sched = None
    if heldout is not None:
        source = make_clip_source(components, dpo, torch.device(device), f"eval:{spec.model}", heldout[2])
        sched = components.ddpm()

    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    for n, (name, path) in enumerate([(BASE, None), *spec.checkpoints.items()]):
        t0 = time.perf_counter()
        adapter = f"eval{n}"
        if path is not None:
            load_lora(unet, adapter_directory(path, name), adapter=adapter)
        try:
            res: dict[str, Any] = {"name": name, "adapter": None if path is None else str(path)}
            if heldout is None:
                res["heldout"], res["heldout_skipped"] = None, "no held-out pairs given"
            elif path is None:
                res["heldout"] = None
                res["heldout_skipped"] = (
                    "the base model is the reference: its reward margin is 0 by definition"
                )
            else:
                say(f"{name}: {len(heldout[0])} held-out pairs")
                res["heldout"] = _heldout(unet, heldout[0], heldout[1], source, sched, dpo)
                res["heldout_skipped"] = None
            if spec.prompts:
                say(f"{name}: {len(spec.prompts) * len(spec.seeds)} clips")
                clips = _generate(pipe, spec, generation, images)
                res["video"], res["prompts"], res["clip_score"] = _video_results(
                    spec, clips, firsts, names, scorer
                )
            else:
                res["video"], res["prompts"], res["clip_score"] = None, [], None
            res["clip_skipped"] = clip_skipped if spec.prompts else "no prompt set given"
        finally:
            if path is not None:
                unet.delete_adapters(adapter)
        timings[name] = time.perf_counter() - t0
        results[name] = res

    base_motion = results[BASE]["video"]["motion"] if results[BASE]["video"] else None
    for name, res in results.items():
        if name == BASE or base_motion is None or res["video"] is None:
            res["motion_ratio"], res["motion_collapse"] = None, None
        else:
            res["motion_collapse"], res["motion_ratio"] = motion_collapse(
                base_motion, res["video"]["motion"], spec.motion_collapse_ratio
            )
    main = next(iter(spec.checkpoints))
    held = results[main]["heldout"]
    return {
        "id": spec.id,
        "checkpoint_id": main,
        "baseline": spec.baseline,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "state": "succeeded",
        "heldout_implicit_acc": held["implicit_acc"] if held else None,
        "heldout_reward_margin": held["reward_margin"] if held else None,
        "motion_collapse": results[main]["motion_collapse"],
        "results": results,
        "settings": {
            "seeds": list(spec.seeds),
            "prompts": len(spec.prompts),
            "heldout_pairs": len(heldout[0]) if heldout else 0,
            "generation": {
                k: getattr(generation, k)
                for k in ("num_frames", "height", "width", "steps", "guidance_scale", "eta")
            },
            "dpo": {k: getattr(dpo, k) for k in DPO_SETTINGS},
            "motion_collapse_ratio": spec.motion_collapse_ratio,
            "clip_model": Path(spec.clip_model).name if spec.clip_model else None,
            "device": device,
        },
        "seconds": {"total": time.perf_counter() - started, **timings},
    }


# -- output ------------------------------------------------------------------------------------
PLOTTED = (
    ("heldout_implicit_acc", "held-out implicit accuracy"),
    ("motion", "motion (px/frame)"),
    ("warp_error", "warp error (lower: more consistent)"),
    ("flicker", "flicker (lower is better)"),
    ("first_frame_psnr", "first-frame PSNR (dB)"),
    ("clip_score", "CLIP text-video cosine"),
)


def metric_value(result: dict[str, Any], key: str) -> float | None:
    """One plotted metric of a model's result (None when not measured)."""
    if key == "heldout_implicit_acc":
        return (result.get("heldout") or {}).get("implicit_acc")
    if key == "clip_score":
        return result.get("clip_score")
    return (result.get("video") or {}).get(key)


def plot_comparison(report: dict[str, Any], png_path: str | os.PathLike[str]) -> Path:
    """A bar chart per metric (held-out accuracy, video statistics, CLIP) with one bar per model;
    a checkpoint flagged for motion collapse has its motion bar hatched and red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(report["results"])
    metrics = [
        (k, t) for k, t in PLOTTED if any(metric_value(r, k) is not None for r in report["results"].values())
    ]
    cols = max(1, min(3, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    for ax, (key, title) in zip(axes.flat, metrics, strict=False):
        values = [metric_value(report["results"][n], key) for n in names]
        bars = ax.bar(range(len(names)), [v if v is not None else 0.0 for v in values], color="tab:blue")
        for bar, n, v in zip(bars, names, values, strict=True):
            if v is None:
                bar.set_alpha(0.15)
            if key == "motion" and report["results"][n].get("motion_collapse"):
                bar.set_color("tab:red")
                bar.set_hatch("//")
        if key == "heldout_implicit_acc":
            ax.axhline(0.5, color="grey", lw=0.5, ls="--")
            ax.set_ylim(0, 1)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.suptitle(
        f"evaluation {report.get('id', '')}: {report['checkpoint_id']} vs {report.get('baseline')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(report: dict[str, Any], directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``report.json`` and ``comparison.png`` in ``directory``; returns their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
    return path, plot_comparison(report, d / "comparison.png")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few human-readable lines per model (the CLI prints them)."""
    lines = [f"evaluation of {report['checkpoint_id']} (baseline: {report['baseline']})"]
    for name, r in report["results"].items():
        parts = [name]
        if r.get("heldout"):
            h = r["heldout"]
            parts.append(
                f"held-out acc {h['implicit_acc']:.3f} margin {h['reward_margin']:+.3f} ({h['pairs']} pairs)"
            )
        if r.get("video"):
            v = r["video"]
            parts.append(
                f"motion {v['motion']:.3f} px/frame, warp error {v['warp_error']:.4f}, flicker {v['flicker']:.4f}"
            )
            if v.get("first_frame_psnr") is not None:
                parts.append(f"first-frame PSNR {v['first_frame_psnr']:.1f} dB")
        if r.get("clip_score") is not None:
            parts.append(f"CLIP {r['clip_score']:.3f}")
        if r.get("motion_collapse"):
            parts.append(f"MOTION COLLAPSE (ratio {r['motion_ratio']:.2f})")
        lines.append("  " + "; ".join(parts))
    return lines


def default_checkpoint_names(paths: Sequence[str]) -> dict[str, str]:
    """``NAME=DIR`` or ``DIR`` (named after the directory) -> {name: dir}; names must be unique."""
    out: dict[str, str] = {}
    for raw in paths:
        name, sep, path = raw.partition("=")
        if not sep:
            path = raw
            p = Path(raw)
            name = p.parent.name if p.name == "adapter" else p.name
        if name in out:
            raise EvaluationError(
                f"checkpoint name {name!r} given twice: name them NAME=DIR", field="checkpoint"
            )
        out[name] = path
    return out
