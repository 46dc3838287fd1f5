"""What a dataset's videos allow a trainer to ask for: frame counts and frame sizes.

A dataset version records :func:`video_stats` in its manifest, so the control plane can refuse a
fine-tune whose clips the videos cannot give before any Job runs; :func:`frames_problem` and
:func:`size_problem` say why, naming the option to change.
"""

from __future__ import annotations

import os
from typing import Any

from huvidpo.data.clips import clip_span
from huvidpo.data.manifest import PreferenceDataset


def frame_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(height, width)`` in px of a video's first stream, from the container (no decode)."""
    import av

    with av.open(os.fspath(path)) as container:
        ctx = container.streams.video[0].codec_context
        return int(ctx.height), int(ctx.width)


def video_stats(ds: PreferenceDataset) -> dict[str, Any]:
    """``{"videos", "min_frames", "min_height", "min_width"}`` over every video of ``ds`` (loaded
    with ``check_videos=True``, so frame counts are known); the minimums are None without videos."""
    frames = [v.num_frames for v in ds.videos.values() if v.num_frames]
    sizes = [frame_size(v.path) for v in ds.videos.values()]
    return {
        "videos": len(ds.videos),
        "min_frames": min(frames) if frames else None,
        "min_height": min(h for h, _ in sizes) if sizes else None,
        "min_width": min(w for _, w in sizes) if sizes else None,
    }


def frames_problem(min_frames: int | None, num_frames: int, frame_stride: int, where: str = "") -> str | None:
    """Why clips of ``num_frames`` every ``frame_stride`` frames cannot come from videos whose shortest
    has ``min_frames`` frames (``where`` names that video), or None when they can."""
    span = clip_span(num_frames, frame_stride)
    if min_frames is None or min_frames >= span:
        return None
    return (
        f"num_frames {num_frames} at frame_stride {frame_stride} needs {span} frames per video, but the "
        f"shortest video of the dataset{where} has {min_frames} frames; lower num_frames or frame_stride"
    )


def size_problem(stats: dict[str, Any], height: int, width: int) -> tuple[str, str] | None:
    """(option, why) when ``height x width`` clips would upscale the dataset's smallest frames."""
    for name, value, least, unit in (
        ("height", height, stats.get("min_height"), "px high"),
        ("width", width, stats.get("min_width"), "px wide"),
    ):
        if least is not None and value > least:
            return name, (
                f"{name} {value} is larger than the dataset's smallest video ({least} {unit}): its clips "
                f"would be upscaled; use {name} <= {least}"
            )
    return None


__all__ = ["frame_size", "frames_problem", "size_problem", "video_stats"]
