"""Synthetic preference data made in code, for tests and the demo.

A clip is a coloured square on a gradient background. ``moving_square(smooth=True)`` slides the square
along a straight line (bouncing off the borders); ``smooth=False`` is *the same* path with the square
jittering around it and flickering in brightness, sometimes vanishing for a frame. A rater who likes
smooth motion scores the first high and the second low, which is the preference the DPO learning test
must recover. ``static_square`` never moves: with ``preferred="static"`` the dataset reproduces the
raters' bias towards static clips that :func:`huvidpo.data.pairs.compile_pairs` warns about.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from huvidpo.data.manifest import write_manifest

# One direction of travel per prompt, so each prompt's videos share their kind of motion.
_DIRECTIONS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("a square slides to the right", (1.0, 0.0)),
    ("a square slides down", (0.0, 1.0)),
    ("a square slides diagonally", (0.7071, 0.7071)),
    ("a square slides to the left", (-1.0, 0.0)),
    ("a square slides up", (0.0, -1.0)),
)


def _background(size: int) -> np.ndarray:
    ramp = np.linspace(30, 90, size, dtype=np.float32)
    bg = np.empty((size, size, 3), dtype=np.float32)
    bg[..., 0] = ramp[None, :]
    bg[..., 1] = ramp[:, None]
    bg[..., 2] = 60.0
    return bg


def _reflect(x: float, lo: float, hi: float) -> float:
    """Fold ``x`` back into ``[lo, hi]`` as a ball bouncing off two walls."""
    span = hi - lo
    if span <= 0:
        return lo
    y = (x - lo) % (2 * span)
    return lo + (y if y <= span else 2 * span - y)


def _path(
    num_frames: int,
    size: int,
    square: int,
    direction: tuple[float, float],
    speed: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """``(num_frames, 2)`` top-left corners (x, y) of the square along a bouncing straight line."""
    hi = float(size - square)
    start = rng.uniform(0, hi, size=2)
    steps = np.arange(num_frames, dtype=np.float64)[:, None] * np.asarray(direction)[None, :] * speed
    raw = start[None, :] + steps
    return np.array([[_reflect(x, 0.0, hi), _reflect(y, 0.0, hi)] for x, y in raw])


def _draw(
    size: int, corners: np.ndarray, square: int, color: np.ndarray, brightness: np.ndarray
) -> np.ndarray:
    bg = _background(size)
    out = np.repeat(bg[None], len(corners), axis=0)
    for i, (x, y) in enumerate(corners):
        xi, yi = int(np.rint(x)), int(np.rint(y))
        region = out[i, yi : yi + square, xi : xi + square]
        # Brightness blends towards the background, so 0 means the square is not there at all.
        region[:] = region * (1.0 - brightness[i]) + color * brightness[i]
    return np.clip(out, 0, 255).round().astype(np.uint8)


def _square_params(seed: int, size: int, square: int | None) -> tuple[np.random.Generator, int, np.ndarray]:
    rng = np.random.default_rng(seed)
    side = square if square is not None else max(2, size // 4)
    color = rng.uniform(170, 255, size=3).astype(np.float32)
    return rng, side, color


def moving_square(
    num_frames: int = 8,
    size: int = 64,
    smooth: bool = True,
    seed: int = 0,
    direction: tuple[float, float] = (1.0, 0.0),
    speed: float | None = None,
    square: int | None = None,
) -> np.ndarray:
    """A square moving along ``direction`` at ``speed`` px/frame (default ``size / 16``): ``(num_frames,
    size, size, 3)`` uint8. ``smooth=False`` gives the same path (same ``seed``) with random jitter of up
    to half the square's side, random brightness flicker (blending into the background) and the square
    vanishing in about one frame in five."""
    rng, side, color = _square_params(seed, size, square)
    v = speed if speed is not None else size / 16
    corners = _path(num_frames, size, side, direction, v, rng)
    brightness = np.ones(num_frames, dtype=np.float32)
    if not smooth:
        noise = np.random.default_rng(seed + 1_000_003)
        jitter = noise.uniform(-side / 2, side / 2, size=corners.shape)
        corners = np.clip(corners + jitter, 0, size - side)
        brightness = noise.uniform(0.35, 1.0, size=num_frames).astype(np.float32)
        brightness[noise.random(num_frames) < 0.2] = 0.0
    return _draw(size, corners, side, color, brightness)


def static_square(
    num_frames: int = 8, size: int = 64, seed: int = 0, square: int | None = None
) -> np.ndarray:
    """The square of ``moving_square(seed=seed)`` at its first position in every frame:
    ``(num_frames, size, size, 3)`` uint8."""
    rng, side, color = _square_params(seed, size, square)
    corners = np.repeat(_path(1, size, side, (0.0, 0.0), 0.0, rng), num_frames, axis=0)
    return _draw(size, corners, side, color, np.ones(num_frames, dtype=np.float32))


def _rater_scores(rng: np.random.Generator, base: float, raters: int) -> list[float]:
    """``raters`` scores around ``base`` whose mean is exactly ``base`` (offsets in 0.5 steps cancel in
    pairs), so all clips of one kind tie and only preferred-vs-other pairs survive tie dropping."""
    offsets: list[float] = []
    for _ in range(raters // 2):
        d = float(rng.choice([0.0, 0.5, 1.0]))
        offsets += [d, -d]
    if raters % 2:
        offsets.append(0.0)
    return [base + o for o in offsets]


def make_synthetic_dataset(
    directory: str | os.PathLike[str],
    n_prompts: int = 2,
    videos_per_prompt: int = 4,
    num_frames: int = 8,
    size: int = 64,
    raters: int = 2,
    seed: int = 0,
    preferred: Literal["smooth", "static"] = "smooth",
    speed: float | None = None,
) -> Path:
    """Write a small preference dataset: MP4 videos under ``videos/`` and ``manifest.jsonl`` (written
    last, atomically, after validation). Returns ``directory``.

    Per prompt, half the videos (rounded up) are the preferred kind and score 8 on average (each rater
    within +-1), the others score 2. ``preferred="smooth"``: smooth squares beat flickering ones.
    ``preferred="static"``: static squares beat smoothly moving ones (a motion-biased rating).
    ``speed``: the squares' speed in px/frame (default ``size / 16``, see :func:`moving_square`).
    Deterministic for a given ``seed``; takes well under a second at the defaults.
    """
    from huvidpo.video_io import write_video

    if n_prompts < 1 or videos_per_prompt < 2 or raters < 1:
        raise ValueError("need n_prompts >= 1, videos_per_prompt >= 2 and raters >= 1")
    if size % 2:
        raise ValueError(f"size must be even for H.264, got {size}")
    d = Path(directory)
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    n_good = (videos_per_prompt + 1) // 2
    for p in range(n_prompts):
        text, direction = _DIRECTIONS[p % len(_DIRECTIONS)]
        if p >= len(_DIRECTIONS):
            text = f"{text}, take {p // len(_DIRECTIONS) + 1}"
        for k in range(videos_per_prompt):
            vid = f"p{p}_v{k}"
            clip_seed = seed * 100_003 + p * 1_009 + k
            good = k < n_good
            if preferred == "smooth":
                frames = moving_square(
                    num_frames, size, smooth=good, seed=clip_seed, direction=direction, speed=speed
                )
            else:
                frames = (
                    static_square(num_frames, size, seed=clip_seed)
                    if good
                    else moving_square(
                        num_frames, size, smooth=True, seed=clip_seed, direction=direction, speed=speed
                    )
                )
            rel = f"videos/{vid}.mp4"
            write_video(frames, d / rel)
            scores = _rater_scores(rng, 8.0 if good else 2.0, raters)
            records.append(
                {
                    "type": "video",
                    "id": vid,
                    "file": rel,
                    "prompt": text,
                    "ratings": [
                        {"rater_id": f"rater{r}", "score": s, "time": f"2026-01-01T00:{r:02d}:{k % 60:02d}Z"}
                        for r, s in enumerate(scores)
                    ],
                }
            )
    write_manifest(d, records, min_frames=min(2, num_frames))
    return d
