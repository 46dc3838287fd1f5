"""The real-size model (SD-1.x UNet inflated to video, ~1.1 B parameters) with random weights: what a
video and a DPO step cost at 16 frames 320x512, 50 DDIM steps, CFG 12.5. Nothing is downloaded.

``--estimate`` (any machine, CI included): the models are built under torch's ``FakeTensorMode``, so no
weight or activation is ever allocated; ``FlopCounterMode`` counts FLOPs and ``MemTracker``
(``torch.distributed._tools.mem_tracker``) follows every fake tensor's storage to find the peak bytes.
It reports one UNet forward with CFG (batch 2), the FLOPs of a whole video's sampling, and one DPO
step (policy forward + backward on a chosen/rejected pair, reference forward with the adapters off,
AdamW on the LoRA weights) in fp32 and bf16, with and without gradient checkpointing. Fake tensors
live on the CPU device, so the peak follows the CPU kernels' choices (SDPA there is a flash kernel
that keeps only the log-sum-exp, as the CUDA flash/efficient kernels do), except that bf16 training
steps run group and layer norms in fp32 as CUDA's autocast does (CPU autocast keeps them in bf16,
which would understate the peak by about 5 GiB); allocator caching, fragmentation and cuBLAS/cuDNN
workspaces are not in it.

On a CUDA device (without ``--estimate``) it measures: seconds per video at batch 1 and 4 (image
first frame, the whole pipeline: text encoding, 50 steps, VAE decode, histogram matching), one UNet
forward's time and MFU, and one DPO step's time, peak memory and MFU for each precision with and
without checkpointing. MFU = counted FLOPs / time / the device's dense bf16 peak (table below, or
``--peak-tflops``); fp32 runs use TF32 and are divided by the same bf16 peak. Targets printed beside:
<= 5 s per video on an H100-class GPU, DPO step >= 35 % MFU in bf16. Without CUDA and without
``--estimate`` it runs the estimate.

    python bench/realsize.py --estimate [--json] [--frames 16 --height 320 --width 512]
    python bench/realsize.py [--precisions bf16,fp32] [--batches 1,4] [--peak-tflops 989]   # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F

GIB = 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' data sheets; matched against
# torch.cuda.get_device_name in order (the first substring found wins).
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)
H100_PEAK = 989e12
TARGET_SECONDS_PER_VIDEO = 5.0
TARGET_DPO_MFU_BF16 = 0.35
# The issue's review (issue 20): one DPO step's peak above the weights, GiB.
REVIEW_ABOVE_WEIGHTS_GIB = {
    ("bf16", True): 6.5,
    ("bf16", False): 33.2,
    ("fp32", True): 10.9,
    ("fp32", False): 53.7,
}

# SD-1.5's VAE and CLIP ViT-L/14 text encoder (the diffusers/transformers configs of
# runwayml/stable-diffusion-v1-5: 83.7 M and 123.1 M parameters).
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


@dataclass(frozen=True)
class Shape:
    frames: int = 16
    height: int = 320
    width: int = 512
    steps: int = 50
    guidance: float = 12.5
    lora_rank: int = 16

    @property
    def latent(self) -> tuple[int, int, int, int]:
        return 4, self.frames, self.height // 8, self.width // 8

    def describe(self) -> str:
        return (
            f"{self.frames} frames {self.height}x{self.width} (latents {'x'.join(map(str, self.latent))}), "
            f"{self.steps} DDIM steps, CFG {self.guidance}, LoRA rank {self.lora_rank}"
        )


# -- models ------------------------------------------------------------------------------------
def build_models(device: torch.device | str = "cpu") -> tuple[Any, Any, Any]:
    """The real-size video UNet, VAE and text encoder with random weights (fp32), built on ``device``
    (or on whatever a surrounding ``FakeTensorMode`` makes of it)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from huvidpo.models.tiny import SD15_UNET_CONFIG
    from huvidpo.models.video_unet import VideoUNet

    with torch.device(device):
        unet = VideoUNet(unet_config=SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).eval()
    return unet, vae, text_encoder


def add_lora(unet: Any, rank: int) -> list[torch.nn.Parameter]:
    """The trainer's adapter: LoRA on every attention projection, fp32 master weights, trainable."""
    from huvidpo.lora import lora_config, lora_parameters

    unet.add_adapter(lora_config(rank, 2.0 * rank, 0.0), adapter_name="default")
    unet.set_adapter("default")
    params = list(lora_parameters(unet, "default").values())
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def fakeify(module: torch.nn.Module) -> None:
    """Replace every parameter and buffer of a ``meta`` module by a fake CPU tensor of the same shape,
    dtype and ``requires_grad`` (call inside ``FakeTensorMode``). The UNet is built and given its LoRA
    on ``meta`` because peft moves new adapters with ``Module.to``, and ``Module.to`` cannot swap fake
    parameters (``swap_tensors`` refuses a tensor with a weak reference; FakeTensorMode keeps one)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="cpu"), requires_grad=p.requires_grad
                )
        for name, buf in list(m._buffers.items()):
            if buf is not None:
                m._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device="cpu")


def set_checkpointing(unet: Any, on: bool) -> None:
    from huvidpo.training.common import enable_checkpointing

    if on:
        enable_checkpointing(unet)
    else:
        unet.disable_gradient_checkpointing()


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Frozen weights to ``dtype`` in place; LoRA weights stay fp32 (the trainer's master weights, and
    peft clears their ``requires_grad`` while adapters are disabled). ``Module.to`` cannot swap fake
    parameters, see :func:`fakeify`."""
    for name, p in module.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(dtype)


def dpo_step_fn(unet: Any, params: list[torch.nn.Parameter], precision: str, shape: Shape, device: Any,
                fake: bool) -> Callable[[], None]:  # fmt: skip
    """One DPO training step on one pair as the trainer runs it: forward noise, reference forward
    (adapters off, no grad) and policy forward in one batch of [chosen, rejected], loss, backward,
    AdamW step on the LoRA weights. Under fake tensors the loss is formed from the same errors without
    :func:`huvidpo.losses.dpo_loss`, whose logging stats are read back as Python floats."""
    from diffusers import DDPMScheduler

    from huvidpo.losses import dpo_inside_term
    from huvidpo.models.tiny import SD_SCHEDULER_CONFIG
    from huvidpo.training.dpo import PairBatch, dpo_errors, dpo_step

    sched = DDPMScheduler.from_config({k: v for k, v in SD_SCHEDULER_CONFIG.items() if not k.startswith("_")})
    opt = torch.optim.AdamW(params, lr=1e-5)
    dtype = DTYPES[precision]
    dev = torch.device(device)

    def autocast() -> AbstractContextManager[Any]:
        return torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step() -> None:
        # the norms as CUDA runs them, forward and (checkpointing's) recompute in backward alike
        with _cuda_autocast_norms() if fake else nullcontext():
            one_step()

    def one_step() -> None:
        lat = (1, *shape.latent)
        batch = PairBatch(
            chosen=torch.randn(lat, device=dev, dtype=dtype),
            rejected=torch.randn(lat, device=dev, dtype=dtype),
            text=torch.randn(1, 77, unet.cross_attention_dim, device=dev, dtype=dtype),
            weights=torch.ones(1, device=dev),
        )
        t = torch.full((1,), 500, device=dev, dtype=torch.long)
        noise = torch.randn(lat, device=dev, dtype=dtype)
        if fake:
            errors = dpo_errors(unet, unet, unet, sched, batch, t, noise, autocast)
            mw, ml, rw, rl = errors
            loss = -F.logsigmoid(dpo_inside_term(mw, ml, rw.detach(), rl.detach(), 50.0)).mean()
        else:
            loss, _ = dpo_step(unet, unet, unet, sched, batch, t, noise, 50.0, autocast=autocast)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# -- estimate (fake tensors) -------------------------------------------------------------------
@contextmanager
def _cuda_autocast_norms() -> Iterator[None]:
    """Group and layer norms in fp32, as CUDA's autocast runs them (its fp32 op list); CPU autocast,
    which the fake tensors get, keeps them in bf16. Their fp32 outputs feed the SiLU of every resnet
    and are saved for backward, so this is most of the difference in memory between the two."""
    gn, ln = F.group_norm, F.layer_norm

    def up(t: Any) -> Any:
        return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def group_norm(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_autocast_enabled("cpu"):
            return gn(x, *args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return gn(x.float(), *(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    def layer_norm(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_autocast_enabled("cpu"):
            return ln(x, *args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return ln(x.float(), *(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    F.group_norm, F.layer_norm = group_norm, layer_norm  # type: ignore[assignment]
    try:
        yield
    finally:
        F.group_norm, F.layer_norm = gn, ln  # type: ignore[assignment]


def _flop_counter() -> Any:
    """FlopCounterMode that also counts the CPU flash-attention kernels (fake tensors live on the CPU
    device; torch's table only lists the CUDA SDPA kernels)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    return flop_counter.FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop.__wrapped__,  # type: ignore[attr-defined]
            aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop.__wrapped__,  # type: ignore[attr-defined]
        },
    )


def _by_op(counter: Any) -> dict[str, int]:
    return {str(op).split(".")[-1]: int(n) for op, n in counter.get_flop_counts()["Global"].items()}


@contextmanager
def _fake_mode() -> Iterator[Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Real constants of the library (the scheduler's alphas) turn fake when they meet fake tensors.
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


class _LiveBytes:
    """A dispatch mode that sums the storage bytes of every tensor an op returns while the storage is
    alive, and keeps the peak. Storages die when their last tensor does (a weak reference on the
    storage, as torch's ``MemTracker`` uses; that tracker itself refuses frozen parameters)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker.add(t)
                return out

        self.mode = Mode()
        self.live: dict[int, tuple[int, str]] = {}
        self.current = 0
        self.peak = 0
        self.by_dtype: dict[str, int] = {}
        self.peak_by_dtype: dict[str, int] = {}

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        n, dtype = st.nbytes(), str(t.dtype).removeprefix("torch.")
        self.live[key] = (n, dtype)
        self.current += n
        self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + n
        if self.current > self.peak:
            self.peak, self.peak_by_dtype = self.current, dict(self.by_dtype)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        n, dtype = self.live.pop(key, (0, ""))
        self.current -= n
        if n:
            self.by_dtype[dtype] -= n


def _peak(run: Callable[[], None], *modules: torch.nn.Module) -> dict[str, int]:
    """Peak bytes of all tensors alive at once while ``run`` runs, the parameters of ``modules``
    (alive throughout) included: ``{"total": ..., "weights": ...}``."""
    tracker = _LiveBytes()
    for m in modules:
        for p in m.parameters():
            tracker.add(p)
    weights = tracker.current
    with tracker.mode:
        run()
    gc.collect()
    return {
        "total": tracker.peak,
        "weights": weights,
        **{f"at_peak_{k}": v for k, v in tracker.peak_by_dtype.items()},
    }


def _flops(run: Callable[[], None]) -> tuple[int, dict[str, int], dict[str, int]]:
    counter = _flop_counter()
    with counter:
        run()
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return counter.get_total_flops(), _by_op(counter), per_module


def _sampling_flops(shape: Shape, forward_flops: int, fwd: Callable[..., Callable[[], None]], vae: Any,
                    text_encoder: Any) -> dict[str, Any]:  # fmt: skip
    """FLOPs of one video: prompts encoded (uncond + cond), ``steps`` CFG forwards of the video UNet,
    ``frames`` single-frame VAE decodes (the pipeline decodes frame by frame), and the first frame:
    one VAE encode of the user's image, or ``steps`` spatial-only CFG forwards from text."""
    lat = shape.latent
    first_frame_flops, _, _ = _flops(fwd(2, 1, spatial_only=True))

    def text() -> None:
        with torch.no_grad():
            text_encoder(torch.zeros(2, 77, dtype=torch.long))

    def decode() -> None:
        with torch.no_grad():
            vae.decode(torch.randn(1, 4, lat[2], lat[3]))

    def encode() -> None:
        with torch.no_grad():
            vae.encode(torch.randn(1, 3, shape.height, shape.width))

    text_flops, decode_flops, encode_flops = (_flops(fn)[0] for fn in (text, decode, encode))
    parts = {
        "text_encoder": text_flops,
        "vae_encode_first_frame": encode_flops,
        "unet_denoise": shape.steps * forward_flops,
        "vae_decode": shape.frames * decode_flops,
    }
    from_image = sum(parts.values())
    from_text = from_image - encode_flops + shape.steps * first_frame_flops
    return {
        "flops_from_image": from_image,
        "flops_from_text": from_text,
        "parts": {**parts, "unet_first_frame_from_text": shape.steps * first_frame_flops},
        "seconds_at_h100_bf16_peak": from_image / H100_PEAK,
    }


ESTIMATE_PARTS = ("forward", "sampling", "dpo")


def estimate(shape: Shape, precisions: list[str], log: Callable[[str], None],
             parts: tuple[str, ...] = ESTIMATE_PARTS) -> dict[str, Any]:  # fmt: skip
    """FLOPs and peak bytes at ``shape`` from fake tensors (see the module docstring); ``parts`` picks
    the rows (the sampling row reuses the forward's count)."""
    from huvidpo.lora import lora_parameters

    out: dict[str, Any] = {
        "mode": "estimate",
        "conditions": shape.describe() + "; fake tensors on the CPU device",
    }
    lat = shape.latent
    unet, _, _ = build_models("meta")
    params = add_lora(unet, shape.lora_rank)
    lora_numel = sum(p.numel() for p in params)
    with _fake_mode():
        _, vae, text_encoder = build_models("cpu")
        fakeify(unet)
        params = list(lora_parameters(unet, "default").values())
        unet.disable_adapters()  # the forward and sampling rows: the base model
        out["params"] = {
            "unet": sum(p.numel() for p in unet.parameters()) - lora_numel,
            "vae": sum(p.numel() for p in vae.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        }

        # One UNet forward with CFG (batch 2) and the other parts of one video's sampling.
        def fwd(b: int, frames: int, spatial_only: bool = False, dtype: torch.dtype = torch.float32) -> Callable[[], None]:  # fmt: skip
            def run() -> None:
                x = torch.randn(b, 4, frames, lat[2], lat[3], dtype=dtype)
                with torch.no_grad():
                    unet(
                        x,
                        torch.full((b,), 500),
                        torch.randn(b, 77, unet.cross_attention_dim, dtype=dtype),
                        spatial_only=spatial_only,
                    )

            return run

        t0 = time.perf_counter()
        flops, by_op, per_module = _flops(fwd(2, shape.frames))
        conv_in = per_module.get("VideoUNet.unet.conv_in.conv2d", 0)
        forward: dict[str, Any] = {
            "batch": 2,
            "flops": flops,
            "flops_by_op": by_op,
            "conv_in_conv2d_flops": conv_in,
        }
        out["unet_forward"] = forward
        if "forward" in parts:
            for p in precisions:
                cast_frozen(unet, DTYPES[p])
                peak = _peak(fwd(2, shape.frames, dtype=DTYPES[p]), unet)
                forward[p] = {"peak_bytes": peak["total"], "weights_bytes": peak["weights"]}
            cast_frozen(unet, torch.float32)
        log(f"[estimate] UNet forward: {time.perf_counter() - t0:.1f} s")
        if "sampling" in parts:
            out["sampling"] = _sampling_flops(shape, flops, fwd, vae, text_encoder)
        # One DPO step per precision, with and without checkpointing.
        unet.enable_adapters()
        out["params"]["lora"] = lora_numel
        steps: list[dict[str, Any]] = []
        for p in precisions if "dpo" in parts else []:
            cast_frozen(unet, DTYPES[p])
            for ckpt in (True, False):
                t0 = time.perf_counter()
                unet.train()
                set_checkpointing(unet, ckpt)
                step = dpo_step_fn(unet, params, p, shape, "cpu", fake=True)
                step_flops, _, _ = _flops(step)
                step = dpo_step_fn(unet, params, p, shape, "cpu", fake=True)  # fresh optimizer state
                peak = _peak(step, unet)
                w = peak["weights"]
                row = {
                    "precision": p,
                    "checkpointing": ckpt,
                    "flops": step_flops,
                    "peak_bytes": peak["total"],
                    "weights_bytes": w,
                    "above_weights_bytes": peak["total"] - w,
                    # the review's figures are for the default (real) size only
                    "review_above_weights_gib": REVIEW_ABOVE_WEIGHTS_GIB.get((p, ckpt))
                    if shape == Shape()
                    else None,
                    "peak_bytes_by_dtype": {
                        k.removeprefix("at_peak_"): v for k, v in peak.items() if k.startswith("at_peak_")
                    },
                }
                steps.append(row)
                log(f"[estimate] DPO step {p} ckpt={ckpt}: {time.perf_counter() - t0:.1f} s")
        set_checkpointing(unet, False)
        if steps:
            out["dpo_step"] = steps

    def find(p: str, ckpt: bool) -> dict[str, Any] | None:
        return next((r for r in steps if r["precision"] == p and r["checkpointing"] == ckpt), None)

    on, off = find(precisions[0], True), find(precisions[0], False)
    if on and off:
        out["ratio_flops_ckpt_over_no_ckpt"] = on["flops"] / off["flops"]
        out["ratio_dpo_flops_over_forward"] = off["flops"] / flops
    for p in precisions:
        on, off = find(p, True), find(p, False)
        if on and off:
            out[f"ratio_{p}_above_weights_no_ckpt_over_ckpt"] = (
                off["above_weights_bytes"] / on["above_weights_bytes"]
            )
    return out


def print_estimate(r: dict[str, Any]) -> None:
    tf = lambda n: f"{n / 1e12:9.2f}"  # noqa: E731
    gib = lambda n: f"{n / GIB:7.2f}"  # noqa: E731
    p = r["params"]
    print(f"real-size estimate: {r['conditions']}")
    print(
        f"parameters: UNet {p['unet'] / 1e6:.1f} M, VAE {p['vae'] / 1e6:.1f} M, text encoder "
        f"{p['text_encoder'] / 1e6:.1f} M, LoRA {p.get('lora', 0) / 1e6:.2f} M"
    )
    f = r["unet_forward"]
    ops = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in sorted(f["flops_by_op"].items(), key=lambda kv: -kv[1]))
    print(f"\nUNet forward, CFG batch 2: {tf(f['flops'])} TFLOP ({ops})")
    for prec in DTYPES:
        if prec in f:
            print(
                f"  {prec}: peak {gib(f[prec]['peak_bytes'])} GiB, weights {gib(f[prec]['weights_bytes'])} GiB"
            )
    s = r.get("sampling")
    if s:
        _print_sampling(s)
    if "dpo_step" in r:
        _print_dpo(r["dpo_step"])
    for k, v in r.items():
        if "ratio" in k.split("_"):
            print(f"  {k}: {v:.3f}")


def _print_sampling(s: dict[str, Any]) -> None:
    tf = lambda n: f"{n / 1e12:9.2f}"  # noqa: E731
    print(f"\none video's sampling: {tf(s['flops_from_image'])} TFLOP from an image first frame, "
          f"{tf(s['flops_from_text'])} TFLOP from text")  # fmt: skip
    for k, v in s["parts"].items():
        print(f"  {k:28s} {tf(v)} TFLOP")
    print(f"  at the H100's dense bf16 peak (989 TFLOP/s): {s['seconds_at_h100_bf16_peak']:.2f} s per video "
          f"(target <= {TARGET_SECONDS_PER_VIDEO:.0f} s: needs >= "
          f"{s['seconds_at_h100_bf16_peak'] / TARGET_SECONDS_PER_VIDEO:.0%} MFU)")  # fmt: skip


def _print_dpo(rows: list[dict[str, Any]]) -> None:
    tf = lambda n: f"{n / 1e12:9.2f}"  # noqa: E731
    gib = lambda n: f"{n / GIB:7.2f}"  # noqa: E731
    print("\none DPO step (pair, LoRA only trainable):")
    print(
        "  precision  ckpt    TFLOP   peak GiB  weights  above weights  (review)  at the peak, GiB by dtype"
    )
    for row in rows:
        review = row["review_above_weights_gib"]
        print(
            f"  {row['precision']:9s}  {'on ' if row['checkpointing'] else 'off'}  {tf(row['flops'])}  "
            f"{gib(row['peak_bytes'])}  {gib(row['weights_bytes'])}  {gib(row['above_weights_bytes'])}"
            f"        {review if review is not None else '-':>5}    "
            + ", ".join(f"{k} {v / GIB:.2f}" for k, v in row["peak_bytes_by_dtype"].items())
        )


# -- measurement on a CUDA device --------------------------------------------------------------
def peak_flops(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((v for key, v in PEAK_BF16_FLOPS if key in name), None)


@contextmanager
def _uncompiled(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` eagerly inside: FlopCounterMode's dispatch mode cannot trace a compiled call."""
    compiled = getattr(module, "_compiled_call_impl", None)
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled


def _cuda_seconds(fn: Callable[[], None], repeats: int) -> float:
    """Median seconds of ``fn`` by CUDA events, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _measure_precision(shape: Shape, prec: str, batches: list[int], peak: float | None, repeats: int,
                       log: Callable[[str], None], dev: torch.device,
                       compile_backend: str = "off") -> dict[str, Any]:  # fmt: skip
    """One precision on one device: seconds per video, UNet forward, DPO step (see the module docstring)."""
    import numpy as np

    from huvidpo.models.components import ModelComponents
    from huvidpo.models.tiny import SD_SCHEDULER_CONFIG, tiny_tokenizer
    from huvidpo.pipeline import GenerationConfig, HuViDPOPipeline

    mfu = lambda flops, s: flops / s / peak if peak else None  # noqa: E731
    lat = shape.latent
    res: dict[str, Any] = {}
    dtype = DTYPES[prec]
    unet, vae, text_encoder = build_models(dev)
    for m in (unet, vae, text_encoder):
        m.to(dtype)
    from huvidpo.precision import compile_unet

    compile_unet(unet, compile_backend)  # the warm-up generation below compiles it
    comps = ModelComponents(unet, vae, text_encoder, tiny_tokenizer(), dict(SD_SCHEDULER_CONFIG))
    pipe = HuViDPOPipeline(comps)
    image = np.random.default_rng(0).integers(0, 256, (shape.height, shape.width, 3), dtype=np.uint8)
    cfg = GenerationConfig(num_frames=shape.frames, height=shape.height, width=shape.width,
                           steps=shape.steps, guidance_scale=shape.guidance)  # fmt: skip
    res["seconds_per_video"] = {}
    for b in batches:
        try:
            warm = GenerationConfig(**{**cfg.__dict__, "steps": 2})
            pipe.generate_batch(["a prompt"] * b, [image] * b, warm)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pipe.generate_batch(["a prompt"] * b, [image] * b, cfg)
            torch.cuda.synchronize()
            res["seconds_per_video"][str(b)] = (time.perf_counter() - t0) / b
        except torch.cuda.OutOfMemoryError:
            res["seconds_per_video"][str(b)] = "out of memory"
        log(f"[cuda] {prec} video batch {b}: {res['seconds_per_video'][str(b)]}")
        torch.cuda.empty_cache()

    x = torch.randn(2, *lat, device=dev, dtype=dtype)
    t = torch.full((2,), 500, device=dev)
    text = torch.randn(2, 77, unet.cross_attention_dim, device=dev, dtype=dtype)

    def forward() -> None:
        with torch.no_grad():
            unet(x, t, text)

    with _uncompiled(unet):
        flops, _, _ = _flops(forward)
    secs = _cuda_seconds(forward, repeats)
    res["unet_forward"] = {"batch": 2, "flops": flops, "seconds": secs, "mfu": mfu(flops, secs)}
    log(f"[cuda] {prec} UNet forward: {secs:.3f} s")

    params = add_lora(unet, shape.lora_rank)
    res["dpo_step"] = []
    model_flops = None  # MFU counts the step's model FLOPs: checkpointing's recompute is not useful work
    for ckpt in (False, True):
        unet.train()
        set_checkpointing(unet, ckpt)
        step = dpo_step_fn(unet, params, prec, shape, dev, fake=False)
        row: dict[str, Any] = {"checkpointing": ckpt}
        try:
            with _uncompiled(unet):
                step_flops, _, _ = _flops(step)  # also the warm-up (optimizer state allocated)
            model_flops = model_flops or step_flops
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            secs = _cuda_seconds(step, repeats)
            row.update(
                flops=step_flops,
                seconds=secs,
                mfu=mfu(model_flops, secs),
                hfu=mfu(step_flops, secs),
                peak_bytes=torch.cuda.max_memory_allocated(),
                above_weights_bytes=torch.cuda.max_memory_allocated() - before,
            )
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        res["dpo_step"].append(row)
        log(f"[cuda] {prec} DPO step ckpt={ckpt}: {row}")
        torch.cuda.empty_cache()
    return res


def measure_cuda(shape: Shape, precisions: list[str], batches: list[int], peak: float | None, repeats: int,
                 log: Callable[[str], None], device: str = "cuda",
                 compile_backend: str = "off") -> dict[str, Any]:  # fmt: skip
    """Measure each precision in turn (models rebuilt per precision) and the ratios to the targets."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(0)
    out: dict[str, Any] = {
        "mode": "cuda",
        "device": name,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "conditions": shape.describe() + f"; {name}; torch {torch.__version__}; compile {compile_backend}",
        "precisions": {},
    }
    dev = torch.device(device)
    for prec in precisions:
        out["precisions"][prec] = _measure_precision(
            shape, prec, batches, peak, repeats, log, dev, compile_backend
        )
        torch.cuda.empty_cache()

    bf = out["precisions"].get("bf16")
    if bf:
        one = bf["seconds_per_video"].get("1")
        if isinstance(one, float):
            out["ratio_seconds_per_video_over_target"] = one / TARGET_SECONDS_PER_VIDEO
        ck = next((r for r in bf["dpo_step"] if r.get("mfu") is not None and not r["checkpointing"]), None)
        if ck:
            out["ratio_dpo_mfu_over_target_bf16"] = ck["mfu"] / TARGET_DPO_MFU_BF16
    return out


def print_cuda(r: dict[str, Any]) -> None:
    print(f"real size on {r['conditions']}; dense bf16 peak {r['peak_bf16_tflops']} TFLOP/s")
    pct = lambda v: f"{v:.1%}" if isinstance(v, float) else "-"  # noqa: E731
    for prec, res in r["precisions"].items():
        spv = ", ".join(
            f"batch {b}: " + (f"{s:.2f} s" if isinstance(s, float) else s)
            for b, s in res["seconds_per_video"].items()
        )
        print(
            f"\n{prec}: seconds per video {spv}   (target <= {TARGET_SECONDS_PER_VIDEO:.0f} s on an H100-class GPU)"
        )
        f = res["unet_forward"]
        print(
            f"  UNet forward (CFG batch 2): {f['seconds'] * 1e3:.1f} ms, {f['flops'] / 1e12:.2f} TFLOP, MFU {pct(f['mfu'])}"
        )
        for row in res["dpo_step"]:
            ck = "ckpt on " if row["checkpointing"] else "ckpt off"
            if "error" in row:
                print(f"  DPO step {ck}: {row['error']}")
                continue
            print(
                f"  DPO step {ck}: {row['seconds'] * 1e3:.0f} ms, MFU {pct(row['mfu'])} "
                f"(target >= {TARGET_DPO_MFU_BF16:.0%} in bf16), peak {row['peak_bytes'] / GIB:.2f} GiB, "
                f"{row['above_weights_bytes'] / GIB:.2f} GiB above weights and optimizer state"
            )
    for k, v in r.items():
        if "ratio" in k.split("_"):
            print(f"{k}: {v:.3f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from huvidpo.precision import COMPILE_BACKENDS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--estimate", action="store_true", help="FLOPs and peak bytes from fake tensors (no GPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument(
        "--quick", action="store_true", help="fewer timed repeats on a GPU (the estimate is the same)"
    )
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--height", type=int, default=320)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps per video")
    ap.add_argument("--guidance", type=float, default=12.5)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--parts", default=",".join(ESTIMATE_PARTS), help="estimate rows: forward, sampling, dpo")
    ap.add_argument("--batches", default="1,4", help="videos per batch to time on a GPU")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s")
    ap.add_argument(
        "--compile",
        default="off",
        choices=COMPILE_BACKENDS,
        help="GPU runs: torch.compile the UNet first",
    )
    args = ap.parse_args(argv)
    if args.height % 8 or args.width % 8 or args.frames < 2:
        ap.error("height and width must be multiples of 8 and frames at least 2")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or any(p not in DTYPES for p in precisions):
        ap.error(f"--precisions takes {', '.join(DTYPES)}")
    from huvidpo.cli import quiet_libraries

    quiet_libraries()
    shape = Shape(args.frames, args.height, args.width, args.steps, args.guidance, args.lora_rank)
    log = (lambda s: print(s, file=__import__("sys").stderr, flush=True)) if args.json else print
    t0 = time.perf_counter()
    if args.estimate or not torch.cuda.is_available():
        result = estimate(shape, precisions, log, tuple(p.strip() for p in args.parts.split(",")))
    else:
        peak = peak_flops(torch.cuda.get_device_name(0), args.peak_tflops)
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
        result = measure_cuda(
            shape, precisions, batches, peak, 3 if args.quick else 10, log, compile_backend=args.compile
        )
    result["machine"] = f"{platform.node()} {platform.machine()}, torch {torch.__version__}"
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(result))
    elif result["mode"] == "estimate":
        print_estimate(result)
    else:
        print_cuda(result)
    return result


if __name__ == "__main__":
    main()
