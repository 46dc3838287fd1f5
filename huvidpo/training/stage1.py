"""Stage 1: fine-tune the temporal layers (and the SparseCausal query) on clips of one motion.

Only parameters whose names contain one of ``trainable_patterns`` train; the rest of the UNet, the
VAE and the text encoder stay frozen (the reference code handed every parameter to the optimizer).
Frame 0 of each noised clip is replaced by its clean latent and the loss covers frames 1..F-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file

from huvidpo.losses import masked_diffusion_error
from huvidpo.models import directory_digest, load_components
from huvidpo.models.layers import SparseCausalMode
from huvidpo.precision import compile_unet
from huvidpo.training.callbacks import TrainingCallback
from huvidpo.training.checkpoint import STATE_DIR, CheckpointError, state_file
from huvidpo.training.common import (
    VIDEO_SUFFIXES,
    ClipSource,
    ShouldStop,
    TrainResult,
    check_clip_frames,
    clip_views,
    enable_checkpointing,
    make_clip_source,
    noisy_latents,
    sample_timesteps,
    use_checkpointing,
    weight_dtype,
)
from huvidpo.training.config import ConfigError, Stage1Config
from huvidpo.training.loop import train

TRAINABLE_FILE = "trainable.safetensors"


def stage1_step(
    model: torch.nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    text: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    autocast: Any = nullcontext,
    skip_first_frame: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """eps-prediction loss of clips ``latents (b, 4, f, h, w)`` with a clean frame 0.

    ``L = mean_b mean_{c, f=1..F-1, h, w} (eps_theta(x_t, t, text) - eps)^2``. Returns the scalar loss
    and the per-clip errors ``(b,)``."""
    zt = noisy_latents(scheduler, latents, noise, t)
    with autocast():
        pred = model(zt, t, text)
    err = masked_diffusion_error(pred, noise, skip_first_frame)
    return err.mean(), err.detach()


def prepare_clips(cfg: Stage1Config) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(video path, prompt) of every training clip, and known frame counts.

    A dataset directory with a manifest gives its videos and their prompts (``prompt`` overrides
    them); a plain folder of videos needs ``prompt`` (one prompt for the motion, as the reference)."""
    from huvidpo.data import load_dataset

    root = Path(cfg.dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {root}")
    if (root / "manifest.jsonl").exists() or (root / "manifest.json").exists():
        ds = load_dataset(root)
        check_clip_frames(ds, cfg)
        items = [(str(v.path), cfg.prompt or v.prompt) for v in ds.videos.values()]
        frames = {str(v.path): int(v.num_frames) for v in ds.videos.values() if v.num_frames}
        return items, frames
    videos = sorted(p for p in root.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise ConfigError(f"{root} has no manifest and no video files ({', '.join(VIDEO_SUFFIXES)})")
    if not cfg.prompt:
        raise ConfigError(
            f"{root} is a plain folder of videos: give the clips' prompt (prompt / --prompt)", field="prompt"
        )
    return [(str(p), cfg.prompt) for p in videos], {}


class Stage1Task:
    """Stage 1 for :func:`huvidpo.training.loop.train`: batches of clips, the eps-prediction loss and
    the UNet parameters matching ``trainable_patterns`` as the trainable set (checkpointed as
    ``state/trainable.safetensors``, saved at the end as a whole VideoUNet directory)."""

    stage = "stage1"

    def __init__(self, cfg: Stage1Config, accelerator: Any) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        device = accelerator.device
        self.items, frame_counts = prepare_clips(cfg)
        # Trained parameters stay fp32 (master weights); autocast runs the maths in bf16/fp16.
        components = load_components(
            cfg.model,
            device=device,
            sparse_causal=cast(SparseCausalMode, cfg.sparse_causal),
            unet_dir=cfg.unet_dir,
        )
        # The trainer passes the publication digest; only library use hashes the model directory.
        self.model_digest = cfg.base_model_digest or directory_digest(cfg.model)
        self.source = make_clip_source(
            components, cfg, device, f"{self.model_digest}:{components.vae.dtype}", frame_counts
        )
        self.noise_sched = components.ddpm()
        self.components = components
        self.unet = unet = components.unet
        names = set(unet.temporal_parameter_names(tuple(cfg.trainable_patterns)))
        if not names:
            raise ConfigError(
                f"trainable_patterns {list(cfg.trainable_patterns)} match no UNet parameter",
                field="trainable_patterns",
            )
        for name, p in unet.named_parameters():
            p.requires_grad_(name in names)
        self.trainable = {n: p for n, p in unet.named_parameters() if n in names}
        self.params = list(self.trainable.values())
        self.checkpointing = use_checkpointing(
            cfg, unet, self.accelerator.device, cfg.batch_size, weight_dtype(cfg)
        )
        if self.checkpointing[0]:
            enable_checkpointing(unet)
        compile_unet(unet, cfg.compile)
        unet.train()
        self.num_items = len(self.items)
        self.data_report: dict[str, Any] = {
            "clips": len(self.items),
            "gradient_checkpointing": self.checkpointing[1],
        }

    def loss(
        self, model: torch.nn.Module, items: list[int], mine: slice, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, source, device = self.cfg, self.source, self.accelerator.device
        clips = [self.items[i] for i in items]
        views = clip_views(gen, [source.max_start(path) for path, _ in clips], cfg.hflip_p)
        latents = [
            source.clip(path, start, flip)
            for (path, _), (start, flip) in zip(clips[mine], views[mine], strict=True)
        ]
        z, text = torch.stack(latents), torch.stack([source.text(prompt) for _, prompt in clips[mine]])
        noise = torch.randn((len(items), *z.shape[1:]), generator=gen)[mine].to(device)
        t = sample_timesteps(cfg, len(items), gen)[mine].to(device)
        loss, _ = stage1_step(
            model, self.noise_sched, z, text, t, noise, self.accelerator.autocast, cfg.loss_skip_first_frame
        )
        return loss, {"loss": float(loss.detach())}

    def sample_sources(self) -> list[tuple[str, str | None]]:
        """Each prompt (sorted) with its first clip in the dataset's order."""
        first: dict[str, str] = {}
        for path, prompt in self.items:
            first.setdefault(prompt, path)
        return [(prompt, first[prompt]) for prompt in sorted(first)]

    def evaluate(self) -> dict[str, float]:
        return {}  # stage 1 has no held-out metric

    def write_weights(self, directory: Path) -> None:
        tensors = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in self.trainable.items()}
        (directory / STATE_DIR).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / STATE_DIR / TRAINABLE_FILE), metadata={"format": "pt"})

    def load_weights(self, checkpoint: Path) -> None:
        state = load_file(str(state_file(checkpoint, TRAINABLE_FILE)))
        if set(state) != set(self.trainable):
            raise CheckpointError(f"{checkpoint}: trained parameter names differ from this run's")
        with torch.no_grad():
            for n, v in state.items():
                self.trainable[n].copy_(v)

    def save_final(self, out: Path, model: torch.nn.Module) -> Path:
        unet_dir = out / "unet"
        self.accelerator.unwrap_model(model).save_pretrained(unet_dir, safe_serialization=True)
        return unet_dir


def run_stage1(
    config: Stage1Config,
    callbacks: Sequence[TrainingCallback] = (),
    should_stop: ShouldStop | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train the stage-1 parameters; writes ``<output_dir>/unet/`` (a VideoUNet directory usable as
    ``unet_dir`` of a DPO run), ``checkpoints/``, ``metrics.jsonl`` and ``metrics.png``.

    ``should_stop`` and ``resume`` behave as in :func:`huvidpo.training.run_dpo`."""
    return train(config, Stage1Task, callbacks, should_stop, resume)


__all__ = ["ClipSource", "prepare_clips", "run_stage1", "stage1_step"]
