"""One DPO training step: the reference method's step against ours, on the same config.

reference  (Tankowa/HuViDPO new_train.py): a frozen deep copy of the UNet as reference model, both
           MP4s decoded and VAE-encoded and the prompt text-encoded on every step, four batch-1 UNet
           forwards (policy w, policy l, ref w, ref l), backward through the two policy forwards.
ours       (huvidpo.training.dpo.dpo_step): latents and text embedding from the LatentCache, one
           batched policy forward on [chosen, rejected], one no-grad forward of the same UNet with its
           adapters disabled, no second UNet.
reference+ckpt  the reference as it really trains, with ``gradient_checkpointing: True``: reentrant
           checkpointing of the down and up blocks (spec 4.4). Its down blocks then build no graph, so
           their LoRA never trains (the reference's defect 4) and their backward costs nothing.
ours+ckpt  ours with non-reentrant gradient checkpointing (the trainer's default; every LoRA weight
           gets its gradient).

Three comparisons are printed: ours vs reference (the issue's wording of the reference step), each
with checkpointing (what the two training scripts run by default), and ours+ckpt vs reference.

Step time: median over steps after warm-up, all variants in this one process, interleaved.
Peak memory: peak RSS (``VmHWM`` from /proc; ``ru_maxrss`` elsewhere) of a fresh subprocess per
variant that builds the models and runs the same steps; printed raw and above the RSS measured right
after every import (identical for every variant), with glibc's mmap threshold fixed (see
``measure_memory``). On CUDA the child reports
``torch.cuda.max_memory_allocated`` instead.

Usage: python bench/dpo_step.py [--quick] [--steps N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.utils.checkpoint


def _proc_status_bytes(field: str) -> int | None:
    """``VmHWM`` (peak RSS of this process image) or ``VmRSS`` from /proc, in bytes (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak RSS of this process. VmHWM, because ``ru_maxrss`` of a child started by fork+exec also
    counts the parent's RSS at the fork (Linux keeps the larger value across exec)."""
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

from huvidpo.data import LatentCache, load_clip, make_synthetic_dataset  # noqa: E402
from huvidpo.lora import lora_config, lora_parameters  # noqa: E402
from huvidpo.losses import dpo_loss, masked_diffusion_error  # noqa: E402
from huvidpo.models import VideoUNet  # noqa: E402
from huvidpo.models.tiny import TINY_TEXT_DIM, tiny_components  # noqa: E402
from huvidpo.training.common import enable_checkpointing, noisy_latents  # noqa: E402
from huvidpo.training.dpo import PairBatch, dpo_step  # noqa: E402

# Library code is not step memory: the baseline is taken once every library is imported.
BASELINE_RSS = _proc_status_bytes("VmRSS") or 0

VARIANTS = ("reference", "reference+ckpt", "ours", "ours+ckpt")
# (ours, compared with): ours against the reference as the issue describes it, and each with the
# checkpointing the two training scripts really run with.
COMPARISONS = (("ours", "reference"), ("ours+ckpt", "reference+ckpt"), ("ours+ckpt", "reference"))


def mid_unet_config(quick: bool) -> dict[str, Any]:
    """Bigger than the test model so the UNet, not Python overhead, dominates a step. The proportions
    follow SD 1.x: most parameters sit in the UNet, and the VAE (below) works at pixel resolution."""
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (96, 192) if quick else (128, 256),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": TINY_TEXT_DIM,
        "attention_head_dim": 2 if quick else 4,
        "norm_num_groups": 32,
    }


def sd_like_vae() -> AutoencoderKL:
    """SD's VAE layout (four blocks, 8x downsampling, two layers per block) at a quarter of its widths
    (SD: 128, 256, 512, 512), so encoding clips costs what it costs relative to the UNet in SD 1.x."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.18215,
    )


def reference_checkpointing(unet: torch.nn.Module) -> None:
    """The reference trains with ``gradient_checkpointing: True``: reentrant ``torch.utils.checkpoint``
    around its down and up blocks (spec 4.4), the mid block unwrapped. Reentrant checkpointing of blocks
    whose inputs do not require grad builds no graph, so the down blocks' LoRA gets no gradient (the
    reference's defect 4) and their backward is skipped; the up blocks are recomputed in the backward."""
    func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
    inner: Any = getattr(unet, "unet", unet)  # VideoUNet wraps a diffusers UNet2DConditionModel
    for block in [*inner.down_blocks, *inner.up_blocks]:
        for m in block.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True
                m._gradient_checkpointing_func = func


class Setup:
    """Models, two clips on disk and the latent cache for one variant."""

    def __init__(self, variant: str, quick: bool, device: str, workdir: Path) -> None:
        torch.manual_seed(0)
        self.variant = variant
        self.device = torch.device(device)
        self.frames, self.size = (4, 64) if quick else (8, 64)
        comps = tiny_components(seed=0)
        comps.unet = VideoUNet.from_unet2d(UNet2DConditionModel(**mid_unet_config(quick)))
        comps.vae = sd_like_vae().eval().requires_grad_(False)
        comps.to(self.device)
        self.comps = comps
        self.sched = comps.ddpm()
        data = workdir / "data"
        if not (data / "manifest.jsonl").exists():
            make_synthetic_dataset(
                data, n_prompts=1, videos_per_prompt=2, num_frames=self.frames, size=self.size
            )
        self.path_w, self.path_l = str(data / "videos" / "p0_v0.mp4"), str(data / "videos" / "p0_v1.mp4")
        self.prompt = "a square slides to the right"
        unet = comps.unet
        unet.requires_grad_(False)
        # The reference deep-copies the UNet before adding LoRA; ours never does.
        self.ref_copy = copy.deepcopy(unet).eval() if variant.startswith("reference") else None
        unet.add_adapter(lora_config(rank=16, alpha=32, dropout=0.1), adapter_name="dpo")
        self.params = list(lora_parameters(unet, "dpo").values())
        for p in self.params:
            p.requires_grad_(True)
        if variant == "ours+ckpt":
            enable_checkpointing(unet)
        elif variant == "reference+ckpt":
            reference_checkpointing(unet)
        unet.train()
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, eps=1e-8)
        self.cache = (
            LatentCache(workdir / f"cache-{variant}-{os.getpid()}", comps, "bench")
            if not variant.startswith("reference")
            else None
        )
        self.gen = torch.Generator().manual_seed(0)

    # -- the reference step ----------------------------------------------------------------------
    def _encode(self, path: str) -> torch.Tensor:
        clip = load_clip(path, self.frames, self.size, self.size)  # decode the MP4 again
        vae = self.comps.vae
        with torch.no_grad():
            lat = (
                vae.encode(clip.permute(1, 0, 2, 3).to(self.device)).latent_dist.sample()
                * self.comps.latent_scale
            )
        return lat.permute(1, 0, 2, 3)[None]

    def _text(self) -> torch.Tensor:
        tok = self.comps.tokenizer
        ids = tok([self.prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)  # fmt: skip
        with torch.no_grad():
            return self.comps.text_encoder(ids)[0]

    def reference_step(self) -> float:
        unet, ref = self.comps.unet, self.ref_copy
        assert ref is not None
        z_w, z_l = self._encode(self.path_w), self._encode(self.path_l)
        text_w, text_l = self._text(), self._text()  # the reference encodes the prompt for each clip
        t = torch.randint(0, 1000, (1,), generator=self.gen).to(self.device)
        eps = torch.randn(z_w.shape, generator=self.gen).to(self.device)
        zt_w, zt_l = noisy_latents(self.sched, z_w, eps, t), noisy_latents(self.sched, z_l, eps, t)
        e_w = masked_diffusion_error(unet(zt_w, t, text_w), eps)
        e_l = masked_diffusion_error(unet(zt_l, t, text_l), eps)
        r_w = masked_diffusion_error(ref(zt_w, t, text_w), eps)  # no no_grad block in the reference;
        r_l = masked_diffusion_error(ref(zt_l, t, text_l), eps)  # nothing upstream needs grad
        loss, _ = dpo_loss(e_w, e_l, r_w, r_l, beta=50.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    # -- our step --------------------------------------------------------------------------------
    def ours_step(self) -> float:
        cache = self.cache
        assert cache is not None
        d = self.device
        z_w = cache.clip_latents(self.path_w, self.frames, self.size, self.size).to(d)[None]
        z_l = cache.clip_latents(self.path_l, self.frames, self.size, self.size).to(d)[None]
        text = cache.text_embedding(self.prompt).to(d)[None]
        batch = PairBatch(z_w, z_l, text, torch.ones(1, device=d))
        t = torch.randint(0, 1000, (1,), generator=self.gen).to(d)
        noise = torch.randn(z_w.shape, generator=self.gen).to(d)
        unet = self.comps.unet
        loss, _ = dpo_step(unet, unet, unet, self.sched, batch, t, noise, beta=50.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def step(self) -> Callable[[], float]:
        return self.reference_step if self.variant.startswith("reference") else self.ours_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(quick: bool, device: str, steps: int, warmup: int, workdir: Path) -> dict[str, list[float]]:
    setups = {v: Setup(v, quick, device, workdir) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(warmup + steps):
        for v in VARIANTS:  # interleaved so that machine load hits every variant alike
            s = setups[v]
            _sync(s.device)
            t0 = time.perf_counter()
            s.step()()
            _sync(s.device)
            if i >= warmup:
                times[v].append(time.perf_counter() - t0)
    return times


def child_memory(variant: str, quick: bool, device: str, steps: int, workdir: Path) -> dict[str, float]:
    """Run in a fresh process: build one variant, run ``steps`` steps, report its peaks."""
    s = Setup(variant, quick, device, workdir)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    for _ in range(steps):
        s.step()()
    out = {"peak_rss_bytes": float(peak_rss_bytes()), "baseline_rss_bytes": float(BASELINE_RSS)}
    if s.device.type == "cuda":
        out["cuda_max_allocated_bytes"] = float(torch.cuda.max_memory_allocated(s.device))
    return out


def measure_memory(variant: str, quick: bool, device: str, steps: int, workdir: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", variant, "--steps", str(steps), "--device", device,
           "--workdir", str(workdir)] + (["--quick"] if quick else [])  # fmt: skip
    # glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay in the
    # heap and RSS stops tracking live memory (it then measures fragmentation). A fixed threshold
    # returns every tensor-sized block to the OS when freed, so peak RSS follows peak live tensors,
    # the CPU counterpart of torch.cuda.max_memory_allocated. Same setting for every variant.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller UNet, 4 frames, few steps")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 8)
    if args.child:
        assert args.workdir is not None
        print(json.dumps(child_memory(args.child, args.quick, args.device, steps, args.workdir)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        workdir = Path(tmp)
        times = time_variants(args.quick, args.device, steps, warmup=1 if args.quick else 2, workdir=workdir)
        mem = {
            v: measure_memory(v, args.quick, args.device, 2 if args.quick else 3, workdir) for v in VARIANTS
        }
    cfg = mid_unet_config(args.quick)
    frames = 4 if args.quick else 8
    n_params = sum(p.numel() for p in VideoUNet.from_unet2d(UNet2DConditionModel(**cfg)).parameters())
    print(
        f"DPO step benchmark on {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    print(f"UNet block_out_channels={cfg['block_out_channels']} layers_per_block={cfg['layers_per_block']} "
          f"({n_params / 1e6:.2f} M params), 1 pair per step, {frames} frames 64x64 px (8x8 latents), "
          f"LoRA r16, {steps} timed steps after warm-up")  # fmt: skip
    key = "cuda_max_allocated_bytes" if args.device.startswith("cuda") else "peak_rss_bytes"
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    print(f"{'variant':<15} {'step median s':>14} {'min s':>8} {'peak MB':>9} {'above imports MB':>17}")
    for v in VARIANTS:
        peak = mem[v][key] / 2**20
        above = (mem[v]["peak_rss_bytes"] - mem[v]["baseline_rss_bytes"]) / 2**20
        print(f"{v:<15} {med[v]:>14.3f} {min(times[v]):>8.3f} {peak:>9.1f} {above:>17.1f}")
    for v, r in COMPARISONS:
        speed = med[r] / med[v]
        mem_ratio = mem[v][key] / mem[r][key]
        above_ratio = (mem[v]["peak_rss_bytes"] - mem[v]["baseline_rss_bytes"]) / max(
            1.0, mem[r]["peak_rss_bytes"] - mem[r]["baseline_rss_bytes"]
        )
        print(f"{v}_vs_{r}: {speed:.2f}x faster (target >= 2x); peak memory {mem_ratio:.2f}x, "
              f"{above_ratio:.2f}x above the imports (target <= 0.6x)")  # fmt: skip


if __name__ == "__main__":
    main()
