"""Stage 1: fine-tune the temporal layers (and the SparseCausal query) on clips of one motion.

Only parameters whose names contain one of ``trainable_patterns`` train; the rest of the UNet, the
VAE and the text encoder stay frozen (the reference code handed every parameter to the optimizer).
Frame 0 of each noised clip is replaced by its clean latent and the loss covers frames 1..F-1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file

from huvidpo.losses import masked_diffusion_error
from huvidpo.models import directory_digest, load_components
from huvidpo.models.layers import SparseCausalMode
from huvidpo.training.callbacks import (
    TrainingCallback,
    peak_memory_bytes,
)
from huvidpo.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    read_checkpoint,
    restore_rng,
)
from huvidpo.training.common import (
    VIDEO_SUFFIXES,
    ClipSource,
    ShouldStop,
    TrainResult,
    any_process,
    build_optimizer,
    build_scheduler,
    check_clip_frames,
    checkpoint_saver,
    clip_views,
    enable_checkpointing,
    items_for_step,
    make_accelerator,
    make_clip_source,
    mean_over_processes,
    noisy_latents,
    rank_slice,
    resume_compatible,
    run_callbacks,
    sample_timesteps,
    seed_everything,
    step_generator,
    steps_per_epoch,
)
from huvidpo.training.config import ConfigError, Stage1Config

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
        raise ConfigError(f"{root} is a plain folder of videos: give the clips' prompt (prompt / --prompt)")
    return [(str(p), cfg.prompt) for p in videos], {}


def run_stage1(
    config: Stage1Config,
    callbacks: Sequence[TrainingCallback] = (),
    should_stop: ShouldStop | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train the stage-1 parameters; writes ``<output_dir>/unet/`` (a VideoUNet directory usable as
    ``unet_dir`` of a DPO run), ``checkpoints/``, ``metrics.jsonl`` and ``metrics.png``.

    ``should_stop`` and ``resume`` behave as in :func:`huvidpo.training.run_dpo`."""
    cfg = config
    cfg.validate()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    resume_from = latest_checkpoint(ckpt_dir) if resume else None
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    seed_everything(cfg.seed)

    items, frame_counts = prepare_clips(cfg)
    # Trained parameters stay fp32 (master weights); autocast runs the maths in bf16/fp16.
    components = load_components(
        cfg.model,
        device=device,
        sparse_causal=cast(SparseCausalMode, cfg.sparse_causal),
        unet_dir=cfg.unet_dir,
    )
    model_digest = directory_digest(cfg.model)
    source = make_clip_source(components, cfg, device, f"{model_digest}:{components.vae.dtype}", frame_counts)
    noise_sched = components.ddpm()
    unet = components.unet
    names = set(unet.temporal_parameter_names(tuple(cfg.trainable_patterns)))
    if not names:
        raise ConfigError(f"trainable_patterns {list(cfg.trainable_patterns)} match no UNet parameter")
    params = []
    for name, p in unet.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    trainable = {n: p for n, p in unet.named_parameters() if n in names}
    if cfg.gradient_checkpointing:
        enable_checkpointing(unet)
    unet.train()

    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = steps_per_epoch(len(items), cfg.batch_size * world)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch
    ckpt_every = cfg.checkpoint_every  # 0: only at the end (and when stopped)
    optimizer = build_optimizer(params, cfg)
    lr_sched = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(unet, optimizer)

    start_step = 0
    if resume_from is not None:
        ck = read_checkpoint(resume_from)
        changed = resume_compatible(ck.trainer_state.get("config", {}), cfg.to_dict())
        if changed:
            raise CheckpointError(
                f"cannot resume from {resume_from}: the config changed in {', '.join(changed)}"
            )
        state = load_file(str(resume_from / TRAINABLE_FILE))
        if set(state) != names:
            raise CheckpointError(f"{resume_from}: trained parameter names differ from this run's")
        with torch.no_grad():
            for n, v in state.items():
                trainable[n].copy_(v)
        optimizer.load_state_dict(ck.optimizer_state)
        lr_sched.load_state_dict(ck.trainer_state["scheduler"])
        restore_rng(ck.rng_tensors, ck.rng_meta)
        start_step = ck.step

    lineage = {"base_model_digest": model_digest, "dataset_digest": directory_digest(cfg.dataset),
               "config": cfg.to_dict(), "stage": "stage1"}  # fmt: skip
    metrics_path = out / "metrics.jsonl"
    cb = run_callbacks(out, cfg, accelerator, start_step if resume_from else None, callbacks)

    def write_weights(d: Path) -> None:
        tensors = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in trainable.items()}
        save_file(tensors, str(d / TRAINABLE_FILE), metadata={"format": "pt"})

    save = checkpoint_saver(
        ckpt_dir, cfg, accelerator, optimizer, lr_sched, per_epoch, lineage, cb, write_weights
    )

    last_ckpt: Path | None = resume_from
    saved_step = start_step if resume_from is not None else None  # known on every process
    last_metrics: dict[str, Any] = {}
    stopped = False
    step = start_step
    mine = rank_slice(rank, cfg.batch_size)
    while step < total_steps:
        if any_process(accelerator, should_stop is not None and should_stop()):
            stopped = True
            if saved_step != step:
                last_ckpt = save(step) or last_ckpt
            break
        t0 = time.perf_counter()
        # The step's draws are made for the whole global batch; this process takes its slice.
        epoch, idx = items_for_step(len(items), step, cfg.batch_size * world, cfg.seed)
        step_items = [items[i] for i in idx]
        gen = step_generator(cfg.seed, step)
        views = clip_views(gen, [source.max_start(path) for path, _ in step_items], cfg.hflip_p)
        latents = [
            source.clip(path, start, flip)
            for (path, _), (start, flip) in zip(step_items[mine], views[mine], strict=True)
        ]
        texts = [source.text(prompt) for _, prompt in step_items[mine]]
        z, text = torch.stack(latents), torch.stack(texts)
        noise = torch.randn((len(idx), *z.shape[1:]), generator=gen)[mine].to(device)
        t = sample_timesteps(cfg, len(idx), gen)[mine].to(device)
        loss, _ = stage1_step(
            model, noise_sched, z, text, t, noise, accelerator.autocast, cfg.loss_skip_first_frame
        )
        accelerator.backward(loss)
        grad_norm = (
            accelerator.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.zeros(())
        )
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - t0
        last_metrics = {
            "step": step,
            "total_steps": total_steps,
            "epoch": epoch,
            **mean_over_processes(accelerator, {"loss": float(loss.detach())}),
            "lr": float(lr_sched.get_last_lr()[0]),
            "grad_norm": float(grad_norm),
            "step_seconds": seconds,
            "samples_per_second": len(idx) / seconds,
            "peak_memory_bytes": peak_memory_bytes(device),
        }
        if step % cfg.log_every == 0 or step == total_steps:
            cb.on_step(last_metrics)
        if (ckpt_every and step % ckpt_every == 0) or step == total_steps:
            last_ckpt = save(step) or last_ckpt
            saved_step = step

    unet_dir: Path | None = None
    if not stopped:
        if accelerator.is_main_process:
            unet_dir = out / "unet"
            accelerator.unwrap_model(model).save_pretrained(unet_dir, safe_serialization=True)
        accelerator.wait_for_everyone()  # every process returns once the UNet is on disk
    cb.on_end({"steps": step, "total_steps": total_steps, "stopped": stopped, "final": last_metrics})
    plot = out / "metrics.png"
    return TrainResult(
        output_dir=out,
        steps=step,
        total_steps=total_steps,
        stopped=stopped,
        weights_dir=unet_dir,
        last_checkpoint=last_ckpt,
        metrics_path=metrics_path,
        plot_path=plot if plot.exists() else None,
        resumed_from=resume_from,
        final_metrics=last_metrics,
        data_report={"clips": len(items)},
        main_process=bool(accelerator.is_main_process),
    )


__all__ = ["ClipSource", "prepare_clips", "run_stage1", "stage1_step"]
