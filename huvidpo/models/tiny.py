"""Tiny randomly initialised models in SD-1.x layout, built from configs with no network access.

Used by tests, benchmarks and the demo. The VAE keeps SD's 8x spatial downsampling (four blocks) so
size rules are the same as for the real model; everything else is as small as it can be.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from huvidpo.models.components import ModelComponents
from huvidpo.models.layers import SparseCausalMode
from huvidpo.models.video_unet import VideoUNet

TINY_TEXT_LEN = 77
TINY_TEXT_DIM = 32

SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}

TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": TINY_TEXT_DIM,
    # In UNet2DConditionModel this legacy name is the number of heads.
    "attention_head_dim": 2,
    "norm_num_groups": 32,
}

SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def tiny_tokenizer(model_max_length: int = TINY_TEXT_LEN) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer built in memory: 256 byte symbols, the same with ``</w>``, a
    few merges and the two special tokens. Any text tokenizes; nothing is downloaded."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("o", "n</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_components(seed: int = 0, sparse_causal: SparseCausalMode = "first+prev") -> ModelComponents:
    """Build a complete tiny model (random weights, seeded) in memory."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TINY_TEXT_LEN,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or 1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )
    unet2d = UNet2DConditionModel(**TINY_UNET_CONFIG)
    unet = VideoUNet.from_unet2d(unet2d, sparse_causal=sparse_causal)
    for m in (vae, text_encoder, unet):
        m.eval()
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    return ModelComponents(unet, vae, text_encoder, tokenizer, dict(SD_SCHEDULER_CONFIG))


# The tiny random VAE's latents have about unit variance at this scaling factor (SD-1.x picks its 0.18215
# for the same reason); the demo's learning recipe and the learning tests train on it.
UNIT_VARIANCE_LATENT_SCALE = 3.0


def write_tiny_model(
    directory: str | os.PathLike[str], seed: int = 0, unet_2d: bool = False, latent_scale: float | None = None
) -> Path:
    """Write a complete tiny model directory (diffusers layout, safetensors) and return its path.

    ``unet_2d``: ``unet/`` holds a plain SD-1.x ``UNet2DConditionModel`` (seeded random weights) in
    place of the VideoUNet, as a Stable Diffusion checkpoint does; ``load_components`` inflates it.
    ``latent_scale``: the VAE's ``scaling_factor`` (default SD's 0.18215; :data:`UNIT_VARIANCE_LATENT_SCALE`
    gives this random VAE's latents about unit variance, on which a DPO fine-tune learns quickly)."""
    import json
    import shutil

    d = Path(directory)
    comps = tiny_components(seed)
    if latent_scale is not None:
        comps.vae.register_to_config(scaling_factor=float(latent_scale))
    comps.save_pretrained(d)
    if unet_2d:
        shutil.rmtree(d / "unet")
        torch.manual_seed(seed)
        UNet2DConditionModel(**TINY_UNET_CONFIG).save_pretrained(d / "unet", safe_serialization=True)
        index = json.loads((d / "model_index.json").read_text())
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        (d / "model_index.json").write_text(json.dumps(index, indent=2))
    return d
