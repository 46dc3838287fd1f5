"""Video statistics of generated clips, from OpenCV's Farneback optical flow (no learned weights).

Every statistic is computed on grey frames ``I_t`` (BT.601 luma of the RGB frames, intensities
scaled to [0, 1]) of one clip ``(f, h, w, 3) uint8``, with the dense flows of every neighbouring pair:
``F_t`` from frame t to t+1 and ``B_t`` from frame t+1 back to frame t (``cv2.calcOpticalFlowFarneback``,
displacements in pixels). ``W(I, F)`` samples ``I`` at ``x + F(x)`` (``cv2.remap``, bilinear, border
replicated): the next frame warped back onto the current one.

- ``motion`` (pixels per frame): mean of ``|F_t(x)|`` over pixels and the f-1 pairs. A static clip
  scores 0, a clip translating by 1 px per frame scores about 1 (on textured content; flat regions
  have no measurable flow).
- ``warp_error`` (temporal consistency, lower is more consistent; intensity units in [0, 1]): mean of
  ``|I_t - W(I_{t+1}, F_t)|`` over pixels and pairs: what the flow cannot explain of the change from
  one frame to the next (new content, flicker, tearing).
- ``flicker`` (high-frequency temporal energy; intensity units in [0, 1]): the root mean square, over
  pixels and the inner frames t = 1..f-2, of ``I_t - (W(I_{t-1}, B_{t-1}) + W(I_{t+1}, F_t)) / 2``,
  the motion-compensated second temporal difference (a high-pass filter along time: 0 for a frame
  that lies on the straight line between its neighbours, e.g. a still, a linear fade or a pure
  translation; 1 for a pixel alternating between black and white). Clips of fewer than 3 frames
  score 0.
- ``first_frame_psnr`` (dB, capped at :data:`PSNR_CAP`) and ``first_frame_mae`` (mean absolute
  difference of RGB values scaled to [0, 1]) of frame 0 against the given first frame (resized and
  centre-cropped to the clip's size as the pipeline does): first-frame fidelity. ``None`` without a
  given first frame.

Motion collapse: a checkpoint whose mean ``motion`` is below ``ratio`` (default
:data:`MOTION_COLLAPSE_RATIO`) times the base model's on the same prompts, seeds and first frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# The pairs compiler warns of motion bias at the same ratio (huvidpo.data.pairs.MOTION_WARN_RATIO):
# a checkpoint moving less than 70% as much as its base has learnt what that warning predicts.
MOTION_COLLAPSE_RATIO = 0.7
# A base model that moves less than this (px/frame) gives no ratio to judge a drop by.
MIN_BASE_MOTION = 1e-3
PSNR_CAP = 100.0
# Farneback settings (OpenCV's documented example): pyramid scale 0.5, 3 levels, 15 px window,
# 3 iterations, 5-pixel polynomial neighbourhood with sigma 1.2.
FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2}


class VideoStatsUnavailable(RuntimeError):
    """OpenCV is not installed (the ``eval`` extra)."""


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - the dev and server installs have it
        raise VideoStatsUnavailable(
            "video statistics need OpenCV: pip install 'huvidpo[eval]' (opencv-python-headless)"
        ) from exc
    return cv2


@dataclass
class ClipStatistics:
    """The statistics of one clip (see the module docstring for each definition and unit)."""

    frames: int
    motion: float
    warp_error: float
    flicker: float
    first_frame_psnr: float | None = None
    first_frame_mae: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def grey_frames(frames: np.ndarray) -> np.ndarray:
    """``(f, h, w, 3) uint8`` RGB -> ``(f, h, w) uint8`` luma (OpenCV's RGB2GRAY, BT.601)."""
    cv2 = _cv2()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (f, h, w, 3) uint8, got {frames.shape} {frames.dtype}")
    return np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames])


def optical_flow(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Farneback flow ``(h, w, 2)`` (x, y displacement in pixels) from grey ``prev`` to ``nxt``
    (``(h, w) uint8``): ``prev(x) ~ nxt(x + flow(x))``."""
    cv2 = _cv2()
    return cv2.calcOpticalFlowFarneback(prev, nxt, None, flags=0, **FARNEBACK)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``image (h, w) float32`` sampled at ``x + flow(x)`` (bilinear, border replicated)."""
    cv2 = _cv2()
    h, w = image.shape
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(
        image, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def first_frame_fidelity(frame0: np.ndarray, given: np.ndarray) -> tuple[float, float]:
    """``(psnr dB capped at PSNR_CAP, mean absolute difference in [0, 1])`` of ``frame0`` against
    ``given``, both ``(h, w, 3) uint8`` of the same size."""
    if frame0.shape != given.shape:
        raise ValueError(f"frame 0 is {frame0.shape}, the given first frame {given.shape}")
    diff = frame0.astype(np.float64) - given.astype(np.float64)
    mse = float(np.mean(diff**2))
    psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))
    return psnr, float(np.mean(np.abs(diff)) / 255.0)


def clip_statistics(frames: np.ndarray, first_frame: np.ndarray | None = None) -> ClipStatistics:
    """The statistics of one clip ``(f, h, w, 3) uint8`` (f >= 2); ``first_frame``: the ``(h, w, 3)
    uint8`` image the clip was conditioned on, already at the clip's size."""
    if frames.shape[0] < 2:
        raise ValueError(f"a clip needs at least 2 frames for its statistics, got {frames.shape[0]}")
    grey8 = grey_frames(frames)
    grey = grey8.astype(np.float32) / 255.0
    f = len(grey)
    fwd = [optical_flow(grey8[t], grey8[t + 1]) for t in range(f - 1)]  # F_t: t -> t+1
    bwd = [optical_flow(grey8[t + 1], grey8[t]) for t in range(f - 1)]  # B_t: t+1 -> t
    motion = float(np.mean([np.linalg.norm(fl, axis=-1).mean() for fl in fwd]))
    next_on_t = [warp(grey[t + 1], fwd[t]) for t in range(f - 1)]  # W(I_{t+1}, F_t)
    warp_error = float(np.mean([np.abs(grey[t] - next_on_t[t]).mean() for t in range(f - 1)]))
    if f >= 3:
        sq = [
            np.mean((grey[t] - (warp(grey[t - 1], bwd[t - 1]) + next_on_t[t]) / 2) ** 2)
            for t in range(1, f - 1)
        ]
        flicker = float(math.sqrt(float(np.mean(sq))))
    else:
        flicker = 0.0
    stats = ClipStatistics(frames=f, motion=motion, warp_error=warp_error, flicker=flicker)
    if first_frame is not None:
        stats.first_frame_psnr, stats.first_frame_mae = first_frame_fidelity(frames[0], first_frame)
    return stats


def mean_statistics(stats: Sequence[ClipStatistics]) -> dict[str, Any]:
    """The mean of each statistic over clips (first-frame fidelity over the clips that have one),
    with ``clips`` and ``frames`` (total) counts."""
    if not stats:
        raise ValueError("no clips to average")

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return float(np.mean(known)) if known else None

    return {
        "clips": len(stats),
        "frames": sum(s.frames for s in stats),
        "motion": mean([s.motion for s in stats]),
        "warp_error": mean([s.warp_error for s in stats]),
        "flicker": mean([s.flicker for s in stats]),
        "first_frame_psnr": mean([s.first_frame_psnr for s in stats]),
        "first_frame_mae": mean([s.first_frame_mae for s in stats]),
    }


def motion_collapse(
    base_motion: float, motion: float, ratio: float = MOTION_COLLAPSE_RATIO
) -> tuple[bool | None, float | None]:
    """``(collapsed, motion / base_motion)``: collapsed when the ratio is below ``ratio``; ``(None,
    None)`` when the base hardly moves (below :data:`MIN_BASE_MOTION` px/frame) and no drop can be told."""
    if base_motion < MIN_BASE_MOTION:
        return None, None
    r = motion / base_motion
    return r < ratio, r
