"""The same frames give byte-identical MP4 files in separate processes (issue 14, item 16).

The encoder's output used to depend on the process: PyAV converted RGB to YUV with swscale threads and
libx264 ran its own threads, so the bytes (and the decoded pixels, by up to 18 levels) changed with the
load of the process around it. Each test below runs real, separate Python processes.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from huvidpo.video_io import encode_mp4, read_video

# Runs `huvidpo generate` in this process and encodes the generated frames three more times, printing
# the sha256 of every encode. The heap that the sampling pipeline leaves behind is what x264's AVX-512
# kernels used to read uninitialised: then each encode of the same frames gave other bytes.
_GENERATE_AND_ENCODE = textwrap.dedent(
    """
    import hashlib, sys
    import huvidpo.video_io as vio
    encode = vio.encode_mp4
    def encode_and_report(frames, *args, **kwargs):
        for _ in range(3):
            print(hashlib.sha256(encode(frames, *args, **kwargs)).hexdigest())
        return encode(frames, *args, **kwargs)
    vio.encode_mp4 = encode_and_report
    from huvidpo.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _frames(seed: int = 0, f: int = 8, h: int = 64, w: int = 96) -> np.ndarray:
    """Smooth colour gradients that move a few pixels per frame, plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices((h, w))
    t = np.arange(f)[:, None, None]
    rgb = np.stack([(xx + 3 * t) * 2, (yy + 2 * t) * 3, (xx + yy + 5 * t)], -1) % 256
    noise = rng.integers(-6, 7, (f, h, w, 3))
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def _generate(model: Path, first: Path, out: Path) -> list[str]:
    args = ["generate", "--model", str(model), "--prompt", "a horse runs", "--first-frame", str(first)]
    args += ["--frames", "8", "--height", "64", "--width", "96", "--steps", "3", "--seed", "7", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-c", _GENERATE_AND_ENCODE, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return [w for w in done.stdout.split() if len(w) == 64]  # the CLI also prints where it wrote


@pytest.fixture
def first_frame(tmp_path: Path) -> Path:
    yy, xx = np.indices((64, 96))
    path = tmp_path / "frame.png"
    Image.fromarray(np.stack([xx * 2, yy * 3, (xx + yy) % 255], -1).astype(np.uint8)).save(path)
    return path


def test_generate_with_a_seed_writes_the_same_mp4_in_two_processes(
    tiny_model_dir: Path, first_frame: Path, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    hashes = _generate(tiny_model_dir, first_frame, a) + _generate(tiny_model_dir, first_frame, b)
    assert len(hashes) == 6
    assert a.read_bytes() == b.read_bytes()
    assert set(hashes) == {hashlib.sha256(a.read_bytes()).hexdigest()}


def test_same_frames_give_the_same_mp4_here_and_in_a_fresh_process(tmp_path: Path) -> None:
    npy = tmp_path / "frames.npy"
    np.save(npy, _frames())
    script = "import sys, hashlib, numpy as np; from huvidpo.video_io import encode_mp4; "
    script += "print(hashlib.sha256(encode_mp4(np.load(sys.argv[1]))).hexdigest())"
    fresh = subprocess.run(
        [sys.executable, "-c", script, str(npy)], capture_output=True, text=True, check=True
    )
    assert fresh.stdout.strip() == hashlib.sha256(encode_mp4(np.load(npy))).hexdigest()


def test_mp4_decodes_close_to_the_frames_given() -> None:
    frames = _frames(seed=3)
    decoded, fps = read_video(encode_mp4(frames, fps=8.0))
    assert decoded.shape == frames.shape and fps == pytest.approx(8.0)
    err = np.abs(decoded.astype(int) - frames.astype(int))
    assert err.mean() < 4.0
    flat = np.zeros((4, 32, 32, 3), np.uint8)
    flat[..., 0], flat[..., 1], flat[..., 2] = 200, 60, 30
    decoded_flat, _ = read_video(encode_mp4(flat))
    assert np.abs(decoded_flat.astype(int) - flat.astype(int)).max() <= 3
