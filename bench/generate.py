"""Time one tiny-model generation and compare batched against unbatched classifier-free guidance.

Both variants run in this process on the same model, prompt, first frame and seed; the printed ratio is
unbatched time / batched time (above 1 means batching the conditional and unconditional inputs into one
UNet call is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from huvidpo.cli import quiet_libraries

    quiet_libraries()
    from huvidpo.models.tiny import tiny_components
    from huvidpo.pipeline import GenerationConfig, HuViDPOPipeline

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pipe = HuViDPOPipeline(tiny_components())
    img = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    repeats = 3 if args.quick else 7

    def run(batched: bool) -> float:
        cfg = GenerationConfig(
            num_frames=args.frames, height=args.size, width=args.size, steps=args.steps, cfg_batched=batched
        )
        t = time.perf_counter()
        pipe("a square moves", img, cfg)
        return time.perf_counter() - t

    run(True), run(False)  # warm-up
    batched, unbatched = [], []
    for _ in range(repeats):  # interleaved so drift hits both variants alike
        batched.append(run(True))
        unbatched.append(run(False))
    b, u = statistics.median(batched), statistics.median(unbatched)
    result = {
        "benchmark": "generate",
        "conditions": f"tiny model, {args.frames} frames {args.size}x{args.size}, {args.steps} DDIM steps, "
        f"CFG 12.5, {torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}, "
        f"median of {repeats}",
        "generation_seconds_batched_cfg": round(b, 4),
        "generation_seconds_unbatched_cfg": round(u, 4),
        "ratio_unbatched_over_batched": round(u / b, 3),
    }
    result.update(_cpu_side(repeats))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"one tiny-model generation ({result['conditions']}): {b:.3f} s")
        print(f"unbatched CFG {u:.3f} s / batched CFG {b:.3f} s = {u / b:.2f}x")
        print(f"CPU-side work per real-size video ({result['cpu_side_conditions']}):")
        for name in ("histogram_match", "latent_adain_per_step"):
            before, after = result[f"{name}_seconds_before"], result[f"{name}_seconds_after"]
            print(f"  {name}: before {before:.4f} s, after {after:.4f} s = {before / after:.1f}x faster")
    return result


def _histogram_match_per_pixel(frame: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The implementation before lookup tables (np.unique over every pixel), timed for the ratio."""
    out = np.empty_like(frame)
    for c in range(3):
        src, ref = frame[..., c].ravel(), reference[..., c].ravel()
        _, s_idx, s_counts = np.unique(src, return_inverse=True, return_counts=True)
        r_vals, r_counts = np.unique(ref, return_counts=True)
        mapped = np.interp(np.cumsum(s_counts) / src.size, np.cumsum(r_counts) / ref.size, r_vals)
        out[..., c] = np.clip(np.rint(mapped[s_idx]), 0, 255).reshape(frame.shape[:2]).astype(np.uint8)
    return out


def _cpu_side(repeats: int) -> dict:
    """Histogram matching and latent AdaIN of one real-size video (16 frames of 320x512; latents
    4x16x40x64), before and after, measured side by side; outputs checked equal."""
    from huvidpo.pipeline import adain, histogram_match_frames

    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (16, 320, 512, 3), dtype=np.uint8)
    latents = torch.randn(1, 4, 16, 40, 64)

    def hist_before() -> np.ndarray:
        v = video.copy()
        for f in range(1, v.shape[0]):
            v[f] = _histogram_match_per_pixel(v[f], v[0])
        return v

    def hist_after() -> np.ndarray:
        v = video.copy()
        histogram_match_frames(v[1:], v[0])
        return v

    def adain_before() -> torch.Tensor:
        x = latents.clone()
        for f in range(2, x.shape[2]):
            x[:, :, f] = adain(x[:, :, f], x[:, :, 1])
        return x

    def adain_after() -> torch.Tensor:
        x = latents.clone()
        x[:, :, 2:] = adain(x[:, :, 2:], x[:, :, 1:2])
        return x

    assert np.array_equal(hist_before(), hist_after()), "histogram matching changed its output"
    torch.testing.assert_close(adain_before(), adain_after(), rtol=0, atol=1e-6)
    out: dict = {"cpu_side_conditions": f"16 frames 320x512, median of {repeats}"}
    for name, before, after in (
        ("histogram_match", hist_before, hist_after),
        ("latent_adain_per_step", adain_before, adain_after),
    ):
        tb, ta = [], []
        for _ in range(repeats):  # interleaved
            t = time.perf_counter()
            before()
            tb.append(time.perf_counter() - t)
            t = time.perf_counter()
            after()
            ta.append(time.perf_counter() - t)
        out[f"{name}_seconds_before"] = round(statistics.median(tb), 4)
        out[f"{name}_seconds_after"] = round(statistics.median(ta), 4)
    return out


if __name__ == "__main__":
    main()
