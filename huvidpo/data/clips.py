"""Training clips: decode (PyAV, through :func:`huvidpo.video_io.read_video`), sample frames, resize with
the aspect ratio kept and centre-crop, flip.

Unlike the reference code, which squashed every video to 512x320 whatever its aspect ratio, frames are
scaled to cover the target size and then centre-cropped. A preference pair is flipped jointly: both
clips get the same horizontal flip decision, so the pair differs only in what the raters judged.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from huvidpo.video_io import read_video, resize_center_crop

if TYPE_CHECKING:
    import torch


class ClipError(ValueError):
    """A clip cannot be sampled as asked (too few frames, bad start or stride)."""


def clip_span(num_frames: int, stride: int = 1) -> int:
    """Source frames covered by ``num_frames`` frames taken every ``stride`` frames."""
    return (num_frames - 1) * stride + 1


def sample_clip(
    frames: np.ndarray,
    num_frames: int,
    stride: int = 1,
    start: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Frames ``start, start + stride, ...`` of ``frames (F, H, W, 3)`` uint8: ``(num_frames, H, W, 3)``.

    ``start=None`` draws a start uniformly from the valid ones with ``rng`` (a fresh unseeded generator
    when ``rng`` is None). Raises :class:`ClipError` when the video is too short."""
    if num_frames < 1 or stride < 1:
        raise ClipError(f"num_frames and stride must be >= 1, got {num_frames} and {stride}")
    if frames.ndim != 4:
        raise ClipError(f"frames must be (F, H, W, 3), got shape {frames.shape}")
    total, span = frames.shape[0], clip_span(num_frames, stride)
    if total < span:
        raise ClipError(
            f"video has {total} frames, too short for {num_frames} frames at stride {stride} (needs {span})"
        )
    last = total - span
    if start is None:
        start = int((rng or np.random.default_rng()).integers(0, last + 1))
    elif not 0 <= start <= last:
        raise ClipError(
            f"start {start} is outside [0, {last}] for a {total}-frame video ({span} frames needed)"
        )
    return frames[start : start + span : stride]


def preprocess_clip(frames: np.ndarray, height: int, width: int, hflip: bool = False) -> torch.Tensor:
    """``(f, H, W, 3)`` uint8 -> ``(3, f, height, width)`` float32 in [-1, 1]: each frame resized with
    its aspect ratio kept to cover ``height x width``, centre-cropped, optionally flipped left-right."""
    out = np.stack([resize_center_crop(f, height, width) for f in frames])
    if hflip:
        out = out[:, :, ::-1]
    import torch  # here, not at the top: the control plane imports this package without torch

    t = torch.from_numpy(np.ascontiguousarray(out)).permute(3, 0, 1, 2).float()
    return t / 127.5 - 1.0


def load_clip(
    path: str | os.PathLike[str],
    num_frames: int,
    height: int,
    width: int,
    stride: int = 1,
    start: int | None = None,
    hflip: bool = False,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Decode ``path`` and return one clip ``(3, num_frames, height, width)`` float32 in [-1, 1]
    (see :func:`sample_clip` and :func:`preprocess_clip`).

    With a ``start`` only the clip's span is decoded and only its frames converted to RGB (a cached
    training clip's start is always known); ``start=None`` decodes the whole video to draw one."""
    if start is not None and num_frames >= 1 and stride >= 1 and start >= 0:
        return preprocess_clip(_read_span(path, num_frames, stride, start), height, width, hflip)
    frames, _ = read_video(path)
    try:
        clip = sample_clip(frames, num_frames, stride, start, rng)
    except ClipError as exc:
        raise ClipError(f"{path}: {exc}") from exc
    return preprocess_clip(clip, height, width, hflip)


def _read_span(path: str | os.PathLike[str], num_frames: int, stride: int, start: int) -> np.ndarray:
    """Frames ``start, start + stride, ...`` of the video at ``path``, decoding no further than the span."""
    from huvidpo import video_io

    span = clip_span(num_frames, stride)
    end = start + span
    kept: list[np.ndarray] = []
    total, _ = video_io.decode_frames(
        path, kept.append, wanted=lambda i: start <= i < end and (i - start) % stride == 0, stop_after=end
    )
    if len(kept) < num_frames:
        if total < span:
            raise ClipError(
                f"{path}: video has {total} frames, too short for {num_frames} frames at stride {stride} "
                f"(needs {span})"
            )
        raise ClipError(
            f"{path}: start {start} is outside [0, {total - span}] for a {total}-frame video "
            f"({span} frames needed)"
        )
    return np.stack(kept)


def load_pair_clips(
    path_w: str | os.PathLike[str],
    path_l: str | os.PathLike[str],
    num_frames: int,
    height: int,
    width: int,
    stride: int = 1,
    hflip_p: float = 0.5,
    rng: np.random.Generator | None = None,
    start_w: int | None = None,
    start_l: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The chosen and rejected clips of a pair, each ``(3, num_frames, height, width)`` in [-1, 1], and
    the one horizontal-flip decision (drawn with probability ``hflip_p``) applied to both."""
    gen = rng or np.random.default_rng()
    flip = bool(gen.random() < hflip_p)
    w = load_clip(path_w, num_frames, height, width, stride, start_w, flip, gen)
    lo = load_clip(path_l, num_frames, height, width, stride, start_l, flip, gen)
    return w, lo, flip
