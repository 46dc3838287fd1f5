"""Pieces both trainers share: device and precision setup, seeding, clip latents, the optimizer and
schedule, per-step randomness and the run result."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint

from huvidpo.models import ModelComponents
from huvidpo.training.config import ConfigError, TrainConfig

ShouldStop = Callable[[], bool]

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced. Paths are under the run's ``output_dir``."""

    output_dir: Path
    steps: int
    """Optimizer steps completed in total (including those before a resume)."""
    total_steps: int
    stopped: bool
    """True when ``should_stop`` ended the run early (a checkpoint was written first)."""
    weights_dir: Path | None
    """The final LoRA adapter (DPO) or UNet (stage 1) directory; None when stopped early."""
    last_checkpoint: Path | None
    metrics_path: Path
    plot_path: Path | None
    resumed_from: Path | None = None
    final_metrics: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    data_report: dict[str, Any] = field(default_factory=dict)
    main_process: bool = True
    """False in the other processes of a data-parallel run (they write no files and call no callbacks)."""


def make_accelerator(cfg: TrainConfig) -> Any:
    """An ``accelerate.Accelerator`` for ``cfg`` (data parallel under ``accelerate launch``).

    fp16 needs CUDA (a GradScaler then guards the fp32 master weights); on CPU use bf16 or no."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = _on_cpu(cfg)
    if cfg.mixed_precision == "fp16" and cpu:
        raise ConfigError(
            "mixed_precision fp16 needs a CUDA device; on CPU use bf16 or no", field="mixed_precision"
        )
    if os.environ.get("WORLD_SIZE", "1") == "1":
        # One process: a previous run in this interpreter may have fixed another precision.
        AcceleratorState._reset_state()
    if cfg.device and cfg.device.startswith("cuda:") and os.environ.get("WORLD_SIZE", "1") == "1":
        torch.cuda.set_device(torch.device(cfg.device))  # accelerate uses the current CUDA device
    return Accelerator(mixed_precision=mixed_precision(cfg), cpu=cpu)


def _on_cpu(cfg: TrainConfig) -> bool:
    return cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())


def mixed_precision(cfg: TrainConfig) -> str:
    """``cfg.mixed_precision`` with ``auto`` resolved: bf16 on CUDA, no on the CPU."""
    if cfg.mixed_precision == "auto":
        return "no" if _on_cpu(cfg) else "bf16"
    return cfg.mixed_precision


def weight_dtype(cfg: TrainConfig) -> torch.dtype:
    """dtype for frozen weights: the autocast dtype under mixed precision, else float32."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision(cfg)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): the noise, timesteps, clip starts and
    flips of a step are the same whether or not the run was resumed in between.

    The trainers draw a step's randomness for the whole global batch from it and give each process
    its slice (:func:`rank_slice`), so a run's draws do not depend on how many processes share the
    global batch."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 10_007 + stream * 7_919) % (2**63 - 1))
    return g


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``n`` items in ``epoch`` (deterministic, no state to save)."""
    g = torch.Generator()
    g.manual_seed(seed * 7_777 + epoch)
    return torch.randperm(n, generator=g).tolist()


def items_for_step(n: int, step: int, global_batch: int, seed: int) -> tuple[int, list[int]]:
    """(epoch, item indices) of one optimizer step; an epoch has ``ceil(n / global_batch)`` steps and
    its last batch wraps around to the start of the same epoch's order."""
    per_epoch = steps_per_epoch(n, global_batch)
    epoch, pos = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch)
    return epoch, [order[(pos * global_batch + j) % n] for j in range(global_batch)]


def steps_per_epoch(n: int, global_batch: int) -> int:
    return max(1, math.ceil(n / global_batch))


def rank_slice(rank: int, batch_size: int) -> slice:
    """The positions of process ``rank``'s ``batch_size`` items in a step's global batch."""
    return slice(rank * batch_size, (rank + 1) * batch_size)


def clip_views(gen: torch.Generator, start_limits: Sequence[int], hflip_p: float) -> list[tuple[int, bool]]:
    """(start frame, horizontal flip) of every item of a global batch, drawn in item order from
    ``gen``: a start in ``[0, limit]`` (no draw when the limit is 0), then a flip with probability
    ``hflip_p``. Every process draws the whole batch, so item ``j`` gets the same view whichever
    process trains on it."""
    views = []
    for limit in start_limits:
        start = int(torch.randint(0, limit + 1, (1,), generator=gen)) if limit > 0 else 0
        views.append((start, bool(torch.rand((), generator=gen) < hflip_p)))
    return views


def any_process(accelerator: Any, flag: bool) -> bool:
    """True on every process when ``flag`` is True on any of them (a collective: all must call it).

    A stop request seen by one process only would otherwise leave the others waiting forever in the
    next gradient all-reduce or checkpoint barrier."""
    return any_processes(accelerator, [flag])[0]


def any_processes(accelerator: Any, flags: Sequence[bool]) -> list[bool]:
    """:func:`any_process` of several flags in one collective (one all-reduce per step for all of
    them). A flag only the main process sets is its decision broadcast to all."""
    if accelerator.num_processes == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(t, reduction="sum").tolist()]


def mean_over_processes(accelerator: Any, values: dict[str, float]) -> dict[str, float]:
    """``values`` averaged over the processes (a collective): per-process batch means become
    global-batch means, since every process trains on the same number of items."""
    if accelerator.num_processes == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def non_reentrant_checkpoint(module: Callable[..., Any], *args: Any) -> Any:
    """Activation checkpointing that builds a graph even when no block input requires grad (the
    reentrant variant does not, which is why the reference code's down-block LoRA never trained)."""
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)


def enable_checkpointing(unet: Any) -> None:
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=non_reentrant_checkpoint)


# Activation bytes per latent position (frame x h x w of one clip) and per channel of the UNet's first
# block, kept for the backward pass of an SD-1.x-layout video UNet without checkpointing, by element
# size. From ``bench/realsize.py --estimate`` (fake tensors): one DPO step on a pair of 16-frame
# 320x512 clips (2 x 16 x 40 x 64 positions with gradients, width 320) peaks 30.9 GiB above the weights
# in bf16 and 45.4 GiB in fp32.
_REALSIZE_POSITIONS = 2 * 16 * 40 * 64 * 320
ACTIVATION_BYTES = {2: 30.9 * 2**30 / _REALSIZE_POSITIONS, 4: 45.4 * 2**30 / _REALSIZE_POSITIONS}


def device_memory_bytes(device: torch.device) -> int:
    """The device's memory: a GPU's total, or the host's physical memory for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def estimate_step_bytes(
    unet: Any, cfg: TrainConfig, clips_with_grad: int, compute_dtype: torch.dtype, extra_weights: int = 0
) -> int:
    """Estimated peak memory of one training step without checkpointing: the weights (``extra_weights``
    for a frozen reference copy), the trained parameters' fp32 gradients and Adam moments, and the
    activations of ``clips_with_grad`` clips scaled from the real-size estimate by latent positions and
    the UNet's width."""
    weights = sum(p.numel() * p.element_size() for p in unet.parameters()) + extra_weights
    trained = sum(p.numel() for p in unet.parameters() if p.requires_grad) * 4 * 3
    width = int(unet.unet.config.block_out_channels[0])
    positions = clips_with_grad * cfg.num_frames * (cfg.height // 8) * (cfg.width // 8) * width
    per = ACTIVATION_BYTES[4 if torch.finfo(compute_dtype).bits > 16 else 2]
    return int(weights + trained + positions * per)


def use_checkpointing(
    cfg: TrainConfig,
    unet: Any,
    device: torch.device,
    clips_with_grad: int,
    compute_dtype: torch.dtype,
    extra_weights: int = 0,
) -> tuple[bool, str]:
    """Whether to checkpoint activations, and why: ``cfg.gradient_checkpointing`` when it is a bool;
    for ``auto``, on only when :func:`estimate_step_bytes` exceeds 90% of the device's memory."""
    if isinstance(cfg.gradient_checkpointing, bool):
        return cfg.gradient_checkpointing, "set in the config"
    need = estimate_step_bytes(unet, cfg, clips_with_grad, compute_dtype, extra_weights)
    have = device_memory_bytes(device)
    on = need > 0.9 * have
    verdict = "over" if on else "within"
    return on, f"auto: estimated step peak {need / 2**30:.1f} GiB is {verdict} 90% of {have / 2**30:.1f} GiB"


def build_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.weight_decay,
        eps=cfg.adam_eps,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total_steps
    )


def check_clip_frames(ds: Any, cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` when the shortest video of ``ds`` (a loaded ``PreferenceDataset``)
    is too short for a clip of ``num_frames`` at ``frame_stride``: a config the data cannot serve,
    caught before any model is loaded (the message names the video by its manifest path)."""
    from huvidpo.data.stats import frames_problem

    known = [v for v in ds.videos.values() if v.num_frames]
    if not known:
        return
    shortest = min(known, key=lambda v: (v.num_frames, v.id))
    problem = frames_problem(shortest.num_frames, cfg.num_frames, cfg.frame_stride, f" ({shortest.file})")
    if problem:
        raise ConfigError(problem, field="num_frames")


def count_frames(path: str | os.PathLike[str]) -> int:
    """Number of frames of a video file (container metadata, or a decode when it has none, stopped
    past ``DEFAULT_VIDEO_LIMITS.max_frames``: ``VideoTooLarge``, as loading its clips would raise)."""
    import itertools

    import av

    from huvidpo.video_io import DEFAULT_VIDEO_LIMITS, VideoTooLarge

    limit = DEFAULT_VIDEO_LIMITS.max_frames
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        n = int(stream.frames) or sum(1 for _ in itertools.islice(container.decode(stream), limit + 1))
    if n > limit:
        raise VideoTooLarge(
            f"{path}: {n if stream.frames else 'more than ' + str(limit)} frames are more than max_frames = {limit}"
        )
    return n


class ClipSource:
    """Latents ``(4, f, h, w)`` of dataset clips and text embeddings ``(seq, dim)`` of prompts.

    With ``cache`` (a ``huvidpo.data.LatentCache``) every clip variant (start, flip) is VAE-encoded and
    every prompt text-encoded once, on disk and in memory, so later epochs run neither encoder.
    Without it every call encodes again (the reference behaviour). Encoders run under
    ``fork_rng`` so whether a cache hit happens never changes the training RNG stream.
    """

    def __init__(
        self,
        components: ModelComponents,
        cfg: TrainConfig,
        device: torch.device,
        cache: Any | None,
        frame_counts: dict[str, int] | None = None,
    ) -> None:
        self.components = components
        self.cfg = cfg
        self.device = device
        self.cache = cache
        self._frames: dict[str, int] = dict(frame_counts or {})
        self._texts: dict[str, torch.Tensor] = {}

    @contextmanager
    def _no_rng_side_effects(self) -> Iterator[None]:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield

    def max_start(self, path: str) -> int:
        """Largest first-frame index of a clip of ``num_frames`` at ``frame_stride`` in this video."""
        if not self.cfg.random_start:
            return 0
        if path not in self._frames:
            self._frames[path] = count_frames(path)
        span = (self.cfg.num_frames - 1) * self.cfg.frame_stride + 1
        return max(0, self._frames[path] - span)

    def clip(self, path: str, start: int, hflip: bool) -> torch.Tensor:
        """Latents ``(4, f, h, w)`` float32 on the training device, a fresh tensor (the cache keeps its
        own host copy, bounded, pinned on CUDA; nothing is held on the device between steps)."""
        c = self.cfg
        with self._no_rng_side_effects():
            if self.cache is not None:
                z = self.cache.clip_latents(
                    path, c.num_frames, c.height, c.width, stride=c.frame_stride, start=start, hflip=hflip
                )
                # pinned host memory: the copy overlaps the step's kernels instead of blocking them
                return z.to(self.device, torch.float32, non_blocking=self.device.type == "cuda", copy=True)
            z = self._encode_clip(path, start, hflip)
        return z.to(self.device, torch.float32)

    def _encode_clip(self, path: str, start: int, hflip: bool) -> torch.Tensor:
        from huvidpo.data import load_clip

        c = self.cfg
        pixels = load_clip(
            path, c.num_frames, c.height, c.width, stride=c.frame_stride, start=start, hflip=hflip
        )
        vae = self.components.vae
        frames = pixels.permute(1, 0, 2, 3).to(self.device, vae.dtype)  # (f, 3, H, W)
        latents = vae.encode(frames).latent_dist.mean * self.components.latent_scale
        return latents.permute(1, 0, 2, 3)  # (4, f, h, w)

    def text(self, prompt: str) -> torch.Tensor:
        if prompt in self._texts:
            return self._texts[prompt]
        with self._no_rng_side_effects():
            if self.cache is not None:
                e = self.cache.text_embedding(prompt)
            else:
                tok = self.components.tokenizer
                ids = tok(
                    [prompt],
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(self.device)
                e = self.components.text_encoder(ids)[0][0]
        e = e.to(self.device, torch.float32)
        if self.cache is not None:
            self._texts[prompt] = e
        return e


_CACHE_DTYPES = {"auto": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16}


def make_clip_source(
    components: ModelComponents,
    cfg: TrainConfig,
    device: torch.device,
    model_digest: str,
    frame_counts: dict[str, int] | None = None,
) -> ClipSource:
    cache = None
    if cfg.cache_latents:
        from huvidpo.data import LatentCache

        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "cache"
        cuda = device.type == "cuda"
        cache = LatentCache(
            cache_dir,
            components,
            model_digest,
            memory_bytes=int(cfg.cache_memory_mb * 2**20),
            # bf16 on a GPU (half the host memory, and what autocast computes in anyway); the CPU keeps
            # float32 so its runs are exactly what they were
            memory_dtype=torch.bfloat16
            if cuda and cfg.cache_dtype == "auto"
            else _CACHE_DTYPES[cfg.cache_dtype],
            pin=cuda,
        )
    return ClipSource(components, cfg, device, cache, frame_counts)


def noisy_latents(scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward-noise clips ``(b, 4, f, h, w)`` at timesteps ``t (b,)`` and put back the clean frame 0
    (the first-frame condition of the video UNet)."""
    zt = scheduler.add_noise(clean, noise, t)
    zt[:, :, 0] = clean[:, :, 0]
    return zt


def sample_timesteps(cfg: TrainConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(cfg.timestep_min, cfg.timestep_max, (n,), generator=generator)


def resume_compatible(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Config keys whose change makes a resumed run a different run."""
    free = {
        "max_steps", "epochs", "checkpoint_every", "checkpoint_minutes", "keep_last", "eval_every", "log_every", "plot",
        "device", "output_dir", "cache_dir", "model", "dataset", "unet_dir", "cache_latents",
        "dataset_digest", "base_model_digest",  # identities the caller records; not checked before either
        "sample_count", "sample_prompts", "sample_first_frames", "sample_num_frames", "sample_height",
        "sample_width", "sample_steps", "sample_guidance_scale", "sample_seed",  # what is shown, not trained
    }  # fmt: skip
    return sorted(k for k in set(saved) | set(current) if k not in free and saved.get(k) != current.get(k))


def run_callbacks(
    out: Path,
    cfg: Any,
    accelerator: Any,
    resumed_at: int | None,
    callbacks: Sequence[Any],
) -> Any:
    """The callbacks of a run: the JSONL metrics file, the PNG plot and the caller's, on the main
    process only (other processes get none: the logged metrics are already averaged over all
    processes, and one writer per file). Also writes ``out/config.json``. ``resumed_at`` trims a
    resumed run's metrics file."""
    from huvidpo.training.callbacks import CallbackList, JsonlMetrics, PlotMetrics

    if not accelerator.is_main_process:
        return CallbackList([])
    cfg.save(out / "config.json")
    own: list[Any] = [JsonlMetrics(out / "metrics.jsonl", resume_step=resumed_at)]
    if cfg.plot:
        own.append(PlotMetrics(out / "metrics.jsonl", out / "metrics.png"))
    return CallbackList([*own, *callbacks])


def checkpoint_saver(
    ckpt_dir: Path,
    cfg: Any,
    accelerator: Any,
    optimizer: Any,
    lr_sched: Any,
    per_epoch: int,
    lineage: dict[str, Any],
    callbacks: Any,
    write_weights: Callable[[Path], None],
    write_samples: Callable[[Path], Any] | None = None,
) -> Callable[..., Path | None]:
    """``save(step, samples=True)``: an atomic checkpoint (weights by ``write_weights(dir)``, optimizer,
    LR schedule, RNG) on the main process, the oldest pruned beyond ``cfg.keep_last``; every process
    waits for it. ``write_samples(dir)`` (the sample videos) runs after the weights, on the main process
    only, unless ``samples`` is False (a checkpoint written because the run must stop)."""
    from huvidpo.training.checkpoint import prune_checkpoints, write_checkpoint

    def save(step: int, samples: bool = True) -> Path | None:
        path = None
        if accelerator.is_main_process:

            def write(directory: Path) -> None:
                write_weights(directory)
                if samples and write_samples is not None:
                    write_samples(directory)

            state = {
                "step": step,
                "epoch": step // per_epoch,
                "scheduler": lr_sched.state_dict(),
                "config": cfg.to_dict(),
            }
            path = write_checkpoint(ckpt_dir, step, write, optimizer, state, lineage)
            prune_checkpoints(ckpt_dir, cfg.keep_last)
            callbacks.on_checkpoint(path, step)
        accelerator.wait_for_everyone()
        return path

    return save
