"""The core demo: write a tiny random model, draw a first frame, generate a video from it.

``python -m huvidpo.demo --out out/demo`` (``make demo``). Needs no network, no GPU, no cluster.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from huvidpo.cli import quiet_libraries


def first_frame(size: int = 96) -> np.ndarray:
    """A synthetic first frame: a gradient sky with a white square (``(size, size*3/2, 3)`` uint8)."""
    h, w = size, size * 3 // 2
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 160)], axis=-1).astype(np.uint8)
    img[h // 3 : h // 3 + h // 4, w // 4 : w // 4 + h // 4] = 255
    return img


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    quiet_libraries()
    from huvidpo.models.tiny import write_tiny_model
    from huvidpo.pipeline import GenerationConfig, HuViDPOPipeline

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = write_tiny_model(args.out / "tiny-model")
    print(f"[1/3] tiny model written to {model_dir}")
    frame = first_frame()
    from PIL import Image

    Image.fromarray(frame).save(args.out / "first_frame.png")
    pipe = HuViDPOPipeline.from_pretrained(model_dir)
    cfg = GenerationConfig(
        num_frames=args.frames, height=64, width=96, steps=args.steps, guidance_scale=7.5, seed=1
    )
    result = pipe(
        "a white square drifts across the sky",
        frame,
        cfg,
        progress=lambda s, t: print(f"[2/3] denoising step {s}/{t}", end="\r"),
    )
    print()
    mp4 = result.save(args.out / "video.mp4", fps=8)
    gif = result.save(args.out / "video.gif", fps=8)
    print(f"[3/3] wrote {mp4} and {gif} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
