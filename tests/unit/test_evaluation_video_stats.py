"""Video statistics on synthetic clips whose answer is known (huvidpo.evaluation.video_stats)."""

from __future__ import annotations

import numpy as np
import pytest

from huvidpo.evaluation.video_stats import (
    PSNR_CAP,
    clip_statistics,
    first_frame_fidelity,
    mean_statistics,
    motion_collapse,
)


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random texture (grey, uint8): optical flow is measurable everywhere on it."""
    import cv2

    noise = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), 3)
    blurred = (blurred - blurred.min()) / (blurred.max() - blurred.min())
    return (blurred * 255).astype(np.uint8)


def rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


TEX = texture(64, 96)
STATIC = np.stack([rgb(TEX[:, :64])] * 8)
# The texture slides right by 1 px per frame (a window moving over a wider image, no wrap-around).
TRANSLATING = np.stack([rgb(TEX[:, 16 - t : 80 - t]) for t in range(8)])
# The static texture with its brightness alternating +-40 grey levels every frame.
FLICKERING = np.stack(
    [
        rgb(np.clip(TEX[:, :64].astype(int) + (40 if t % 2 else -40), 0, 255).astype(np.uint8))
        for t in range(8)
    ]
)


def test_a_static_clip_has_no_motion_flicker_or_warp_error() -> None:
    s = clip_statistics(STATIC)
    assert s.frames == 8
    assert s.motion < 0.01
    assert s.warp_error < 1e-3
    assert s.flicker < 1e-3


def test_a_clip_translating_one_pixel_per_frame_has_one_pixel_of_flow() -> None:
    s = clip_statistics(TRANSLATING)
    assert s.motion == pytest.approx(1.0, abs=0.05)
    # the flow explains the change: the warped next frame matches, and a translation does not flicker
    assert s.warp_error < 0.005
    assert s.flicker < 0.01


def test_a_flickering_clip_scores_higher_flicker_than_a_smooth_one() -> None:
    flicker, smooth = clip_statistics(FLICKERING), clip_statistics(TRANSLATING)
    assert flicker.flicker > 10 * max(smooth.flicker, 1e-3)
    # brightness alternating by 80/255 around a straight line: the second difference is about that much
    assert flicker.flicker == pytest.approx(80 / 255, rel=0.2)
    assert flicker.warp_error > 10 * smooth.warp_error


def test_first_frame_fidelity_is_perfect_when_frame_zero_is_the_given_frame() -> None:
    s = clip_statistics(TRANSLATING, first_frame=TRANSLATING[0])
    assert s.first_frame_psnr == PSNR_CAP
    assert s.first_frame_mae == 0.0
    other = clip_statistics(TRANSLATING, first_frame=255 - TRANSLATING[0])
    assert other.first_frame_psnr is not None and other.first_frame_psnr < 20
    assert other.first_frame_mae is not None and other.first_frame_mae > 0.1
    assert clip_statistics(TRANSLATING).first_frame_psnr is None


def test_first_frame_fidelity_of_a_known_difference() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    b = a + 10
    psnr, mae = first_frame_fidelity(a, b)
    assert psnr == pytest.approx(10 * np.log10(255**2 / 100))
    assert mae == pytest.approx(10 / 255)


def test_motion_collapse_is_flagged_when_a_checkpoint_moves_much_less_than_its_base() -> None:
    base = clip_statistics(TRANSLATING).motion
    collapsed, ratio = motion_collapse(base, clip_statistics(STATIC).motion)
    assert collapsed is True and ratio is not None and ratio < 0.1
    assert motion_collapse(base, clip_statistics(TRANSLATING).motion) == (False, pytest.approx(1.0))
    # a base that does not move gives no ratio to judge by
    assert motion_collapse(0.0, 0.0) == (None, None)


def test_mean_statistics_averages_clips_and_skips_missing_first_frames() -> None:
    stats = [clip_statistics(STATIC, STATIC[0]), clip_statistics(TRANSLATING)]
    m = mean_statistics(stats)
    assert m["clips"] == 2 and m["frames"] == 16
    assert m["motion"] == pytest.approx((stats[0].motion + stats[1].motion) / 2)
    assert m["first_frame_psnr"] == PSNR_CAP  # only the clip that has a given first frame


def test_bad_clips_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 frames"):
        clip_statistics(STATIC[:1])
    with pytest.raises(ValueError, match="uint8"):
        clip_statistics(STATIC.astype(np.float32))
