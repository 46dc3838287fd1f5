"""Loading and saving a complete HuViDPO model directory (diffusers layout).

```
model_index.json
unet/            VideoUNet (or an SD-1.x UNet2DConditionModel, inflated on load)
vae/             AutoencoderKL
text_encoder/    CLIPTextModel
tokenizer/       CLIPTokenizer (tokenizer.json; works offline)
scheduler/       scheduler_config.json (DDPM/DDIM noise schedule)
```
Only safetensors weights are read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from transformers import CLIPTextModel, CLIPTokenizer

from huvidpo.models.layers import SparseCausalMode
from huvidpo.models.video_unet import VideoUNet, ensure_safetensors

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class ModelComponents:
    """The frozen parts and the video UNet of one model, on one device and dtype."""

    unet: VideoUNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def ddim(self) -> DDIMScheduler:
        """A fresh DDIM sampler (steps_offset 1, no sample clipping, as SD 1.x sampling)."""
        cfg = dict(self.scheduler_config)
        cfg.update(clip_sample=False, steps_offset=1, set_alpha_to_one=False)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        return DDIMScheduler.from_config(cfg)

    def ddpm(self) -> DDPMScheduler:
        """The training noise schedule."""
        cfg = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        cfg.update(clip_sample=False)
        return DDPMScheduler.from_config(cfg)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelComponents:
        kwargs: dict = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(**kwargs)
        return self

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(d / "unet", safe_serialization=True)
        self.vae.save_pretrained(d / "vae", safe_serialization=True)
        self.text_encoder.save_pretrained(d / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(d / "tokenizer")
        (d / "scheduler").mkdir(exist_ok=True)
        (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2))
        index = {
            "_class_name": "HuViDPOPipeline",
            "unet": ["huvidpo.models", "VideoUNet"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        }
        (d / "model_index.json").write_text(json.dumps(index, indent=2))


def load_components(
    directory: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    sparse_causal: SparseCausalMode = "first+prev",
    unet_dir: str | os.PathLike[str] | None = None,
    vae_dtype: torch.dtype | None = None,
) -> ModelComponents:
    """Load a model directory (local path). ``unet_dir`` overrides ``<directory>/unet`` (a stage-1 UNet).

    ``dtype`` is the UNet's and the text encoder's; the VAE takes ``vae_dtype``, by default
    ``huvidpo.precision.vae_dtype(dtype)`` (never fp16 unless asked: fp16 decodes black frames)."""
    from huvidpo.precision import enable_tf32
    from huvidpo.precision import vae_dtype as default_vae_dtype

    enable_tf32(device)
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    missing = [c for c in COMPONENTS if not (d / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{d} is not a diffusers model directory: missing {', '.join(missing)}/")
    for sub in ("vae", "text_encoder"):
        ensure_safetensors(d / sub)
    unet = VideoUNet.from_pretrained_any(
        unet_dir or d / "unet", sparse_causal=sparse_causal, torch_dtype=dtype
    )
    vae = AutoencoderKL.from_pretrained(
        d / "vae", use_safetensors=True, torch_dtype=vae_dtype or default_vae_dtype(dtype)
    )
    text_encoder = CLIPTextModel.from_pretrained(d / "text_encoder", use_safetensors=True, torch_dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(d / "tokenizer")
    if len(tokenizer) < 10:
        raise ValueError(
            f"{d / 'tokenizer'} did not load a usable tokenizer (vocabulary of {len(tokenizer)})"
        )
    sched_file = d / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(sched_file.read_text())
    for m in (vae, text_encoder):
        m.requires_grad_(False).eval()
        for p in m.parameters():
            p.data = p.data.clone()
    unet.eval()
    comps = ModelComponents(unet, vae, text_encoder, tokenizer, scheduler_config)
    return comps.to(device)


def directory_digest(directory: str | os.PathLike[str]) -> str:
    """The identity of a directory: sha256 (hex) over the sorted ``path \\0 sha256 \\0 size`` lines
    of its files (relative POSIX paths, each file's own sha256 and size in bytes).

    The same digest the services compute over a published manifest's file listing
    (``services.common.records.lineage.content_digest``), so a base model, dataset or checkpoint
    has one identity on disk and in the store; used in lineage records and cache keys."""
    d = Path(directory)
    h = hashlib.sha256()
    for p in sorted((q for q in d.rglob("*") if q.is_file()), key=lambda q: q.relative_to(d).as_posix()):
        fh_digest = hashlib.sha256()
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                fh_digest.update(chunk)
        h.update(f"{p.relative_to(d).as_posix()}\0{fh_digest.hexdigest()}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()
