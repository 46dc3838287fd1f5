"""Which floating-point type a model runs in: one rule for the library, the CLI, inference and the trainer.

``auto`` is bf16 on CUDA (about 5-7x the fp32 throughput of current GPUs, and the range of fp32, so no
loss scaling and no overflow) and fp32 on the CPU (where bf16 matrix products are not faster on most
machines). The VAE never runs in fp16 unless asked (``vae="fp16"``): SD-1.x's VAE decoder overflows
fp16 and gives black frames, so with ``fp16`` weights it stays fp32. Whatever stays fp32 on CUDA
may use TF32 tensor cores (:func:`enable_tf32`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


def resolve_dtype(precision: str, device: object) -> torch.dtype:
    """The torch dtype ``precision`` means on ``device`` (``auto``: bf16 on CUDA, fp32 elsewhere)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if torch.device(str(device)).type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def vae_dtype(dtype: torch.dtype, vae: str | None = None) -> torch.dtype:
    """The VAE's dtype beside a model in ``dtype``: the same, except fp16 becomes fp32 unless ``vae``
    names a precision itself."""
    import torch

    if vae is not None and vae != "auto":
        return resolve_dtype(vae, "cpu")
    return torch.float32 if dtype == torch.float16 else dtype


def enable_tf32(device: object) -> None:
    """On CUDA, let fp32 matrix products and convolutions use TF32 tensor cores (what stays fp32:
    trainable LoRA weights under autocast, an fp32 VAE)."""
    import torch

    if torch.device(str(device)).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


COMPILE_BACKENDS: tuple[str, ...] = ("off", "inductor", "aot_eager", "eager")


def compile_unet(unet: torch.nn.Module, backend: str = "off") -> torch.nn.Module:
    """Compile ``unet`` in place with ``torch.compile`` (``nn.Module.compile``: the module, its
    parameter names and its adapters stay as they are), or leave it when ``backend`` is ``off`` (the
    default: compiling takes minutes and pays off only over many steps).

    ``inductor`` generates kernels (the choice on a GPU); ``aot_eager`` traces forward and backward
    without generating code and ``eager`` traces only, both to check a model compiles. ``fullgraph``:
    the UNet has no graph break (no host sync: its SparseCausal gather slices), so one that crept in
    fails here instead of silently splitting the graph. Returns ``unet``."""
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_BACKENDS)}, got {backend!r}")
    if backend != "off":
        unet.compile(backend=backend, fullgraph=True, dynamic=False)
    return unet
