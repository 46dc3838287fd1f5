"""Temporal-spatial layers added to a diffusers 2D UNet when it is inflated to video.

All layers receive the 2D UNet's per-frame tensors, shaped ``(b*f, c, h, w)`` or ``(b*f, n, c)``, and
read the number of frames ``f`` from a :class:`FrameContext` shared by the whole video UNet; the
2D blocks of diffusers therefore run unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn

SparseCausalMode = Literal["first+prev", "first"]


@dataclass
class FrameContext:
    """Per-forward state shared by every inflated layer of one video UNet.

    ``num_frames`` is set by :meth:`VideoUNet.forward` before the 2D UNet runs; ``spatial_only``
    bypasses every temporal layer so the network is exactly the 2D UNet (used for text-to-image
    first frames). One video UNet instance processes one clip shape at a time.
    """

    num_frames: int = 1
    spatial_only: bool = False
    attention_block_budget: int = 32768
    """Most ``sequences x heads`` one temporal-attention call may hand to scaled-dot-product attention.
    CUDA kernels launch a block per (sequence, head) and a grid dimension holds at most 65,535, which
    real-size batches reach (``b * h * w`` sequences); larger batches run in chunks under this budget."""


class InflatedConv(nn.Module):
    """A 2D convolution followed by a gated causal temporal convolution.

    ``y2d = conv2d(x)`` per frame, then ``y = y2d + conv1d_causal(y2d) * sigmoid(conv_gate(y2d))``.
    ``conv1d`` has kernel 3 and looks back only (frame t sees t-2, t-1, t); both ``conv1d`` and
    ``conv_gate`` are zero-initialised, so the layer equals the 2D conv at initialisation.

    Input ``(b*f, c_in, h, w)``; output ``(b*f, c_out, h', w')``.
    """

    def __init__(self, conv2d: nn.Conv2d, ctx: FrameContext, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv2d = conv2d
        channels = conv2d.out_channels
        self.kernel_size = kernel_size
        self.conv1d = nn.Conv1d(channels, channels, kernel_size, padding=0)
        self.conv_gate = nn.Conv2d(channels, 1, kernel_size=3, padding=1)
        for m in (self.conv1d, self.conv_gate):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)  # type: ignore[arg-type]
        # A plain attribute, not a submodule: the context holds no weights.
        object.__setattr__(self, "_ctx", ctx)

    # Attributes diffusers reads from the convolution it replaced (e.g. ``conv_in.out_channels``).
    @property
    def in_channels(self) -> int:
        return self.conv2d.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv2d.out_channels

    @property
    def weight(self) -> torch.Tensor:
        return self.conv2d.weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.conv2d(x)
        ctx = self.__dict__["_ctx"]
        f = ctx.num_frames
        if ctx.spatial_only:
            return y
        bf, c, h, w = y.shape
        b = bf // f
        # (b f) c h w -> (b h w) c f, causal left padding of k-1 frames.
        seq = y.reshape(b, f, c, h, w).permute(0, 3, 4, 2, 1).reshape(b * h * w, c, f)
        seq = F.pad(seq, (self.kernel_size - 1, 0))
        temporal = self.conv1d(seq)
        temporal = temporal.reshape(b, h, w, c, f).permute(0, 4, 3, 1, 2).reshape(bf, c, h, w)
        gate = torch.sigmoid(self.conv_gate(y))
        return y + temporal * gate


class SparseCausalAttnProcessor:
    """Self-attention where frame ``i`` attends to frame 0 and frame ``max(i-1, 0)`` (``first+prev``,
    HuViDPO) or to frame 0 only (``first``, LAMP). Queries come from frame ``i`` itself.

    Works on ``hidden_states`` of shape ``(b*f, n, c)`` with scaled-dot-product attention.
    """

    def __init__(self, ctx: FrameContext, mode: SparseCausalMode = "first+prev") -> None:
        if mode not in ("first+prev", "first"):
            raise ValueError(f"sparse_causal mode must be 'first+prev' or 'first', got {mode!r}")
        self.ctx = ctx
        self.mode = mode

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("SparseCausalAttnProcessor is for self-attention (attn1) only")
        residual = hidden_states
        f = 1 if self.ctx.spatial_only else self.ctx.num_frames
        bf = hidden_states.shape[0]
        b = bf // f
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if f > 1:
            key = self._gather(key, b, f)
            value = self._gather(value, b, f)
        inner = key.shape[-1]
        hd = inner // attn.heads
        q = query.view(bf, -1, attn.heads, hd).transpose(1, 2)
        k = key.view(bf, -1, attn.heads, hd).transpose(1, 2)
        v = value.view(bf, -1, attn.heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(bf, -1, attn.heads * hd).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _gather(self, x: torch.Tensor, b: int, f: int) -> torch.Tensor:
        """(b*f, n, c) -> (b*f, m*n, c): the keys/values each frame attends to."""
        # Slices and expand only: an index built from a Python list is a host-to-device copy (a sync
        # on CUDA) in every attention layer of every forward, and stops CUDA graphs.
        x = x.reshape(b, f, *x.shape[1:])
        first = x[:, :1].expand(-1, f, -1, -1)
        if self.mode == "first":
            out = first
        else:
            prev = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # frame max(i-1, 0)
            out = torch.cat([first, prev], dim=2)
        return out.reshape(b * f, -1, x.shape[-1])


class VideoTransformerBlock(BasicTransformerBlock):
    """diffusers' ``BasicTransformerBlock`` plus a temporal self-attention over frames.

    After the spatial block: ``h = h + attn_temp(norm_temp(h))`` where attention runs along the
    frame axis for each spatial token, ``(b*f, n, c) -> (b*n, f, c)``. ``attn_temp.to_out[0]`` is
    zero-initialised, so the block equals the 2D block at initialisation. No positional encoding,
    all frames visible (as the reference method).
    """

    attn_temp: Attention
    norm_temp: nn.LayerNorm
    _ctx: FrameContext

    @classmethod
    def inflate(cls, block: BasicTransformerBlock, ctx: FrameContext) -> VideoTransformerBlock:
        dim = block.norm1.normalized_shape[0] if hasattr(block.norm1, "normalized_shape") else block.dim
        heads = block.attn1.heads
        dim_head = block.attn1.inner_dim // heads
        block.__class__ = cls
        attn_temp = Attention(
            query_dim=dim, heads=heads, dim_head=dim_head, bias=False, upcast_attention=False
        )
        nn.init.zeros_(attn_temp.to_out[0].weight)
        if attn_temp.to_out[0].bias is not None:
            nn.init.zeros_(attn_temp.to_out[0].bias)
        block.add_module("attn_temp", attn_temp)
        block.add_module("norm_temp", nn.LayerNorm(dim))
        object.__setattr__(block, "_ctx", ctx)
        return block  # type: ignore[return-value]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden_states = super().forward(hidden_states, *args, **kwargs)
        ctx = self._ctx
        f = ctx.num_frames
        if ctx.spatial_only:
            return hidden_states
        bf, n, c = hidden_states.shape
        b = bf // f
        h = hidden_states.reshape(b, f, n, c).permute(0, 2, 1, 3).reshape(b * n, f, c)
        rows = max(1, ctx.attention_block_budget // self.attn_temp.heads)
        if h.shape[0] <= rows:
            h = self.attn_temp(self.norm_temp(h)) + h
        else:  # each sequence attends over its own frames only: chunks along the batch are exact
            h = torch.cat([self.attn_temp(self.norm_temp(part)) + part for part in h.split(rows)])
        return h.reshape(b, n, f, c).permute(0, 2, 1, 3).reshape(bf, n, c)
