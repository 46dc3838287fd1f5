"""The synthetic preference dataset's ``speed`` knob reaches the clips it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from huvidpo.data import make_synthetic_dataset, moving_square
from huvidpo.video_io import read_video


def _distance(path: Path, reference: np.ndarray) -> float:
    frames, _ = read_video(path)
    return float(np.abs(frames.astype(np.float64) - reference.astype(np.float64)).mean())


def test_speed_sets_how_far_the_squares_move(tmp_path: Path) -> None:
    default = make_synthetic_dataset(tmp_path / "default", n_prompts=1, videos_per_prompt=2, num_frames=4)
    slow = make_synthetic_dataset(
        tmp_path / "slow", n_prompts=1, videos_per_prompt=2, num_frames=4, speed=1.0
    )
    # p0_v0 is the first smooth clip (clip seed 0, sliding right); H.264 is lossy, hence distances.
    at_default = moving_square(4, 64, smooth=True, seed=0)  # size / 16 = 4 px per frame
    at_one = moving_square(4, 64, smooth=True, seed=0, speed=1.0)
    assert _distance(default / "videos/p0_v0.mp4", at_default) < _distance(
        default / "videos/p0_v0.mp4", at_one
    )
    assert _distance(slow / "videos/p0_v0.mp4", at_one) < _distance(slow / "videos/p0_v0.mp4", at_default)
