"""Where the time goes: one real-size UNet forward (CFG batch 2) and one DPO step, under torch.profiler.

Companion to ``bench/realsize.py`` (same models, random weights, nothing downloaded). It prints, for each
part, the wall time, the time the device spent in kernels (their sum: a gap to the wall time is host or
launch overhead), the kernel time by category (matmul, attention, convolution, normalisation,
elementwise, copies/casts, other) and the top kernels by total time. Issue 20 wants the DPO step's
MFU at 35 %: this says which kernels to fix first.

    python bench/profile_cuda.py [--precision bf16] [--checkpointing] [--json OUT.json]
    python bench/profile_cuda.py --device cpu --frames 2 --height 64 --width 64   # the script itself
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.realsize import DTYPES, Shape, add_lora, build_models, dpo_step_fn, set_checkpointing

CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    ("convolution", re.compile(r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd|cudnn", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|matmul|addmm|\bmm\b|bmm|linear|nvjet", re.I)),
    ("normalisation", re.compile(r"norm|welford|rsqrt|moments", re.I)),
    ("copies/casts", re.compile(r"copy|cast|transpose|permute|contiguous|cat|index", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|reduce|silu|gelu|mul|add|fill", re.I)),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def profile_part(fn: Any, dev: torch.device, top: int) -> dict[str, Any]:
    """Warm up once, then profile one call: wall time, kernel time by category, top kernels."""
    fn()
    _sync(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        wall = time.perf_counter() - t0
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # name -> [us, count]
    for evt in prof.events():
        if dev.type == "cuda":
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.device_time
        else:  # the aten ops' self times stand in for kernels (self times do not count a child twice)
            if not evt.name.startswith("aten::"):
                continue
            us = evt.self_cpu_time_total
        kernels[evt.name][0] += us
        kernels[evt.name][1] += 1
    total_us = sum(v[0] for v in kernels.values())
    by_cat: dict[str, float] = defaultdict(float)
    for name, (us, _) in kernels.items():
        by_cat[category(name)] += us
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "wall_seconds": wall,
        "kernel_seconds": total_us / 1e6,
        "by_category_seconds": {k: v / 1e6 for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:160], "seconds": us / 1e6, "calls": int(c)} for n, (us, c) in ranked],
    }


def print_part(title: str, r: dict[str, Any]) -> None:
    wall, busy = r["wall_seconds"], r["kernel_seconds"]
    print(f"\n== {title}: wall {wall * 1e3:.1f} ms, kernels {busy * 1e3:.1f} ms ({busy / wall:.0%} busy)")
    for cat, s in r["by_category_seconds"].items():
        print(f"   {cat:<14} {s * 1e3:8.1f} ms  {s / busy:6.1%}")
    print("   top kernels:")
    for k in r["top_kernels"]:
        print(f"   {k['seconds'] * 1e3:8.2f} ms  x{k['calls']:<5} {k['name'][:110]}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--checkpointing", action="store_true", help="profile the DPO step with checkpointing")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--height", type=int, default=320)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--top", type=int, default=25, help="kernels listed per part")
    ap.add_argument("--parts", default="forward,dpo", help="comma-separated: forward, dpo")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    shape = Shape(frames=args.frames, height=args.height, width=args.width, lora_rank=args.lora_rank)
    dtype = DTYPES[args.precision]
    unet, _, _ = build_models(dev)
    unet.to(dtype)
    out: dict[str, Any] = {"conditions": f"{shape.describe()}; {args.precision}; {dev}", "parts": {}}
    print(out["conditions"])
    parts = args.parts.split(",")
    if "forward" in parts:
        x = torch.randn(2, *shape.latent, device=dev, dtype=dtype)
        t = torch.full((2,), 500, device=dev)
        text = torch.randn(2, 77, unet.cross_attention_dim, device=dev, dtype=dtype)

        def forward() -> None:
            with torch.no_grad():
                unet(x, t, text)

        out["parts"]["unet_forward"] = profile_part(forward, dev, args.top)
        print_part("UNet forward, CFG batch 2", out["parts"]["unet_forward"])
    if "dpo" in parts:
        params = add_lora(unet, shape.lora_rank)
        unet.train()
        set_checkpointing(unet, args.checkpointing)
        step = dpo_step_fn(unet, params, args.precision, shape, dev, fake=False)
        out["parts"]["dpo_step"] = profile_part(step, dev, args.top)
        print_part(
            f"DPO step, checkpointing {'on' if args.checkpointing else 'off'}", out["parts"]["dpo_step"]
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
