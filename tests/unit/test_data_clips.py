"""Clip sampling, aspect-preserving resize and crop, flips (joint for a pair), decoding from MP4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from huvidpo.data import ClipError, load_clip, load_pair_clips, moving_square, preprocess_clip, sample_clip
from huvidpo.video_io import write_video


def numbered(frames: int, h: int = 8, w: int = 8) -> np.ndarray:
    """Frame i is filled with the value i."""
    return np.repeat(np.arange(frames, dtype=np.uint8)[:, None, None, None], h * w * 3).reshape(
        frames, h, w, 3
    )


def test_sample_clip_takes_every_stride_th_frame_from_start() -> None:
    clip = sample_clip(numbered(20), num_frames=4, stride=3, start=5)
    assert clip.shape == (4, 8, 8, 3) and clip[:, 0, 0, 0].tolist() == [5, 8, 11, 14]


def test_random_start_stays_in_range_and_is_seeded() -> None:
    frames = numbered(12)
    starts = {int(sample_clip(frames, 4, 2, rng=np.random.default_rng(s))[0, 0, 0, 0]) for s in range(60)}
    assert starts == set(range(12 - 7 + 1))  # span 7: every valid start 0..5 occurs, none beyond
    a = sample_clip(frames, 4, rng=np.random.default_rng(7))
    b = sample_clip(frames, 4, rng=np.random.default_rng(7))
    assert np.array_equal(a, b)


def test_too_short_video_gives_a_clear_error() -> None:
    with pytest.raises(
        ClipError, match=r"video has 5 frames, too short for 4 frames at stride 2 \(needs 7\)"
    ):
        sample_clip(numbered(5), 4, stride=2)
    with pytest.raises(ClipError, match="start 3 is outside"):
        sample_clip(numbered(5), 3, start=3)


def test_preprocess_keeps_aspect_ratio_and_centre_crops() -> None:
    # 32 x 64 frames: red left quarter, green middle half, blue right quarter.
    f = np.zeros((2, 32, 64, 3), dtype=np.uint8)
    f[:, :, :16, 0] = 255
    f[:, :, 16:48, 1] = 255
    f[:, :, 48:, 2] = 255
    out = preprocess_clip(f, 32, 32)
    assert out.shape == (3, 2, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    # A squash to 32x32 would keep red and blue; the crop keeps only the green middle.
    assert torch.allclose(out[1], torch.ones(2, 32, 32)) and out[0].max() < -0.9 and out[2].max() < -0.9
    # Upscaling a small frame to cover a larger target keeps the same picture, cropped.
    big = preprocess_clip(f, 64, 96)
    assert big.shape == (3, 2, 64, 96) and big[1, :, :, 40:56].min() > 0.9 and big[0, :, :, :4].min() > 0.9


def test_hflip_mirrors_the_width_axis() -> None:
    f = moving_square(3, 32, seed=2)
    plain, flipped = preprocess_clip(f, 16, 24), preprocess_clip(f, 16, 24, hflip=True)
    assert not torch.equal(plain, flipped) and torch.equal(flipped, plain.flip(-1))


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("clips")
    return (
        write_video(moving_square(10, 48, seed=1), d / "w.mp4"),
        write_video(moving_square(6, 48, smooth=False, seed=2), d / "l.mp4"),
    )


def test_load_clip_decodes_an_mp4(two_videos: tuple[Path, Path]) -> None:
    clip = load_clip(two_videos[0], num_frames=4, height=32, width=32, stride=2, start=1)
    assert clip.shape == (3, 4, 32, 32) and clip.min() >= -1 and clip.max() <= 1
    with pytest.raises(ClipError, match=r"l.mp4: video has 6 frames"):
        load_clip(two_videos[1], num_frames=8, height=32, width=32)


def test_pair_clips_share_one_flip_decision(two_videos: tuple[Path, Path]) -> None:
    w_path, l_path = two_videos
    plain_w = load_clip(w_path, 4, 32, 32, start=0)
    plain_l = load_clip(l_path, 4, 32, 32, start=0)
    flips = []
    for seed in range(12):
        w, lo, flip = load_pair_clips(
            w_path, l_path, 4, 32, 32, rng=np.random.default_rng(seed), start_w=0, start_l=0
        )
        flips.append(flip)
        assert torch.equal(w, plain_w.flip(-1) if flip else plain_w)
        assert torch.equal(lo, plain_l.flip(-1) if flip else plain_l)
    assert any(flips) and not all(flips)
    never = load_pair_clips(w_path, l_path, 4, 32, 32, hflip_p=0.0, rng=np.random.default_rng(0))
    assert never[2] is False


def test_a_clip_with_a_start_decodes_only_its_span_and_equals_the_full_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached training clip's start is known: decoding stops after its last frame and only its
    frames are converted to RGB; the pixels are those of a whole-video decode."""
    from huvidpo import video_io

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(24, 32, 48, 3), dtype=np.uint8)
    path = video_io.write_video(frames, tmp_path / "v.mp4", fps=8)
    decoded: list[int] = []
    kept: list[int] = []
    real = video_io.decode_frames

    def spy(source, on_frame, *args, **kwargs):  # type: ignore[no-untyped-def]
        def counting(frame: np.ndarray) -> None:
            kept.append(1)
            on_frame(frame)

        n, fps = real(source, counting, *args, **kwargs)
        decoded.append(n)
        return n, fps

    monkeypatch.setattr(video_io, "decode_frames", spy)
    got = load_clip(path, 4, 32, 32, stride=2, start=3)
    assert decoded == [3 + 7] and len(kept) == 4  # frames 0..9 decoded, 3, 5, 7, 9 converted
    whole, _ = video_io.read_video(path)
    assert torch.equal(got, preprocess_clip(sample_clip(whole, 4, 2, 3), 32, 32))
    with pytest.raises(ClipError, match=r"start 20 is outside \[0, 17\] for a 24-frame video"):
        load_clip(path, 4, 32, 32, stride=2, start=20)
    with pytest.raises(ClipError, match=r"video has 24 frames, too short for 13 frames at stride 2"):
        load_clip(path, 13, 32, 32, stride=2, start=0)
