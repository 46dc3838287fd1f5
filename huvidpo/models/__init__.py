"""Video UNet (inflated SD-1.x UNet), temporal-spatial layers and model directories.

Names resolve lazily (torch and diffusers load on first use), so light modules such as
:mod:`huvidpo.models.patterns` import alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

from huvidpo._lazy import lazy_exports

if TYPE_CHECKING:
    from huvidpo.models.components import ModelComponents, directory_digest, load_components
    from huvidpo.models.layers import (
        FrameContext,
        InflatedConv,
        SparseCausalAttnProcessor,
        VideoTransformerBlock,
    )
    from huvidpo.models.patterns import DEFAULT_STAGE1_PATTERNS
    from huvidpo.models.video_unet import PickleWeightsError, VideoUNet, ensure_safetensors

_EXPORTS = {
    "ModelComponents": "components",
    "directory_digest": "components",
    "load_components": "components",
    "FrameContext": "layers",
    "InflatedConv": "layers",
    "SparseCausalAttnProcessor": "layers",
    "VideoTransformerBlock": "layers",
    "DEFAULT_STAGE1_PATTERNS": "patterns",
    "PickleWeightsError": "video_unet",
    "VideoUNet": "video_unet",
    "ensure_safetensors": "video_unet",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "DEFAULT_STAGE1_PATTERNS",
    "FrameContext",
    "InflatedConv",
    "ModelComponents",
    "PickleWeightsError",
    "SparseCausalAttnProcessor",
    "VideoTransformerBlock",
    "VideoUNet",
    "directory_digest",
    "ensure_safetensors",
    "load_components",
]
