"""Latent and text-embedding cache: each clip is VAE-encoded once, each prompt text-encoded once.

The reference code ran the VAE on both clips and the text encoder twice on every step of every epoch
(its defect §8.12). Here an entry's key is a sha256 over

- clips: the video file's content digest, every sampling parameter (frames, size, stride, start, flip)
  and the model digest;
- prompts: the prompt text and the model digest,

so a changed video, sampling or model can never return a stale entry. Entries live in memory and as
safetensors files under ``cache_dir`` (``latents/``, ``text/``), each written atomically, so the cache
survives restarts and a killed run never leaves a truncated file behind under a final name.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from huvidpo.data.clips import load_clip
from huvidpo.data.manifest import file_sha256

if TYPE_CHECKING:
    from huvidpo.models import ModelComponents

CACHE_FORMAT = 1


DEFAULT_MEMORY_BYTES = 4 << 30


class LatentCache:
    """Cache of VAE latents of clips and text-encoder embeddings of prompts for one model.

    Files hold float32. In memory, entries are kept in ``memory_dtype`` (bf16 halves a GPU run's
    host memory) and, with ``pin``, in page-locked memory so ``.to(cuda, non_blocking=True)`` copies
    them asynchronously; the entries held in memory are bounded by ``memory_bytes`` (least recently
    used leave first; they are read again from ``cache_dir``). Returned tensors are on the CPU in
    ``memory_dtype``, not to be changed in place (callers copy them to their device). Counters:
    ``vae_calls`` (clips encoded by the VAE), ``text_calls`` (prompts run through the text encoder),
    ``hits`` (answers from memory or disk), ``disk_hits`` (the part of ``hits`` read from
    ``cache_dir``), ``evictions``."""

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        components: ModelComponents,
        model_digest: str,
        vae_batch: int = 16,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        memory_dtype: torch.dtype = torch.float32,
        pin: bool = False,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.components = components
        self.model_digest = model_digest
        self.vae_batch = vae_batch
        self.memory_bytes = int(memory_bytes)
        self.memory_dtype = memory_dtype
        self.pin = pin
        self.vae_calls = 0
        self.text_calls = 0
        self.hits = 0
        self.disk_hits = 0
        self.evictions = 0
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._held = 0
        self._file_digests: dict[tuple[str, int, int], str] = {}

    # -- keys --------------------------------------------------------------------------------------
    def _key(self, payload: dict[str, object]) -> str:
        import hashlib

        payload = {**payload, "model": self.model_digest, "format": CACHE_FORMAT}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def file_digest(self, path: str | os.PathLike[str]) -> str:
        """sha256 of a file's content, remembered while its size and mtime stay the same."""
        p = Path(path).resolve()
        st = p.stat()
        memo = (str(p), st.st_size, st.st_mtime_ns)
        if memo not in self._file_digests:
            self._file_digests[memo] = file_sha256(p)
        return self._file_digests[memo]

    def clip_key(
        self,
        path: str | os.PathLike[str],
        num_frames: int,
        height: int,
        width: int,
        stride: int = 1,
        start: int = 0,
        hflip: bool = False,
    ) -> str:
        """The cache key of one clip (content + sampling + model)."""
        return self._key(
            {
                "kind": "clip",
                "file_sha256": self.file_digest(path),
                "num_frames": num_frames,
                "height": height,
                "width": width,
                "stride": stride,
                "start": start,
                "hflip": bool(hflip),
            }
        )

    def text_key(self, prompt: str) -> str:
        """The cache key of one prompt (text + model)."""
        return self._key({"kind": "text", "prompt": prompt})

    # -- storage -----------------------------------------------------------------------------------
    def _file(self, kind: str, key: str) -> Path:
        return self.cache_dir / kind / key[:2] / f"{key}.safetensors"

    def _lookup(self, kind: str, key: str) -> torch.Tensor | None:
        if key in self._memory:
            self.hits += 1
            self._memory.move_to_end(key)
            return self._memory[key]
        f = self._file(kind, key)
        if f.is_file():
            try:
                t = load_file(f)["value"]
            except (SafetensorError, OSError, KeyError):
                return None  # unreadable: recompute and overwrite
            self.hits += 1
            self.disk_hits += 1
            return self._remember(key, t)
        return None

    def _remember(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """Hold ``value`` in memory (as ``memory_dtype``, pinned with ``pin``) within ``memory_bytes``;
        returns the held tensor (or the converted one when it alone is over the bound)."""
        held = value.to(self.memory_dtype).contiguous()
        if self.pin:
            held = held.pin_memory()
        size = held.numel() * held.element_size()
        if size > self.memory_bytes:
            return held
        old = self._memory.pop(key, None)
        if old is not None:
            self._held -= old.numel() * old.element_size()
        while self._memory and self._held + size > self.memory_bytes:
            _, gone = self._memory.popitem(last=False)
            self._held -= gone.numel() * gone.element_size()
            self.evictions += 1
        self._memory[key] = held
        self._held += size
        return held

    def _store(self, kind: str, key: str, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().to("cpu", torch.float32).contiguous()
        f = self._file(kind, key)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
        try:
            save_file({"value": value}, str(tmp), metadata={"model_digest": self.model_digest, "kind": kind})
            os.replace(tmp, f)
        finally:
            tmp.unlink(missing_ok=True)
        return self._remember(key, value)

    # -- public API --------------------------------------------------------------------------------
    @torch.no_grad()
    def clip_latents(
        self,
        path: str | os.PathLike[str],
        num_frames: int,
        height: int,
        width: int,
        stride: int = 1,
        start: int = 0,
        hflip: bool = False,
    ) -> torch.Tensor:
        """Scaled VAE latents (posterior mean x ``latent_scale``) of one clip:
        ``(4, num_frames, height / 8, width / 8)`` on the CPU in ``memory_dtype`` (the held entry itself:
        copy it, do not change it). The frames go through the VAE as one batch (in chunks of
        ``vae_batch``)."""
        key = self.clip_key(path, num_frames, height, width, stride, start, hflip)
        hit = self._lookup("latents", key)
        if hit is not None:
            return hit
        clip = load_clip(path, num_frames, height, width, stride=stride, start=start, hflip=hflip)
        vae: Any = self.components.vae  # diffusers' AutoencoderKL is untyped for mypy
        frames = clip.permute(1, 0, 2, 3).to(vae.device, vae.dtype)  # (f, 3, h, w)
        means = [
            vae.encode(frames[i : i + self.vae_batch]).latent_dist.mean
            for i in range(0, len(frames), self.vae_batch)
        ]
        latents = torch.cat(means) * self.components.latent_scale  # (f, 4, h/8, w/8)
        self.vae_calls += 1
        return self._store("latents", key, latents.permute(1, 0, 2, 3))

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """Text-encoder hidden states of ``prompt`` padded to the tokenizer's max length: ``(seq, dim)``
        on the CPU in ``memory_dtype`` (the held entry itself: copy it, do not change it)."""
        key = self.text_key(prompt)
        hit = self._lookup("text", key)
        if hit is not None:
            return hit
        tok, enc = self.components.tokenizer, self.components.text_encoder
        ids = tok(
            [prompt],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(enc.device)
        emb = enc(ids)[0][0]
        self.text_calls += 1
        return self._store("text", key, emb)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """``(len(prompts), seq, dim)``: :meth:`text_embedding` of each prompt, stacked."""
        return torch.stack([self.text_embedding(p) for p in prompts])

    def clear_memory(self) -> None:
        """Forget the in-memory copies (the files stay), e.g. to prove the disk cache works."""
        self._memory.clear()
        self._held = 0

    def stats(self) -> dict[str, int]:
        """Counters and the number of entries held in memory."""
        return {
            "vae_calls": self.vae_calls,
            "text_calls": self.text_calls,
            "hits": self.hits,
            "disk_hits": self.disk_hits,
            "entries": len(self._memory),
            "memory_bytes": self._held,
            "evictions": self.evictions,
        }
