"""Request validation: a ``GenerateRequest`` becomes a ``GenerationSpec`` or an ``InvalidRequest``
whose message names the field and says what to fix. Pure functions, no gRPC and no model."""

from __future__ import annotations

import io
import math
import re
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from huvidpo.video_io import cover_size
from services.common.settings import InferenceSettings
from services.inference.errors import InvalidRequest
from services.inference.gen import inference_pb2 as pb

ACCEPTED_IMAGE_FORMATS = {"PNG", "JPEG", "WEBP"}
MAX_GUIDANCE_SCALE = 50.0
MAX_FPS = 60.0
MAX_SEED = 2**63 - 1
# "<_io.BytesIO object at 0x7fb1...>" and the like: Pillow puts object reprs in its messages.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass
class GenerationSpec:
    """A validated request. ``image`` is the decoded first frame (None: generated from the prompt)."""

    prompt: str
    negative_prompt: str
    frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    checkpoint_id: str
    output_format: int
    fps: float
    image: Image.Image | None = None
    image_bytes: bytes | None = None
    image_uri: str = ""


def _or_default(value: int, default: int) -> int:
    return default if value == 0 else value


def check_request(req: pb.GenerateRequest, s: InferenceSettings) -> GenerationSpec:
    """Check every scalar field of ``req`` against the bounds in ``s`` and fill defaults."""
    if len(req.prompt) > s.max_prompt_chars:
        raise InvalidRequest(
            f"prompt is {len(req.prompt)} characters; at most {s.max_prompt_chars} are accepted"
        )
    if len(req.negative_prompt) > s.max_prompt_chars:
        raise InvalidRequest(
            f"negative_prompt is {len(req.negative_prompt)} characters; at most {s.max_prompt_chars} are accepted"
        )
    if not req.prompt.strip():
        raise InvalidRequest("prompt is empty: describe the video to generate")
    frames = _or_default(req.frames, s.default_frames)
    if not 2 <= frames <= s.max_frames:
        raise InvalidRequest(f"frames must be between 2 and {s.max_frames}, got {frames}")
    sides = {
        "height": _or_default(req.height, s.default_height),
        "width": _or_default(req.width, s.default_width),
    }
    for name, value in sides.items():
        if not s.min_side <= value <= s.max_side:
            raise InvalidRequest(f"{name} must be between {s.min_side} and {s.max_side} pixels, got {value}")
        if value % 8:
            raise InvalidRequest(
                f"{name} must be divisible by 8 (the VAE downsamples 8x), got {value}; "
                f"try {value - value % 8} or {value - value % 8 + 8}"
            )
    steps = _or_default(req.steps, s.default_steps)
    if not 1 <= steps <= s.max_steps:
        raise InvalidRequest(f"steps must be between 1 and {s.max_steps}, got {steps}")
    guidance = req.guidance_scale if req.HasField("guidance_scale") else s.default_guidance_scale
    if not (math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE_SCALE):
        raise InvalidRequest(
            f"guidance_scale must be a finite number in [0, {MAX_GUIDANCE_SCALE:g}], got {guidance}"
        )
    if req.HasField("seed"):
        if not 0 <= req.seed <= MAX_SEED:
            raise InvalidRequest(f"seed must be between 0 and {MAX_SEED}, got {req.seed}")
        seed = req.seed
    else:
        seed = secrets.randbelow(2**31)
    fps = req.fps if req.fps != 0 else s.default_fps
    if not (math.isfinite(fps) and 0 < fps <= MAX_FPS):
        raise InvalidRequest(f"fps must be in (0, {MAX_FPS:g}], got {fps}")
    fmt = req.output_format or pb.OUTPUT_FORMAT_MP4
    if fmt not in (pb.OUTPUT_FORMAT_MP4, pb.OUTPUT_FORMAT_GIF):
        raise InvalidRequest(
            f"output_format {req.output_format} is unknown; use OUTPUT_FORMAT_MP4 or OUTPUT_FORMAT_GIF"
        )
    which = req.WhichOneof("first_frame")
    spec = GenerationSpec(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        frames=frames,
        height=sides["height"],
        width=sides["width"],
        steps=steps,
        guidance_scale=float(guidance),
        seed=int(seed),
        checkpoint_id=req.checkpoint_id.strip(),
        output_format=int(fmt),
        fps=float(fps),
    )
    if which == "first_frame_image":
        if not req.first_frame_image:
            raise InvalidRequest(
                "first_frame_image is empty: send PNG, JPEG or WebP bytes, or leave it unset"
            )
        spec.image_bytes = req.first_frame_image
    elif which == "first_frame_uri":
        spec.image_uri = req.first_frame_uri
    return spec


def check_prompt_tokens(spec: GenerationSpec, count_tokens: Callable[[str], int], max_tokens: int) -> None:
    """The prompt and negative prompt must fit the text encoder (``count_tokens`` includes BOS/EOS)."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(spec, name)
        if not text:
            continue
        n = count_tokens(text)
        if n > max_tokens:
            raise InvalidRequest(
                f"{name} is {n} tokens; the text encoder takes at most {max_tokens} (including start and end): shorten it"
            )


def parse_store_uri(uri: str, bucket: str) -> str:
    """The object key of ``s3://{bucket}/{key}``; the bucket must be the service's own."""
    prefix = f"s3://{bucket}/"
    if not uri.startswith("s3://"):
        raise InvalidRequest(f"first_frame_uri must look like {prefix}<key>, got {uri!r}")
    if not uri.startswith(prefix) or len(uri) == len(prefix):
        raise InvalidRequest(
            f"first_frame_uri must name an object in bucket {bucket!r} ({prefix}<key>), got {uri!r}"
        )
    return uri[len(prefix) :]


def decode_first_frame(
    data: bytes,
    s: InferenceSettings,
    field: str = "first_frame_image",
    height: int | None = None,
    width: int | None = None,
) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes into an RGB image, refusing oversized bytes or pixel counts before
    decoding the pixels (the header gives the size). With ``height`` and ``width`` (the video's frame
    size) the image resized to cover that frame must fit ``max_image_pixels`` too: a thin image
    grows in both directions when it is resized (see ``huvidpo.video_io.cover_size``)."""
    if len(data) > s.max_image_bytes:
        raise InvalidRequest(f"{field} is {len(data)} bytes; at most {s.max_image_bytes} bytes are accepted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or "unknown"
            if fmt not in ACCEPTED_IMAGE_FORMATS:
                raise InvalidRequest(f"{field} is a {fmt} image; send PNG, JPEG or WebP")
            w, h = im.size
            if w * h > s.max_image_pixels:
                raise InvalidRequest(
                    f"{field} is {w}x{h} = {w * h} pixels; at most {s.max_image_pixels} pixels are accepted"
                )
            if height is not None and width is not None:
                cw, ch = cover_size(w, h, height, width)
                if cw * ch > s.max_image_pixels:
                    raise InvalidRequest(
                        f"{field} is {w}x{h}: resized to cover the {width}x{height} frame it would be "
                        f"{cw}x{ch} = {cw * ch} pixels; at most {s.max_image_pixels} pixels "
                        "(max_image_pixels) are accepted: send an image closer to the frame's aspect ratio"
                    )
            im.load()
            return im.convert("RGB")
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(f"{field} has too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidRequest(
            f"{field} could not be decoded as PNG, JPEG or WebP: its bytes are not an image of a known format"
        ) from exc
    except Exception as exc:
        reason = _OBJECT_REPR.sub("", str(exc)).strip() or type(exc).__name__
        raise InvalidRequest(f"{field} could not be decoded as PNG, JPEG or WebP: {reason}") from exc
