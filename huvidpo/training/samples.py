"""Sample videos rendered into each checkpoint with the weights being trained (the paper's training
logged validation GIFs each epoch).

With ``sample_count > 0`` every checkpoint directory gets, before its manifest is written (so they
are in its ``files`` and published with it)::

    samples/samples.json      {"items": [{"index", "prompt", "seed", "video", "first_frame",
                                          "frames", "height", "width", "steps"}]}
    samples/<index:02d>.mp4   the video (frame 0 is the first frame it was conditioned on)
    samples/<index:02d>-first.png   that first frame, as given to the pipeline (null in the JSON when
                                    the first frame was drawn from the prompt)

Prompts, first frames and seeds are fixed for a run, so checkpoints are compared on the same inputs
and noise. Rendering does not disturb training: the global RNG states are restored, the UNet goes
back to its mode (the pipeline runs it in eval mode: no LoRA dropout), no gradient is recorded.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from huvidpo.training.config import ConfigError, TrainConfig

SAMPLES_DIR = "samples"
SAMPLES_JSON = "samples.json"

log = logging.getLogger("huvidpo.training")


@dataclass(frozen=True)
class SampleSpec:
    """One sample of every checkpoint: ``first_frame`` is an image or video file (frame 0 is used),
    or None to draw the first frame from the prompt."""

    index: int
    prompt: str
    seed: int
    first_frame: Path | None


def plan_samples(cfg: TrainConfig, sources: Sequence[tuple[str, str | None]]) -> list[SampleSpec]:
    """The run's ``cfg.sample_count`` samples. ``sources`` are the training data's (prompt, video)
    in the order they are chosen by default (held-out prompts first, then the training prompts).

    With ``sample_prompts`` those prompts are used (cycled to ``sample_count``), with the
    ``sample_first_frames`` given (files of the dataset) or else frame 0 of the prompt's video in
    ``sources`` (drawn from the prompt when it has none). Sample ``i`` uses seed ``sample_seed + i``."""
    n = cfg.sample_count
    if n <= 0:
        return []
    video_of: dict[str, str | None] = {}
    for prompt, video in sources:
        video_of.setdefault(prompt, video)
    chosen: list[tuple[str, Path | None]]
    if cfg.sample_prompts:
        frames = [Path(cfg.dataset) / f for f in cfg.sample_first_frames]
        for name, path in zip(cfg.sample_first_frames, frames, strict=True):
            if not path.is_file():  # refused before the first step, not at the first checkpoint
                raise ConfigError(
                    f"sample_first_frames: {name!r} is not a file of the dataset", field="sample_first_frames"
                )
        chosen = []
        for i, prompt in enumerate(cfg.sample_prompts):
            video = video_of.get(prompt)
            chosen.append((prompt, frames[i] if frames else Path(video) if video else None))
    else:
        chosen = [(p, Path(v) if v else None) for p, v in video_of.items()]
    if not chosen:
        return []
    return [
        SampleSpec(i, chosen[i % len(chosen)][0], cfg.sample_seed + i, chosen[i % len(chosen)][1])
        for i in range(n)
    ]


def first_frame(path: Path) -> np.ndarray:
    """Frame 0 of a video, or an image, as ``(h, w, 3)`` uint8 (``video_io.load_first_frame``)."""
    from huvidpo.video_io import load_first_frame

    return np.asarray(load_first_frame(path), dtype=np.uint8)


@contextmanager
def preserved_rng(device: torch.device | None = None) -> Iterator[None]:
    """Every global RNG (torch CPU and CUDA, numpy, python) as it was before the block, after it."""
    devices = [device] if device is not None and device.type == "cuda" else []
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def sample_shape(cfg: TrainConfig) -> tuple[int, int, int]:
    """(frames, height, width) of the samples: the ``sample_*`` settings, else the training clips'."""
    return (
        cfg.sample_num_frames or cfg.num_frames,
        cfg.sample_height or cfg.height,
        cfg.sample_width or cfg.width,
    )


def render_samples(
    checkpoint_dir: Path,
    components: Any,
    specs: Sequence[SampleSpec],
    cfg: TrainConfig,
    autocast: Any = nullcontext,
) -> list[dict[str, Any]]:
    """Render ``specs`` with ``components`` (its UNet as it is now: LoRA active for DPO) into
    ``checkpoint_dir/samples/`` and return the items of ``samples.json``."""
    from PIL import Image

    from huvidpo.pipeline import GenerationConfig, HuViDPOPipeline
    from huvidpo.video_io import resize_center_crop

    frames, height, width = sample_shape(cfg)
    out = checkpoint_dir / SAMPLES_DIR
    out.mkdir(parents=True, exist_ok=True)
    pipe = HuViDPOPipeline(components)
    items: list[dict[str, Any]] = []
    started = time.perf_counter()
    with preserved_rng(pipe.device), torch.no_grad(), autocast():
        for spec in specs:
            gen = GenerationConfig(num_frames=frames, height=height, width=width, steps=cfg.sample_steps,
                                   guidance_scale=cfg.sample_guidance_scale, seed=spec.seed)  # fmt: skip
            image: np.ndarray | None = None
            first_rel = None
            if spec.first_frame is not None:
                image = resize_center_crop(first_frame(spec.first_frame), height, width)
                first_rel = f"{SAMPLES_DIR}/{spec.index:02d}-first.png"
                Image.fromarray(image).save(checkpoint_dir / first_rel)
            # generate_batch runs the UNet in eval mode and puts its mode back.
            result = pipe.generate_batch([spec.prompt], [image], gen, seeds=[spec.seed])[0]
            video = f"{SAMPLES_DIR}/{spec.index:02d}.mp4"
            result.save(checkpoint_dir / video)
            items.append({"index": spec.index, "prompt": spec.prompt, "seed": spec.seed, "video": video,
                          "first_frame": first_rel, "frames": frames, "height": height, "width": width,
                          "steps": cfg.sample_steps})  # fmt: skip
    (out / SAMPLES_JSON).write_text(json.dumps({"items": items}, indent=2))
    log.info("rendered %d sample videos in %.1f s", len(items), time.perf_counter() - started)
    return items


def read_samples(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """The items of a checkpoint's ``samples/samples.json`` ([] when it has none)."""
    path = checkpoint_dir / SAMPLES_DIR / SAMPLES_JSON
    if not path.is_file():
        return []
    items: list[dict[str, Any]] = json.loads(path.read_text())["items"]
    return items


__all__ = ["SampleSpec", "plan_samples", "preserved_rng", "read_samples", "render_samples"]
