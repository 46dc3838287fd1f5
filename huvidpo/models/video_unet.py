"""The HuViDPO video UNet: a diffusers ``UNet2DConditionModel`` inflated to video.

The 2D UNet and its blocks are diffusers' own; inflation wraps every 2D convolution of the
resnets, samplers, ``conv_in`` and ``conv_out`` in :class:`InflatedConv` (gated causal temporal conv),
turns every ``BasicTransformerBlock`` into a :class:`VideoTransformerBlock` (temporal attention)
and gives every ``attn1`` a SparseCausal attention processor. Tensor layout is ``(b, c, f, h, w)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from huvidpo.models.layers import (
    FrameContext,
    InflatedConv,
    SparseCausalAttnProcessor,
    SparseCausalMode,
    VideoTransformerBlock,
)
from huvidpo.models.patterns import DEFAULT_STAGE1_PATTERNS

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")


class PickleWeightsError(ValueError):
    """Raised when a model directory only holds pickle-format weights."""


def ensure_safetensors(directory: str | os.PathLike[str]) -> None:
    """Refuse a weights directory that has pickle weights and no safetensors.

    Pickle files can execute code when loaded; the project loads safetensors only.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    files = [p for p in d.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise PickleWeightsError(
            f"{d} holds only pickle-format weights ({', '.join(sorted(pickles))}); huvidpo loads safetensors "
            "only. Convert them once with safetensors.torch.save_file(torch.load(path, weights_only=True), "
            "'diffusion_pytorch_model.safetensors') in a trusted environment."
        )
    raise FileNotFoundError(f"{d} holds no .safetensors weights")


def _inflatable_convs(unet: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every 2D convolution that gets a temporal conv."""
    found: list[tuple[nn.Module, str]] = [(unet, "conv_in"), (unet, "conv_out")]
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            for name in ("conv1", "conv2", "conv_shortcut"):
                if isinstance(getattr(module, name, None), nn.Conv2d):
                    found.append((module, name))
        elif isinstance(module, Downsample2D | Upsample2D):
            for name in ("conv", "Conv2d_0"):
                if isinstance(getattr(module, name, None), nn.Conv2d):
                    found.append((module, name))
    return found


class VideoUNet(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Video UNet ``eps(x_t, t, text)`` over clips of shape ``(b, 4, f, h, w)``.

    ``unet_config`` is the diffusers ``UNet2DConditionModel`` config (SD 1.x layout); ``sparse_causal``
    chooses the self-attention pattern, ``temporal_kernel`` the causal conv length.
    """

    _supports_gradient_checkpointing = True
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any] | None = None,
        sparse_causal: SparseCausalMode = "first+prev",
        temporal_kernel: int = 3,
    ) -> None:
        super().__init__()
        if unet_config is None:
            raise ValueError("VideoUNet needs the 2D UNet config it inflates (unet_config)")
        cfg = {k: v for k, v in unet_config.items() if not k.startswith("_")}
        self.ctx = FrameContext()
        self.unet = UNet2DConditionModel(**cfg)
        for parent, name in _inflatable_convs(self.unet):
            setattr(parent, name, InflatedConv(getattr(parent, name), self.ctx, temporal_kernel))
        for module in list(self.unet.modules()):
            if isinstance(module, BasicTransformerBlock) and not isinstance(module, VideoTransformerBlock):
                VideoTransformerBlock.inflate(module, self.ctx)
                module.attn1.set_processor(SparseCausalAttnProcessor(self.ctx, sparse_causal))

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_unet2d(
        cls,
        unet2d: UNet2DConditionModel,
        sparse_causal: SparseCausalMode = "first+prev",
        temporal_kernel: int = 3,
    ) -> VideoUNet:
        """Inflate a 2D UNet: spatial weights copied, temporal layers zero-initialised."""
        config = {k: v for k, v in dict(unet2d.config).items() if not k.startswith("_")}
        video = cls(unet_config=config, sparse_causal=sparse_causal, temporal_kernel=temporal_kernel)
        video.load_unet2d_state_dict(unet2d.state_dict())
        if unet2d.dtype != torch.float32:
            video.to(dtype=unet2d.dtype)
        return video

    def load_unet2d_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a 2D UNet's weights in, renaming ``X.weight`` to ``X.conv2d.weight`` for inflated convs."""
        inflated = {name for name, m in self.unet.named_modules() if isinstance(m, InflatedConv)}
        mapped: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            module, _, leaf = key.rpartition(".")
            mapped[f"{module}.conv2d.{leaf}" if module in inflated else key] = value
        missing, unexpected = self.unet.load_state_dict(mapped, strict=False)
        if unexpected:
            raise ValueError(f"2D UNet weights have keys the video UNet does not know: {unexpected[:5]}")
        new_prefixes = (".conv1d.", ".conv_gate.", ".attn_temp.", ".norm_temp.")
        truly_missing = [k for k in missing if not any(p in f".{k}" for p in new_prefixes)]
        if truly_missing:
            raise ValueError(f"2D UNet weights lack keys: {truly_missing[:5]}")

    @classmethod
    def from_pretrained_any(
        cls,
        directory: str | os.PathLike[str],
        sparse_causal: SparseCausalMode = "first+prev",
        torch_dtype: torch.dtype | None = None,
    ) -> VideoUNet:
        """Load a ``unet/`` directory that holds either a VideoUNet or an SD-1.x 2D UNet (inflated here)."""
        d = Path(directory)
        ensure_safetensors(d)
        config = json.loads((d / "config.json").read_text())
        if config.get("_class_name") == cls.__name__:
            model = cls.from_pretrained(d, use_safetensors=True, torch_dtype=torch_dtype)
        else:
            unet2d = UNet2DConditionModel.from_pretrained(d, use_safetensors=True, torch_dtype=torch_dtype)
            model = cls.from_unet2d(unet2d, sparse_causal=sparse_causal)
        # Weights loaded from a memory map sit at unaligned addresses and make oneDNN pick other
        # kernels; cloning makes a reloaded model compute bit-identically to the saved one.
        for p in model.parameters():
            p.data = p.data.clone()
        return model

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.conv2d.weight.dtype

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Any = None
    ) -> None:
        self.unet._set_gradient_checkpointing(
            enable=enable, gradient_checkpointing_func=gradient_checkpointing_func
        )

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        spatial_only: bool = False,
    ) -> torch.Tensor:
        """Predict noise.

        sample: ``(b, c, f, h, w)`` latents; timestep: scalar or ``(b,)``; encoder_hidden_states:
        ``(b, seq, dim)`` text embeddings (shared by all frames of a clip). Returns ``(b, c, f, h, w)``.
        ``spatial_only`` skips every temporal layer (the network is then exactly the 2D UNet).
        """
        if sample.ndim != 5:
            raise ValueError(f"sample must be (b, c, f, h, w), got shape {tuple(sample.shape)}")
        b, c, f, h, w = sample.shape
        if encoder_hidden_states.shape[0] != b:
            raise ValueError(
                f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} does not match sample batch {b}"
            )
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(b)
        self.ctx.num_frames = f
        self.ctx.spatial_only = spatial_only
        x = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        out = self.unet(
            x,
            t.repeat_interleave(f),
            encoder_hidden_states=encoder_hidden_states.repeat_interleave(f, dim=0),
            return_dict=False,
        )[0]
        return out.reshape(b, f, out.shape[1], h, w).permute(0, 2, 1, 3, 4)

    # -- parameter groups --------------------------------------------------------------------
    def temporal_parameter_names(self, patterns: tuple[str, ...] | None = None) -> list[str]:
        """Names of the stage-1 trainable parameters: every parameter whose module path contains one of
        ``patterns`` (default: temporal conv, gate, temporal attention and the SparseCausal query)."""
        pats = patterns or DEFAULT_STAGE1_PATTERNS
        return [n for n, _ in self.named_parameters() if any(p in n for p in pats)]
