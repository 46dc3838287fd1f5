"""Time the per-epoch data work of DPO training with and without the latent/text cache.

Without the cache (the reference code) every pair costs two clip decodes, two VAE encodes and a text
encode on every epoch. With :class:`huvidpo.data.LatentCache` the first epoch does that work once per
clip and prompt and later epochs read tensors. Both variants run in this process on the same tiny model
and synthetic dataset; the printed ratio is uncached epoch time / cached (second) epoch time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller dataset, fewer repeats")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from huvidpo.cli import quiet_libraries

    quiet_libraries()
    from huvidpo.data import LatentCache, compile_pairs, load_clip, load_dataset, make_synthetic_dataset
    from huvidpo.models import directory_digest, load_components
    from huvidpo.models.tiny import write_tiny_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    repeats = 1 if args.quick else 3
    per_prompt = 4 if args.quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "model")
        comps = load_components(model_dir)
        digest = directory_digest(model_dir)
        ds = load_dataset(
            make_synthetic_dataset(
                Path(tmp) / "ds",
                n_prompts=2,
                videos_per_prompt=per_prompt,
                num_frames=args.frames,
                size=args.size,
            )
        )
        pairs = compile_pairs(ds, motion_check=False).pairs
        f, s = args.frames, args.size

        @torch.no_grad()
        def uncached_epoch() -> None:
            tok = comps.tokenizer
            for p in pairs:
                for vid in (p.chosen_id, p.rejected_id):
                    clip = load_clip(ds.videos[vid].path, f, s, s, start=0)
                    comps.vae.encode(clip.permute(1, 0, 2, 3)).latent_dist.mean  # noqa: B018
                ids = tok(
                    [p.prompt], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
                )
                comps.text_encoder(ids.input_ids)

        def cached_epoch(cache: LatentCache) -> None:
            for p in pairs:
                cache.clip_latents(ds.videos[p.chosen_id].path, f, s, s)
                cache.clip_latents(ds.videos[p.rejected_id].path, f, s, s)
                cache.text_embedding(p.prompt)

        uncached = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            uncached_epoch()
            uncached.append(time.perf_counter() - t0)
        cache = LatentCache(Path(tmp) / "cache", comps, digest)
        t0 = time.perf_counter()
        cached_epoch(cache)
        first = time.perf_counter() - t0
        later = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            cached_epoch(cache)
            later.append(time.perf_counter() - t0)
    result = {
        "pairs_per_epoch": len(pairs),
        "frames": f,
        "size": s,
        "uncached_epoch_s": statistics.median(uncached),
        "cached_first_epoch_s": first,
        "cached_later_epoch_s": statistics.median(later),
        "ratio_uncached_over_cached_later": statistics.median(uncached) / statistics.median(later),
        "vae_calls": cache.vae_calls,
        "text_calls": cache.text_calls,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}",
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{len(pairs)} pairs/epoch, {f} frames {s}x{s}, tiny model, {result['machine']}\n"
            f"uncached epoch          {result['uncached_epoch_s']:.3f} s (median of {repeats})\n"
            f"cached, first epoch     {first:.3f} s ({cache.vae_calls} VAE, {cache.text_calls} text encodes)\n"
            f"cached, later epochs    {result['cached_later_epoch_s']:.4f} s (median of {repeats})\n"
            f"ratio uncached/cached   {result['ratio_uncached_over_cached_later']:.1f}x"
        )
    return result


if __name__ == "__main__":
    main()
