"""First-frame-conditioned video generation (DDIM) with the HuViDPO video UNet.

Frame 0 of the latent clip is the clean VAE latent of the first frame at every step; only frames
1..F-1 are denoised. Classifier-free guidance batches the unconditional and conditional inputs into
one UNet call. The reference method's shared-noise initialisation, latent AdaIN and histogram
matching are on by default and can be switched off.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from huvidpo.models.components import ModelComponents, load_components
from huvidpo.video_io import ImageInput, load_image, resize_center_crop, write_video

ProgressCallback = Callable[[int, int], None]

MAX_FRAMES = 128


class GenerationError(ValueError):
    """A generation request that cannot be run as given (the message says what to fix)."""


@dataclass
class GenerationConfig:
    """Sampling options. Defaults follow the paper's inference settings where they are known."""

    num_frames: int = 16
    height: int = 320
    width: int = 512
    steps: int = 50
    guidance_scale: float = 12.5
    eta: float = 0.0
    negative_prompt: str = ""
    seed: int = 0
    shared_noise_ratio: float = 0.2
    shared_noise_variance_preserving: bool = False
    latent_adain: bool = True
    adain_start_frac: float = 0.62
    hist_match: bool = True
    cfg_batched: bool = True
    first_frame_steps: int | None = None

    def validate(self, vae_scale_factor: int = 8) -> None:
        if self.num_frames < 2 or self.num_frames > MAX_FRAMES:
            raise GenerationError(f"frames must be between 2 and {MAX_FRAMES}, got {self.num_frames}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v <= 0 or v % vae_scale_factor:
                raise GenerationError(f"{name} must be a positive multiple of {vae_scale_factor}, got {v}")
        # DDIM with steps_offset 1 over 1000 training steps has at most 999 distinct timesteps.
        if self.steps < 1 or self.steps > 999:
            raise GenerationError(f"steps must be between 1 and 999, got {self.steps}")
        if not 0.0 <= self.shared_noise_ratio < 1.0:
            raise GenerationError(f"shared_noise_ratio must be in [0, 1), got {self.shared_noise_ratio}")
        if self.guidance_scale < 0 or not math.isfinite(self.guidance_scale):
            raise GenerationError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if self.eta < 0 or self.eta > 1:
            raise GenerationError(f"eta must be in [0, 1], got {self.eta}")


@dataclass
class GenerationResult:
    """``frames``: ``(f, h, w, 3)`` uint8; ``latents``: final ``(1, 4, f, h/8, w/8)`` latents."""

    frames: np.ndarray
    latents: torch.Tensor
    seed: int
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str], fps: float = 8.0) -> Path:
        return write_video(self.frames, path, fps)


def adain(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match per-channel mean and std over (h, w) of ``x (b, c, [f,] h, w)`` to ``ref`` (the same
    shape, or ``f == 1`` to match every frame to one)."""
    mx, sx = x.mean(dim=(-2, -1), keepdim=True), x.std(dim=(-2, -1), keepdim=True)
    mr, sr = ref.mean(dim=(-2, -1), keepdim=True), ref.std(dim=(-2, -1), keepdim=True)
    return (x - mx) / (sx + eps) * sr + mr


def _cdf(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(grey levels present, their cumulative share) of a 256-bin histogram."""
    present = np.flatnonzero(counts)
    return present, np.cumsum(counts[present]) / counts.sum()


def histogram_match_frames(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-RGB-channel CDF matching of every frame of ``frames (f, h, w, 3) uint8`` to ``reference
    (h, w, 3)``, in place, returned. Each frame and channel gets a 256-entry lookup table from the
    two histograms (one pass of counting, one of lookup), the reference's CDF computed once."""
    f = frames.shape[0]
    for c in range(3):
        r_vals, r_cdf = _cdf(np.bincount(reference[..., c].ravel(), minlength=256))
        channel = frames[..., c].reshape(f, -1)
        counts = np.bincount((channel + np.arange(f)[:, None] * 256).ravel(), minlength=256 * f)
        for i, hist in enumerate(counts.reshape(f, 256)):
            s_vals, s_cdf = _cdf(hist)
            lut = np.zeros(256, dtype=np.uint8)
            lut[s_vals] = np.clip(np.rint(np.interp(s_cdf, r_cdf, r_vals)), 0, 255).astype(np.uint8)
            frames[i, ..., c] = lut[frames[i, ..., c]]
    return frames


def histogram_match(frame: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-RGB-channel CDF matching of ``frame (h, w, 3) uint8`` to ``reference`` (a new array)."""
    return histogram_match_frames(frame[None].copy(), reference)[0]


class HuViDPOPipeline:
    """Wires the video UNet, VAE, text encoder and DDIM sampler; owns no weights of its own."""

    def __init__(self, components: ModelComponents) -> None:
        self.components = components

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> HuViDPOPipeline:
        return cls(load_components(directory, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return next(self.components.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.unet.dtype

    # -- encoders ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings ``(n, seq, dim)`` for ``prompts`` (padded to the tokenizer's max length)."""
        tok = self.components.tokenizer
        ids = tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.components.text_encoder(ids)[0].to(self.dtype)

    def prompt_token_count(self, prompt: str) -> int:
        return len(self.components.tokenizer(prompt).input_ids)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """VAE latents (mean of the posterior, scaled) ``(n, 4, h/8, w/8)`` of images ``(n, 3, h, w)`` in [-1, 1]."""
        vae = self.components.vae
        latents = vae.encode(images.to(self.device, vae.dtype)).latent_dist.mean
        return (latents * self.components.latent_scale).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, chunk: int = 1) -> np.ndarray:
        """``(b, 4, f, h, w)`` latents -> ``(b, f, H, W, 3)`` uint8 frames.

        Frames are decoded one at a time by default: convolution kernels pick different paths for
        different batch sizes, and per-frame decoding keeps a frame's pixels independent of the clip
        length (frame 0 is then exactly the VAE round trip of the first frame)."""
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w) / self.components.latent_scale
        vae = self.components.vae
        images = torch.cat(
            [vae.decode(flat[i : i + chunk].to(vae.dtype)).sample for i in range(0, b * f, chunk)]
        )
        if not torch.isfinite(images).all():  # fp16 VAE decoders overflow: black frames otherwise
            raise GenerationError(
                f"the VAE decoded non-finite pixels in {vae.dtype}; run the VAE in bf16 or fp32"
            )
        images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).reshape(b, f, *images.shape[2:], 3).cpu().numpy()

    def prepare_first_frame(self, image: ImageInput, height: int, width: int) -> torch.Tensor:
        """Resize/crop the user's image and encode it: ``(1, 4, height/8, width/8)``."""
        pixels = resize_center_crop(load_image(image), height, width)
        t = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        return self.encode_images(t)

    # -- sampling ----------------------------------------------------------------------------
    def _guided_eps(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        cfg: GenerationConfig,
        spatial_only: bool,
    ) -> torch.Tensor:
        """Noise prediction with classifier-free guidance. ``text`` is ``[uncond; cond]`` per sample."""
        unet = self.components.unet
        n = latents.shape[0]
        if cfg.guidance_scale <= 1.0:
            return unet(latents, t, text[n:], spatial_only=spatial_only)
        if cfg.cfg_batched:
            eps = unet(torch.cat([latents, latents]), t, text, spatial_only=spatial_only)
            eps_u, eps_c = eps.chunk(2)
        else:
            eps_u = unet(latents, t, text[:n], spatial_only=spatial_only)
            eps_c = unet(latents, t, text[n:], spatial_only=spatial_only)
        return eps_u + cfg.guidance_scale * (eps_c - eps_u)

    @torch.no_grad()
    def text_to_image_latent(
        self, text: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator
    ) -> torch.Tensor:
        """A first-frame latent ``(1, 4, h, w)`` from the prompt, by the same backbone run as the 2D
        Stable Diffusion UNet (all temporal layers bypassed)."""
        return self.text_to_image_latents(text, cfg, [generator])

    @torch.no_grad()
    def text_to_image_latents(
        self, text: torch.Tensor, cfg: GenerationConfig, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """First-frame latents ``(k, 4, h, w)`` for ``k`` prompts in one UNet batch (``text``:
        ``[uncond x k; cond x k]``); each sample's noise comes from its own generator, as one at a
        time would draw it."""
        f = self.components.vae_scale_factor
        shape = (4, 1, cfg.height // f, cfg.width // f)

        def noise() -> torch.Tensor:
            draws = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
            return torch.stack(draws).to(self.device, self.dtype)

        latents = noise()
        scheduler = self.components.ddim()
        scheduler.set_timesteps(cfg.first_frame_steps or cfg.steps, device=self.device)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = self._guided_eps(latents, t, text, cfg, spatial_only=True)
            variance = noise() if cfg.eta > 0 else None
            latents = scheduler.step(eps, t, latents, eta=cfg.eta, variance_noise=variance).prev_sample
        return latents[:, :, 0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        first_frame: ImageInput | None = None,
        config: GenerationConfig | None = None,
        progress: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Generate one video. ``first_frame``: an image (path, bytes, PIL or array) of any size; it is
        resized and centre-cropped to the requested size. ``None`` generates it from the prompt.
        ``progress(step, total)`` is called after each denoising step; ``should_stop()`` returning
        True aborts between steps with :class:`GenerationCancelled`."""
        cfg = config or GenerationConfig()
        return self.generate_batch([prompt], [first_frame], cfg, progress, should_stop)[0]

    @torch.no_grad()
    def generate_batch(
        self,
        prompts: list[str],
        first_frames: list[ImageInput | None],
        config: GenerationConfig,
        progress: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        seeds: list[int] | None = None,
        negative_prompts: list[str] | None = None,
    ) -> list[GenerationResult]:
        """Generate several videos of the same shape and steps in one UNet batch (per-sample seeds).

        The UNet runs in eval mode (no LoRA dropout) whatever mode it was in; the mode is restored after."""
        unet = self.components.unet
        was_training = unet.training
        unet.eval()
        try:
            return self._generate_batch(
                prompts, first_frames, config, progress, should_stop, seeds, negative_prompts
            )
        finally:
            unet.train(was_training)

    def _generate_batch(
        self,
        prompts: list[str],
        first_frames: list[ImageInput | None],
        config: GenerationConfig,
        progress: ProgressCallback | None,
        should_stop: Callable[[], bool] | None,
        seeds: list[int] | None,
        negative_prompts: list[str] | None,
    ) -> list[GenerationResult]:
        cfg = config
        cfg.validate(self.components.vae_scale_factor)
        if len(prompts) != len(first_frames) or not prompts:
            raise GenerationError("prompts and first_frames must be non-empty lists of the same length")
        seeds = seeds or [cfg.seed + i for i in range(len(prompts))]
        negatives = negative_prompts or [cfg.negative_prompt] * len(prompts)
        max_tokens = self.components.tokenizer.model_max_length
        for p in [*prompts, *negatives]:
            n_tok = self.prompt_token_count(p)
            if n_tok > max_tokens:
                raise GenerationError(f"prompt is {n_tok} tokens; at most {max_tokens} fit the text encoder")
        t0 = time.perf_counter()
        b = len(prompts)
        text = self.encode_prompts(negatives + prompts)  # [uncond x b; cond x b]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        sf = self.components.vae_scale_factor
        lh, lw = cfg.height // sf, cfg.width // sf
        firsts: list[torch.Tensor | None] = [None] * b
        from_text = [i for i, image in enumerate(first_frames) if image is None]
        if from_text:  # every first frame drawn from its prompt, in one UNet batch
            sub = torch.cat(
                [text[i : i + 1] for i in from_text] + [text[b + i : b + i + 1] for i in from_text]
            )
            drawn = self.text_to_image_latents(sub, cfg, [generators[i] for i in from_text])
            for j, i in enumerate(from_text):
                firsts[i] = drawn[j : j + 1]
        for i, image in enumerate(first_frames):
            if image is not None:
                firsts[i] = self.prepare_first_frame(image, cfg.height, cfg.width)
        first = torch.cat([x for x in firsts if x is not None])  # (b, 4, lh, lw)
        t_first = time.perf_counter()

        noise = torch.stack(
            [torch.randn((4, cfg.num_frames, lh, lw), generator=g, dtype=torch.float32) for g in generators]
        ).to(self.device, self.dtype)
        r = cfg.shared_noise_ratio
        if r > 0:
            mix_other = math.sqrt(1 - r * r) if cfg.shared_noise_variance_preserving else 1 - r
            noise[:, :, 1:] = r * noise[:, :, :1] + mix_other * noise[:, :, 1:]
        scheduler = self.components.ddim()
        scheduler.set_timesteps(cfg.steps, device=self.device)
        latents = noise * scheduler.init_noise_sigma
        latents[:, :, 0] = first
        adain_from = int(cfg.adain_start_frac * cfg.steps)
        total = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            if should_stop is not None and should_stop():
                raise GenerationCancelled(f"generation stopped after {i} of {total} steps")
            eps = self._guided_eps(latents, t, text, cfg, spatial_only=False)
            # DDIM eta > 0 draws variance noise: draw it per sample from that sample's generator.
            variance_noise = None
            if cfg.eta > 0:
                variance_noise = torch.stack(
                    [torch.randn(latents.shape[1:], generator=g, dtype=torch.float32) for g in generators]
                ).to(self.device, self.dtype)[:, :, 1:]
            latents[:, :, 1:] = scheduler.step(
                eps[:, :, 1:], t, latents[:, :, 1:], eta=cfg.eta, variance_noise=variance_noise
            ).prev_sample
            latents[:, :, 0] = first
            if cfg.latent_adain and cfg.num_frames > 1:
                if i >= adain_from:
                    latents[:, :, 1] = adain(latents[:, :, 1], latents[:, :, 0])
                # every later frame at once: (b, c, f-2, h, w) against frame 1, broadcast
                latents[:, :, 2:] = adain(latents[:, :, 2:], latents[:, :, 1:2])
            if progress is not None:
                progress(i + 1, total)
        if cfg.latent_adain:
            latents[:, :, 1:] = adain(latents[:, :, 1:], latents[:, :, 0:1])
        t_denoise = time.perf_counter()
        videos = self.decode_latents(latents)
        if cfg.hist_match:
            for v in videos:
                histogram_match_frames(v[1:], v[0])
        t_end = time.perf_counter()
        timings = {
            "first_frame_s": t_first - t0,
            "denoise_s": t_denoise - t_first,
            "decode_s": t_end - t_denoise,
            "total_s": t_end - t0,
        }
        return [
            GenerationResult(videos[i], latents[i : i + 1].cpu(), seeds[i], dict(timings)) for i in range(b)
        ]


class GenerationCancelled(RuntimeError):
    """Raised when ``should_stop`` asked a generation to stop between denoising steps."""
