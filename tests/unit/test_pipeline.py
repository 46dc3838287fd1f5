"""First-frame-conditioned generation with the tiny model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from huvidpo.lora import load_lora, lora_config, save_lora, set_lora_scale
from huvidpo.models import load_components
from huvidpo.pipeline import GenerationCancelled, GenerationConfig, GenerationError, HuViDPOPipeline
from huvidpo.video_io import ImageDecodeError, read_video


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> HuViDPOPipeline:
    return HuViDPOPipeline.from_pretrained(tiny_model_dir)


def small(**kw: object) -> GenerationConfig:
    base: dict = dict(num_frames=4, height=64, width=64, steps=3, guidance_scale=7.5, seed=7)
    base.update(kw)
    return GenerationConfig(**base)


def image(h: int = 48, w: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(16, 120), w=st.integers(16, 120), seed=st.integers(0, 99))
def test_frame0_is_the_vae_round_trip_of_the_first_frame(
    pipe: HuViDPOPipeline, h: int, w: int, seed: int
) -> None:
    img = image(h, w, seed)
    result = pipe("a horse runs", img, small(height=64, width=56))
    latent = pipe.prepare_first_frame(img, 64, 56)
    round_trip = pipe.decode_latents(latent[:, :, None])[0, 0]
    assert result.frames.shape == (4, 64, 56, 3)
    assert np.array_equal(result.frames[0], round_trip)


def test_same_seed_gives_the_same_video_bit_for_bit(pipe: HuViDPOPipeline) -> None:
    a = pipe("a bird flies", image(), small(eta=0.5))
    b = pipe("a bird flies", image(), small(eta=0.5))
    c = pipe("a bird flies", image(), small(eta=0.5, seed=8))
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)


def test_batched_and_unbatched_guidance_agree(pipe: HuViDPOPipeline) -> None:
    a = pipe("rain", image(), small(cfg_batched=True))
    b = pipe("rain", image(), small(cfg_batched=False))
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)


def test_only_frames_after_the_first_are_denoised(pipe: HuViDPOPipeline) -> None:
    img = image()
    res = pipe("waterfall", img, small(latent_adain=False, hist_match=False))
    first = pipe.prepare_first_frame(img, 64, 64)
    torch.testing.assert_close(res.latents[:, :, 0], first, rtol=0, atol=0)
    assert not torch.allclose(res.latents[:, :, 1], first)


def test_options_change_the_output(pipe: HuViDPOPipeline) -> None:
    base = pipe("smile", image(), small())
    for option in (dict(latent_adain=False), dict(hist_match=False), dict(shared_noise_ratio=0.0)):
        other = pipe("smile", image(), small(**option))
        assert not np.array_equal(base.frames, other.frames), option


def test_first_frame_from_the_prompt_when_none_is_given(pipe: HuViDPOPipeline) -> None:
    res = pipe("fireworks", None, small())
    again = pipe("fireworks", None, small())
    assert res.frames.shape == (4, 64, 64, 3)
    assert np.array_equal(res.frames, again.frames)


def test_batch_of_requests_equals_single_requests(pipe: HuViDPOPipeline) -> None:
    cfg = small()
    single = [pipe.generate_batch([p], [image(seed=i)], cfg, seeds=[i])[0] for i, p in enumerate(["a", "b"])]
    batched = pipe.generate_batch(["a", "b"], [image(seed=0), image(seed=1)], cfg, seeds=[0, 1])
    for s, b in zip(single, batched, strict=True):
        torch.testing.assert_close(s.latents, b.latents, rtol=0, atol=1e-4)


def test_progress_callback_and_stop(pipe: HuViDPOPipeline) -> None:
    seen: list[tuple[int, int]] = []
    pipe("a", image(), small(steps=4), progress=lambda s, t: seen.append((s, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    calls = iter([False, False, True])
    with pytest.raises(GenerationCancelled, match="after 2 of 4"):
        pipe("a", image(), small(steps=4), should_stop=lambda: next(calls))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(height=60), "height must be a positive multiple of 8"),
        (dict(width=100), "width must be a positive multiple of 8"),
        (dict(num_frames=0), "frames must be between 2"),
        (dict(steps=0), "steps must be between 1"),
        (dict(steps=1000), "steps must be between 1 and 999"),
    ],
)
def test_bad_sizes_get_clear_errors(pipe: HuViDPOPipeline, kw: dict, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        pipe("a", image(), small(**kw))


def test_unreadable_image_gets_a_clear_error(pipe: HuViDPOPipeline) -> None:
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        pipe("a", b"this is not an image", small())


def test_too_long_prompt_is_refused(pipe: HuViDPOPipeline) -> None:
    with pytest.raises(GenerationError, match="tokens"):
        pipe("word " * 100, image(), small())


def test_image_bytes_of_any_aspect_are_accepted(pipe: HuViDPOPipeline) -> None:
    buf = io.BytesIO()
    Image.fromarray(image(30, 200)).save(buf, format="JPEG")
    assert pipe("a", buf.getvalue(), small()).frames.shape == (4, 64, 64, 3)


def test_lora_scale_zero_is_exactly_the_base_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    comps = load_components(tiny_model_dir)
    pipe = HuViDPOPipeline(comps)
    base = pipe("a", image(), small())
    unet = comps.unet
    unet.add_adapter(lora_config(rank=4, dropout=0.0), adapter_name="trained")
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_lora(unet, tmp_path / "adapter", adapter="trained")
    comps2 = load_components(tiny_model_dir)
    pipe2 = HuViDPOPipeline(comps2)
    load_lora(comps2.unet, tmp_path / "adapter", adapter="a1", scale=1.0)
    with_lora = pipe2("a", image(), small())
    assert not np.array_equal(with_lora.frames, base.frames)
    set_lora_scale(comps2.unet, "a1", 0.0)
    torch.testing.assert_close(pipe2("a", image(), small()).latents, base.latents, rtol=0, atol=0)


def test_loaded_lora_generates_deterministically_even_from_train_mode(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    comps = load_components(tiny_model_dir)
    comps.unet.add_adapter(lora_config(rank=4, dropout=0.5), adapter_name="d")
    save_lora(comps.unet, tmp_path / "ad", adapter="d")
    other = load_components(tiny_model_dir)
    load_lora(other.unet, tmp_path / "ad", adapter="d", scale=1.0)
    assert not any(m.training for m in other.unet.modules())
    other.unet.train()  # e.g. validation during training: sampling must still run without dropout
    pipe = HuViDPOPipeline(other)
    a, b = pipe("a", image(), small()), pipe("a", image(), small())
    assert np.array_equal(a.frames, b.frames)
    assert other.unet.training


def test_lora_with_foreign_keys_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    comps = load_components(tiny_model_dir)
    comps.unet.add_adapter(lora_config(rank=4, targets="temporal"), adapter_name="t")
    save_lora(comps.unet, tmp_path / "ad", adapter="t")
    other = load_components(tiny_model_dir)
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg_path.write_text(cfg_path.read_text().replace("attn_temp", "attn2"))
    with pytest.raises(ValueError, match="do not fit this UNet"):
        load_lora(other.unet, tmp_path / "ad", adapter="x")


def test_mp4_and_gif_outputs(pipe: HuViDPOPipeline, tmp_path: Path) -> None:
    res = pipe("a", image(), small(num_frames=5))
    mp4 = res.save(tmp_path / "v.mp4", fps=10)
    frames, fps = read_video(mp4)
    assert frames.shape == (5, 64, 64, 3)
    assert fps == pytest.approx(10)
    assert mp4.read_bytes()[4:8] == b"ftyp"
    gif = res.save(tmp_path / "v.gif", fps=10)
    with Image.open(gif) as im:
        assert im.n_frames == 5
        assert im.info["duration"] == 100  # milliseconds per frame at 10 fps
        assert im.info["loop"] == 0


def _histogram_match_by_unique(frame: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The per-pixel implementation the lookup tables replaced (the reference for equality)."""
    out = np.empty_like(frame)
    for c in range(3):
        src, ref = frame[..., c].ravel(), reference[..., c].ravel()
        _, s_idx, s_counts = np.unique(src, return_inverse=True, return_counts=True)
        r_vals, r_counts = np.unique(ref, return_counts=True)
        s_cdf = np.cumsum(s_counts) / src.size
        r_cdf = np.cumsum(r_counts) / ref.size
        mapped = np.interp(s_cdf, r_cdf, r_vals)
        out[..., c] = np.clip(np.rint(mapped[s_idx]), 0, 255).reshape(frame.shape[:2]).astype(np.uint8)
    return out


def test_histogram_matching_by_lookup_table_equals_the_per_pixel_matching() -> None:
    from huvidpo.pipeline import histogram_match, histogram_match_frames

    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (6, 24, 32, 3), dtype=np.uint8)
    video[2] //= 7  # few grey levels
    video[3, ..., 1] = 200  # one level only
    video[4] = np.clip(video[4].astype(int) + 90, 0, 255).astype(np.uint8)  # shifted
    reference = video[0].copy()
    want = np.stack([video[0]] + [_histogram_match_by_unique(f, reference) for f in video[1:]])
    assert np.array_equal(histogram_match(video[2], reference), want[2])
    got = video.copy()
    histogram_match_frames(got[1:], got[0])
    assert np.array_equal(got, want)


def test_adain_over_all_frames_at_once_equals_frame_by_frame() -> None:
    from huvidpo.pipeline import adain

    x = torch.randn(2, 4, 6, 8, 8) * 3 + 1
    ref = x[:, :, 1:2]
    want = torch.stack([adain(x[:, :, f], x[:, :, 1]) for f in range(2, 6)], dim=2)
    torch.testing.assert_close(adain(x[:, :, 2:], ref), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_first_frames_from_text_run_in_one_batch_and_match_one_at_a_time(
    pipe: HuViDPOPipeline, eta: float
) -> None:
    cfg = small(eta=eta)
    prompts, seeds = ["a red kite", "waves at night", "a dog runs"], [3, 11, 5]
    image = np.full((32, 32, 3), 120, dtype=np.uint8)
    frames: list[np.ndarray | None] = [None, image, None]
    calls: list[int] = []
    unet = pipe.components.unet
    real = unet.forward

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("spatial_only"):
            calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    unet.forward = counting  # type: ignore[method-assign]
    try:
        batch = pipe.generate_batch(prompts, frames, cfg, seeds=seeds)  # type: ignore[arg-type]
    finally:
        del unet.forward
    steps = cfg.first_frame_steps or cfg.steps
    assert len(calls) == steps and set(calls) == {4}  # one UNet call per step for both prompts (x2 for CFG)
    for i in (0, 2):
        alone = pipe.generate_batch([prompts[i]], [None], cfg, seeds=[seeds[i]])[0]
        torch.testing.assert_close(batch[i].latents[:, :, 0], alone.latents[:, :, 0], rtol=1e-4, atol=1e-4)
        assert np.abs(batch[i].frames.astype(int) - alone.frames.astype(int)).max() <= 2
