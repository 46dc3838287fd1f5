"""Latent and text-embedding cache: later epochs run no VAE and no text encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from huvidpo.data import LatentCache, load_clip, load_dataset, make_synthetic_dataset
from huvidpo.models import ModelComponents, directory_digest, load_components


@pytest.fixture(scope="module")
def components(tiny_model_dir: Path) -> ModelComponents:
    return load_components(tiny_model_dir)


@pytest.fixture(scope="module")
def digest(tiny_model_dir: Path) -> str:
    return directory_digest(tiny_model_dir)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("ds"), n_prompts=1, videos_per_prompt=2, num_frames=6
    )
    return [v.path for v in load_dataset(root).videos.values()]


def epoch(cache: LatentCache, videos: list[Path]) -> list[torch.Tensor]:
    out = [cache.clip_latents(v, num_frames=4, height=64, width=64, stride=1, start=1) for v in videos]
    out.append(cache.text_embedding("a square slides to the right"))
    return out


def test_second_epoch_runs_no_vae_and_no_text_encoder(
    tmp_path: Path, components: ModelComponents, digest: str, videos: list[Path]
) -> None:
    cache = LatentCache(tmp_path / "cache", components, digest)
    first = epoch(cache, videos)
    assert (cache.vae_calls, cache.text_calls, cache.hits) == (2, 1, 0)
    assert first[0].shape == (4, 4, 8, 8) and first[0].dtype == torch.float32
    assert first[2].shape == (
        components.tokenizer.model_max_length,
        components.text_encoder.config.hidden_size,
    )
    second = epoch(cache, videos)
    assert (cache.vae_calls, cache.text_calls, cache.hits) == (2, 1, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    # A new process (fresh cache object, same directory) reads the files: still no encoder calls.
    reopened = LatentCache(tmp_path / "cache", components, digest)
    third = epoch(reopened, videos)
    assert (reopened.vae_calls, reopened.text_calls, reopened.disk_hits) == (0, 0, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, third, strict=True))


def test_cached_latents_are_the_scaled_vae_posterior_mean(
    tmp_path: Path, components: ModelComponents, digest: str, videos: list[Path]
) -> None:
    cache = LatentCache(tmp_path / "cache", components, digest)
    got = cache.clip_latents(videos[0], 4, 64, 64, start=2, hflip=True)
    clip = load_clip(videos[0], 4, 64, 64, start=2, hflip=True)
    with torch.no_grad():
        want = components.vae.encode(clip.permute(1, 0, 2, 3)).latent_dist.mean * components.latent_scale
        tok = components.tokenizer
        ids = tok(
            ["a dog"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids
        text = components.text_encoder(ids)[0][0]
    assert torch.allclose(got, want.permute(1, 0, 2, 3), atol=1e-5)
    assert torch.allclose(cache.text_embedding("a dog"), text, atol=1e-6)


def test_changed_model_digest_or_sampling_misses(
    tmp_path: Path, components: ModelComponents, digest: str, videos: list[Path]
) -> None:
    cache = LatentCache(tmp_path / "cache", components, digest)
    cache.clip_latents(videos[0], 4, 64, 64)
    cache.text_embedding("p")
    other = LatentCache(tmp_path / "cache", components, "0" * 64)
    other.clip_latents(videos[0], 4, 64, 64)
    other.text_embedding("p")
    assert (other.vae_calls, other.text_calls, other.hits) == (1, 1, 0)
    for kwargs in ({"hflip": True}, {"start": 1}, {"stride": 2}):
        before = cache.vae_calls
        cache.clip_latents(videos[0], 2, 64, 64, **kwargs)
        cache.clip_latents(videos[0], 2, 64, 64, **kwargs)
        assert cache.vae_calls == before + 1


def test_changed_video_content_misses_and_a_corrupt_entry_is_recomputed(
    tmp_path: Path, components: ModelComponents, digest: str, videos: list[Path]
) -> None:
    clip = tmp_path / "v.mp4"
    clip.write_bytes(videos[0].read_bytes())
    cache = LatentCache(tmp_path / "cache", components, digest)
    a = cache.clip_latents(clip, 4, 64, 64)
    clip.write_bytes(videos[1].read_bytes())
    b = cache.clip_latents(clip, 4, 64, 64)
    assert cache.vae_calls == 2 and not torch.equal(a, b)
    files = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(files) == 2 and not list((tmp_path / "cache").rglob("*.tmp"))
    for f in files:
        f.write_bytes(b"truncated")
    fresh = LatentCache(tmp_path / "cache", components, digest)
    assert torch.allclose(fresh.clip_latents(clip, 4, 64, 64), b) and fresh.vae_calls == 1


def test_memory_is_bounded_least_recently_used_leave_and_come_back_from_disk(
    tmp_path: Path, components: ModelComponents, digest: str, videos: list[Path]
) -> None:
    """The in-memory part of the cache holds at most ``memory_bytes``: an evicted clip is read back
    from its file (no VAE call), equal to what was first computed."""
    one = 4 * 4 * 8 * 8 * 4  # a (4, 4, 8, 8) float32 latent
    cache = LatentCache(tmp_path / "cache", components, digest, memory_bytes=one)
    a = cache.clip_latents(videos[0], 4, 64, 64, start=1).clone()
    b = cache.clip_latents(videos[1], 4, 64, 64, start=1).clone()
    assert cache.stats()["entries"] == 1 and cache.stats()["memory_bytes"] <= one
    assert cache.evictions == 1
    again = cache.clip_latents(videos[0], 4, 64, 64, start=1)  # evicted: from disk
    assert (cache.vae_calls, cache.disk_hits) == (2, 1)
    assert torch.equal(again, a)
    assert torch.equal(cache.clip_latents(videos[0], 4, 64, 64, start=1), a)  # now in memory
    assert cache.disk_hits == 1 and cache.evictions == 2 and not torch.equal(a, b)


def test_bf16_memory_holds_the_rounded_latents_and_files_stay_float32(
    tmp_path: Path, components: ModelComponents, digest: str, videos: list[Path]
) -> None:
    full = LatentCache(tmp_path / "cache", components, digest).clip_latents(videos[0], 4, 64, 64, start=1)
    half = LatentCache(tmp_path / "cache", components, digest, memory_dtype=torch.bfloat16)
    got = half.clip_latents(videos[0], 4, 64, 64, start=1)
    assert half.disk_hits == 1 and got.dtype == torch.bfloat16
    assert torch.equal(got, full.to(torch.bfloat16))
    assert half.stats()["memory_bytes"] == full.numel() * 2
