"""Request validation, canary routing and the stub freshness check of the inference service (no server)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from services.common.settings import InferenceSettings
from services.inference.errors import InvalidRequest
from services.inference.gen import inference_pb2 as pb
from services.inference.manager import CanaryRouter, adapter_name
from services.inference.protogen import GEN_DIR, generate
from services.inference.testing import image_bytes
from services.inference.validation import (
    check_prompt_tokens,
    check_request,
    decode_first_frame,
    parse_store_uri,
)

S = InferenceSettings(
    max_frames=16,
    min_side=32,
    max_side=256,
    max_steps=50,
    max_prompt_chars=100,
    default_height=128,
    default_width=192,
)


def req(**kw: object) -> pb.GenerateRequest:
    base: dict[str, object] = {"prompt": "a cat", "frames": 4, "height": 64, "width": 64, "steps": 2}
    base.update(kw)
    return pb.GenerateRequest(**base)  # type: ignore[arg-type]


def test_committed_stubs_match_the_proto() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp))}
    committed = {p.name: p.read_text() for p in GEN_DIR.iterdir() if p.is_file()}
    assert set(fresh) <= set(committed), f"missing stubs: {set(fresh) - set(committed)}; run `make proto`"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stubs out of date with protos/: {stale}; run `make proto` and commit"


def test_valid_request_fills_defaults_and_keeps_values() -> None:
    spec = check_request(req(frames=0, height=0, width=0, steps=0, seed=7), S)
    assert (spec.frames, spec.height, spec.width, spec.steps) == (
        S.default_frames,
        S.default_height,
        S.default_width,
        S.default_steps,
    )
    assert spec.seed == 7 and spec.guidance_scale == S.default_guidance_scale
    assert spec.output_format == pb.OUTPUT_FORMAT_MP4 and spec.fps == S.default_fps
    spec = check_request(req(guidance_scale=0.0, fps=12, output_format=pb.OUTPUT_FORMAT_GIF), S)
    assert spec.guidance_scale == 0.0 and spec.fps == 12 and spec.output_format == pb.OUTPUT_FORMAT_GIF


def test_unset_seed_draws_one() -> None:
    seeds = {check_request(req(), S).seed for _ in range(5)}
    assert len(seeds) > 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"frames": 1}, "frames must be between 2 and 16, got 1"),
        ({"frames": 17}, "frames must be between 2 and 16, got 17"),
        ({"height": 68}, "height must be divisible by 8"),
        ({"width": 100}, "width must be divisible by 8 (the VAE downsamples 8x), got 100; try 96 or 104"),
        ({"height": 16}, "height must be between 32 and 256 pixels, got 16"),
        ({"width": 512}, "width must be between 32 and 256 pixels, got 512"),
        ({"steps": 51}, "steps must be between 1 and 50, got 51"),
        ({"steps": -1}, "steps must be between 1 and 50, got -1"),
        ({"guidance_scale": -1.0}, "guidance_scale must be a finite number"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"seed": -5}, "seed must be between 0"),
        ({"fps": -2.0}, "fps must be in (0, 60]"),
        ({"prompt": "x" * 101}, "prompt is 101 characters; at most 100"),
        ({"negative_prompt": "x" * 101}, "negative_prompt is 101 characters; at most 100"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"output_format": 7}, "output_format 7 is unknown"),
        ({"first_frame_image": b""}, "first_frame_image is empty"),
    ],
)
def test_bad_field_names_what_to_fix(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_request(req(**fields), S)
    assert message in str(err.value)


def test_prompt_token_limit() -> None:
    spec = check_request(req(prompt="one two three four five"), S)
    check_prompt_tokens(spec, lambda t: len(t.split()) + 2, 16)
    with pytest.raises(InvalidRequest, match="prompt is 7 tokens; the text encoder takes at most 6"):
        check_prompt_tokens(spec, lambda t: len(t.split()) + 2, 6)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_image_formats_decode(fmt: str) -> None:
    im = decode_first_frame(image_bytes(40, 24, fmt), S)
    assert im.size == (40, 24) and im.mode == "RGB"


def test_image_limits_and_bad_images() -> None:
    small = S.model_copy(update={"max_image_bytes": 100, "max_image_pixels": 64 * 64})
    with pytest.raises(InvalidRequest, match=r"first_frame_image is \d+ bytes; at most 100 bytes"):
        decode_first_frame(image_bytes(64, 64), small)
    roomy = S.model_copy(update={"max_image_pixels": 64 * 64})
    with pytest.raises(InvalidRequest, match="is 128x64 = 8192 pixels; at most 4096"):
        decode_first_frame(image_bytes(128, 64), roomy)
    with pytest.raises(InvalidRequest, match="could not be decoded as PNG, JPEG or WebP"):
        decode_first_frame(b"\x89PNG\r\n\x1a\nnot really a png", S)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    with pytest.raises(InvalidRequest, match="is a GIF image; send PNG, JPEG or WebP"):
        decode_first_frame(buf.getvalue(), S)
    # A truncated PNG: the header parses, the pixels do not.
    with pytest.raises(InvalidRequest, match="could not be decoded"):
        decode_first_frame(image_bytes(64, 64)[:60], S)


def test_store_uri_must_name_our_bucket() -> None:
    assert parse_store_uri("s3://huvidpo/frames/a.png", "huvidpo") == "frames/a.png"
    with pytest.raises(InvalidRequest, match="bucket 'huvidpo'"):
        parse_store_uri("s3://other/frames/a.png", "huvidpo")
    with pytest.raises(InvalidRequest, match=r"must look like s3://huvidpo/<key>"):
        parse_store_uri("https://example.com/a.png", "huvidpo")


@pytest.mark.parametrize(("percent", "seed"), [(10, 1), (30, 2), (50, 3), (90, 4)])
def test_canary_router_split_is_close_to_percent(percent: int, seed: int) -> None:
    router = CanaryRouter(seed)
    n = 200
    hits = sum(router.choose("cur", "can", percent) == "can" for _ in range(n))
    expected = n * percent / 100
    sd = (n * percent / 100 * (1 - percent / 100)) ** 0.5
    assert abs(hits - expected) <= 4 * sd, (hits, expected)


def test_canary_router_edges() -> None:
    router = CanaryRouter(0)
    assert {router.choose("cur", "can", 0) for _ in range(50)} == {"cur"}
    assert {router.choose("cur", "can", 100) for _ in range(50)} == {"can"}
    assert {router.choose("cur", None, 60) for _ in range(50)} == {"cur"}


def test_adapter_names_are_valid_module_keys() -> None:
    assert adapter_name("ckpt-ft.1-200") == "ckpt_ckpt_ft_1_200"
    assert "." not in adapter_name("a.b.c")


@pytest.mark.parametrize(
    "data",
    [b"this is a text file, not an image", b"\x89PNG\r\n\x1a\nnot really a png", b"\x00" * 64],
)
def test_an_undecodable_first_frame_names_the_field_and_no_memory_address(data: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_first_frame(data, S, "first_frame_uri")
    message = str(info.value)
    assert message.startswith("first_frame_uri "), message
    assert "PNG, JPEG or WebP" in message
    assert "0x" not in message and "BytesIO" not in message and "<" not in message, message
