"""Video and image I/O with real codecs: PyAV (libx264) for MP4, Pillow for GIF and images.

Frames are ``uint8`` arrays of shape ``(f, h, w, 3)``.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
from PIL import Image, ImageOps

ImageInput = str | os.PathLike[str] | bytes | Image.Image | np.ndarray


class VideoDecodeError(ValueError):
    """A file or byte string could not be decoded as a video."""


class ImageDecodeError(ValueError):
    """A file or byte string could not be decoded as an image."""


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (f, h, w, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    return frames


# libx264's CPU flags mapped to the names in /proc/cpuinfo. AVX-512 is left out on purpose: with its
# AVX-512 kernels x264 reads memory it did not initialise, so the same frames gave a different H.264
# stream whenever the process had reused its heap (after torch had run: 14 distinct outputs in 25
# encodes, measured). With the flags below (or none) every encode of the same frames is identical.
_X264_FLAGS = (
    ("MMX2", "mmx"),
    ("SSE", "sse"),
    ("SSE2", "sse2"),
    ("SSE3", "pni"),
    ("SSSE3", "ssse3"),
    ("SSE4.1", "sse4_1"),
    ("SSE4.2", "sse4_2"),
    ("AVX", "avx"),
    ("FMA3", "fma"),
    ("BMI1", "bmi1"),
    ("BMI2", "bmi2"),
    ("AVX2", "avx2"),
    ("LZCNT", "abm"),
)


@functools.cache
def _x264_asm() -> str:
    """The ``asm`` value for libx264: this CPU's x86 SIMD up to AVX2 on Linux, else ``0`` (plain C, about
    3x slower and deterministic everywhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return "0"
    have = set(line.partition(":")[2].split())
    flags = [x264 for x264, linux in _X264_FLAGS if linux in have]
    # x264 needs at least SSE2 for any of its x86 kernels; fall back to C on anything else (e.g. ARM).
    return ",".join(flags) if {"sse", "sse2"} <= have else "0"


def rgb_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """BT.601 limited-range ("tv") YUV 4:2:0 planes of ``(f, h, w, 3)`` uint8 RGB frames with even ``h`` and
    ``w``, in integer arithmetic. Returns ``(f, h * 3 // 2, w)`` uint8: the Y plane, then U and V (each
    ``(h/2, w/2)``) laid row after row, as FFmpeg's ``yuv420p``. Chroma is the rounded mean of each 2x2 block."""
    frames = _check_frames(frames)
    f, h, w, _ = frames.shape
    rgb = frames.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    u = -38 * r - 74 * g + 112 * b
    v = 112 * r - 94 * g - 18 * b

    def down(c: np.ndarray) -> np.ndarray:
        # mean of each 2x2 block in 1/256 units, rounded once: (sum / 4 + 128) / 256 + 128
        s = c.reshape(f, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
        return np.clip(((s + 512) >> 10) + 128, 16, 240)

    planes = np.empty((f, h * 3 // 2, w), np.uint8)
    planes[:, :h] = np.clip(y, 16, 235)
    planes[:, h:].reshape(f, 2, h // 2, w // 2)[:, 0] = down(u)
    planes[:, h:].reshape(f, 2, h // 2, w // 2)[:, 1] = down(v)
    return planes


def encode_mp4(frames: np.ndarray, fps: float = 8.0, crf: int = 18) -> bytes:
    """H.264 (yuv420p, BT.601 limited range) MP4 bytes. Width and height must be even.

    The same frames give the same bytes in every process: the RGB to YUV conversion is done here in
    integer arithmetic (not by swscale, whose threaded path gave different pixels from one process to
    the next), libx264 runs on one thread, so no scheduling decides its output, and without its AVX-512
    kernels (see ``_X264_FLAGS``). Machines of one kind give the same bytes; another CPU or FFmpeg
    build may give other bytes of the same quality."""
    frames = _check_frames(frames)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 needs even width and height, got {w}x{h}")
    yuv = rgb_to_yuv420p(frames)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count, stream.thread_type = 1, "NONE"
        stream.codec_context.colorspace = av.video.reformatter.Colorspace.ITU601
        stream.codec_context.color_range = av.video.reformatter.ColorRange.MPEG
        stream.options = {"crf": str(crf), "threads": "1", "x264-params": f"asm={_x264_asm()}"}
        for i, planes in enumerate(yuv):
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def encode_gif(frames: np.ndarray, fps: float = 8.0) -> bytes:
    """Looping animated GIF bytes. Pillow's ``duration`` is milliseconds per frame (not seconds,
    the reference code's bug that made GIFs play far too fast)."""
    frames = _check_frames(frames)
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=round(1000.0 / fps),
        loop=0,
        disposal=2,
    )
    return buf.getvalue()


def write_video(frames: np.ndarray, path: str | os.PathLike[str], fps: float = 8.0) -> Path:
    """Write ``frames`` to ``path``; the suffix (.mp4 or .gif) picks the format."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".mp4":
        data = encode_mp4(frames, fps)
    elif suffix == ".gif":
        data = encode_gif(frames, fps)
    else:
        raise ValueError(f"unsupported video format {suffix!r}: use .mp4 or .gif")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(p)
    return p


@dataclass(frozen=True)
class VideoLimits:
    """What decoding one video may cost. Checked from the container's metadata before the first frame
    is decoded (frame count, or duration x frame rate; frame size), and again while decoding, where the
    decoder stops at the first frame past a limit (metadata can be missing or lie)."""

    max_frames: int = 4096
    # one frame's width x height (4K UHD)
    max_frame_pixels: int = 3840 * 2160
    # width x height summed over every frame: what :func:`read_video` holds (3 bytes each, about 805 MB)
    max_decoded_pixels: int = 2**28


DEFAULT_VIDEO_LIMITS = VideoLimits()


class VideoTooLarge(VideoDecodeError):
    """A video past one of its :class:`VideoLimits`; the message names the file and the limit."""


def _declared_frames(stream: av.video.stream.VideoStream) -> int:
    """The frame count the container states (its frame count, else duration x frame rate; 0: none)."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and stream.time_base and rate:
        return int(float(stream.duration * stream.time_base * rate))
    return 0


def _check_limits(name: str, frames: int, width: int, height: int, limits: VideoLimits, when: str) -> None:
    if width * height > limits.max_frame_pixels:
        raise VideoTooLarge(
            f"{name}: frames of {width}x{height} = {width * height} pixels ({when}) are more than "
            f"max_frame_pixels = {limits.max_frame_pixels}"
        )
    if frames > limits.max_frames:
        raise VideoTooLarge(
            f"{name}: {frames} frames ({when}) are more than max_frames = {limits.max_frames}"
        )
    if frames * width * height > limits.max_decoded_pixels:
        raise VideoTooLarge(
            f"{name}: {frames} frames of {width}x{height} = {frames * width * height} decoded pixels ({when}) "
            f"are more than max_decoded_pixels = {limits.max_decoded_pixels}"
        )


def decode_frames(
    source: str | os.PathLike[str] | bytes | BinaryIO,
    on_frame: Callable[[np.ndarray], None],
    limits: VideoLimits = DEFAULT_VIDEO_LIMITS,
    wanted: Callable[[int], bool] | None = None,
    stop_after: int | None = None,
) -> tuple[int, float]:
    """Decode a video frame by frame, handing each ``(h, w, 3)`` uint8 frame to ``on_frame`` (which
    keeps what it needs); returns ``(frames decoded, fps)``. Raises :class:`VideoTooLarge` from the
    container's metadata before decoding, or at the first frame past ``limits``; ``VideoDecodeError``
    otherwise.

    ``wanted(i)`` (0-based frame index) False skips the RGB conversion of frame ``i`` (it is decoded,
    the codec needs it, but never copied out); decoding stops once ``stop_after`` frames were decoded,
    so a clip from the start of a long video costs only its span."""
    src: str | BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else source  # type: ignore[assignment]
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    name = _name(source)
    count, pixels = 0, 0
    try:
        with av.open(src, mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{name} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 8)
            ctx = stream.codec_context
            _check_limits(
                name, _declared_frames(stream), int(ctx.width), int(ctx.height), limits, "container"
            )
            for frame in container.decode(stream):
                count += 1
                pixels += frame.width * frame.height
                if count > limits.max_frames or pixels > limits.max_decoded_pixels:
                    _check_limits(name, count, frame.width, frame.height, limits, "decoded so far")
                    raise VideoTooLarge(  # frames of varying size: the sum is what counts
                        f"{name}: {pixels} decoded pixels in {count} frames are more than "
                        f"max_decoded_pixels = {limits.max_decoded_pixels}"
                    )
                _check_limits(name, 1, frame.width, frame.height, limits, "decoded")
                if wanted is None or wanted(count - 1):
                    on_frame(frame.to_ndarray(format="rgb24"))
                if stop_after is not None and count >= stop_after:
                    break
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoDecodeError(f"cannot decode video {name}: {exc}") from exc
    if not count:
        raise VideoDecodeError(f"{name} has no decodable frames")
    return count, fps


def read_video(
    source: str | os.PathLike[str] | bytes | BinaryIO, limits: VideoLimits = DEFAULT_VIDEO_LIMITS
) -> tuple[np.ndarray, float]:
    """Decode every frame of a video. Returns ``(frames (f, h, w, 3) uint8, fps)``. Raises
    :class:`VideoTooLarge` past ``limits`` (before decoding when the container says so)."""
    frames: list[np.ndarray] = []
    _, fps = decode_frames(source, frames.append, limits)
    return np.stack(frames), fps


def _name(source: object) -> str:
    return "<bytes>" if isinstance(source, bytes | io.IOBase) else str(source)


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, a PIL image or an ``(h, w, 3)`` uint8 array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
            raise ImageDecodeError(f"image array must be (h, w, 3) uint8, got {image.shape} {image.dtype}")
        return Image.fromarray(image[..., :3])
    try:
        src = io.BytesIO(image) if isinstance(image, bytes) else image
        with Image.open(src) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image {_name(image)}: {exc}") from exc


# Containers a first frame may come from (a dataset's clip): frame 0 is the image.
VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi"})


def load_first_frame(path: str | os.PathLike[str]) -> Image.Image:
    """A first frame from a file: an image (PNG, JPEG, GIF's first frame, ...) or frame 0 of a video
    (decoding stops there), as an RGB image. Raises ``FileNotFoundError``, :class:`ImageDecodeError` or
    ``VideoDecodeError``."""
    p = Path(path)
    if p.suffix.lower() not in VIDEO_SUFFIXES:
        return load_image(p)
    if not p.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(p))
    frames: list[np.ndarray] = []
    decode_frames(p, frames.append, stop_after=1)
    return Image.fromarray(frames[0])


def cover_size(src_width: int, src_height: int, height: int, width: int) -> tuple[int, int]:
    """``(width, height)`` in px an image of ``src_width x src_height`` is resized to (aspect kept) so it
    covers ``height x width``: what :func:`resize_center_crop` allocates before its crop. A thin image
    grows in both directions (600x1 to cover 32x1024 is 614400x1024), so a limit on decoded pixels must
    check this size, not only the image's own."""
    scale = max(width / src_width, height / src_height)
    return max(width, round(src_width * scale)), max(height, round(src_height * scale))


def resize_center_crop(image: Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
    """Aspect-preserving resize so the image covers ``height x width``, then a centre crop.
    Returns ``(height, width, 3)`` uint8."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    new_w, new_h = cover_size(im.width, im.height, height, width)
    im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return np.array(im.crop((left, top, left + width, top + height)).convert("RGB"), dtype=np.uint8)
