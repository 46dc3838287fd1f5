"""Video UNet (inflated SD-1.x UNet), temporal-spatial layers and model directories."""

from huvidpo.models.components import ModelComponents, directory_digest, load_components
from huvidpo.models.layers import FrameContext, InflatedConv, SparseCausalAttnProcessor, VideoTransformerBlock
from huvidpo.models.video_unet import (
    DEFAULT_STAGE1_PATTERNS,
    PickleWeightsError,
    VideoUNet,
    ensure_safetensors,
)

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
