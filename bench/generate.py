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
    if args.json:
        print(json.dumps(result))
    else:
        print(f"one tiny-model generation ({result['conditions']}): {b:.3f} s")
        print(f"unbatched CFG {u:.3f} s / batched CFG {b:.3f} s = {u / b:.2f}x")
    return result


if __name__ == "__main__":
    main()
