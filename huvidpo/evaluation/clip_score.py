"""Text-video alignment with a CLIP model read from a local directory (Hugging Face layout).

The directory is what ``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained`` write
(``config.json``, ``model.safetensors``, the tokenizer files and ``preprocessor_config.json`` or,
from transformers 5, ``processor_config.json``), e.g.
a downloaded ``openai/clip-vit-base-patch32`` snapshot. Nothing is downloaded: a directory that is
not complete is an error naming what is missing.

Score of a clip: the mean over frames (at most :data:`MAX_FRAMES`, evenly spaced) of the cosine
similarity between the frame's CLIP image embedding and the prompt's text embedding, in [-1, 1]
(CLIPScore without its 100x scale and clipping at 0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAX_FRAMES = 8


class ClipModelError(ValueError):
    """The configured CLIP directory cannot be loaded (the message names the directory and the file)."""


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output from get_*_features; 4.x returned the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """A CLIP model and its processor, loaded once, scoring clips against prompts."""

    def __init__(self, model: Any, processor: Any, device: str | torch.device = "cpu") -> None:
        self.model, self.processor, self.device = model, processor, torch.device(device)

    @classmethod
    def from_directory(
        cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu"
    ) -> ClipScorer:
        """Load ``CLIPModel`` and ``CLIPProcessor`` from ``directory`` (local files only)."""
        from transformers import CLIPModel, CLIPProcessor

        d = Path(directory)
        if not d.is_dir():
            raise ClipModelError(f"CLIP model directory {directory} does not exist")
        if not (d / "config.json").is_file():
            raise ClipModelError(f"CLIP model directory {directory} has no config.json (Hugging Face layout)")
        # transformers 4 writes the image settings to preprocessor_config.json, 5 to processor_config.json.
        if not any((d / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
            raise ClipModelError(
                f"CLIP model directory {directory} has no preprocessor_config.json (the image processor)"
            )
        try:
            model = CLIPModel.from_pretrained(str(d), local_files_only=True).to(device).eval()
            processor = CLIPProcessor.from_pretrained(str(d), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ClipModelError(f"CLIP model directory {directory} could not be loaded: {exc}") from exc
        return cls(model, processor, device)

    @torch.no_grad()
    def score(self, frames: np.ndarray, prompt: str) -> float:
        """Mean cosine similarity of ``frames (f, h, w, 3) uint8`` (up to MAX_FRAMES of them, evenly
        spaced) with ``prompt``."""
        idx = np.unique(np.linspace(0, len(frames) - 1, min(MAX_FRAMES, len(frames))).round().astype(int))
        images = [frames[i] for i in idx]
        tok = self.processor.tokenizer
        text = tok([prompt], padding="max_length", truncation=True, max_length=tok.model_max_length,
                   return_tensors="pt")  # fmt: skip
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        t = _features(self.model.get_text_features(input_ids=text["input_ids"].to(self.device)))
        v = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))
        t = torch.nn.functional.normalize(t.float(), dim=-1)
        v = torch.nn.functional.normalize(v.float(), dim=-1)
        return float((v @ t.T).mean())


def save_tiny_clip(directory: str | os.PathLike[str], seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny random CLIP (in the layout :meth:`ClipScorer.from_directory` reads): for tests and
    benchmarks, never for real scores."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    from huvidpo.models.tiny import tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or 1,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=8,
    )  # fmt: skip
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    d = Path(directory)
    CLIPModel(config).save_pretrained(str(d))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(d))
    return d
