"""Decoding a video is bounded: frame count, frame size and decoded pixels are checked from the
container's metadata before the first frame, and again while decoding (issue 16's dataset probes:
a 93 kB 512x512 MP4 of 2000 frames took the control plane to 3.3 GB; one of 100k 16x16 frames took
57 s; a manifest naming one file 2000 times decoded it 2000 times)."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient

from huvidpo.data import load_dataset
from huvidpo.data.clips import load_clip
from huvidpo.video_io import DEFAULT_VIDEO_LIMITS, VideoLimits, VideoTooLarge, decode_frames, read_video

MIB = 1024 * 1024


def still_video(frames: int, width: int, height: int, fmt: str = "mp4") -> bytes:
    """``frames`` identical grey frames, H.264 (fast: one frame converted, ultrafast preset)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "40"}
        frame = av.VideoFrame.from_ndarray(np.full((height * 3 // 2, width), 128, np.uint8), format="yuv420p")
        for i in range(frames):
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    out = {
        "long": still_video(5000, 16, 16),  # more frames than max_frames
        "big": still_video(2000, 512, 512),  # the probe: 524M decoded pixels
        "ok": still_video(8, 32, 32),
        "raw": still_video(50, 16, 16, fmt="h264"),  # a raw stream: no frame count, no duration
    }
    paths = {}
    for name, data in out.items():
        paths[name] = root / (name + (".h264" if name == "raw" else ".mp4"))
        paths[name].write_bytes(data)
    return paths


def _peak_traced(fn) -> int:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        with pytest.raises(VideoTooLarge) as err:
            fn()
        return tracemalloc.get_traced_memory()[1], str(err.value)  # type: ignore[return-value]
    finally:
        tracemalloc.stop()


def test_too_many_frames_is_refused_from_the_container_before_decoding(videos: dict[str, Path]) -> None:
    peak, message = _peak_traced(lambda: read_video(videos["long"]))  # type: ignore[misc]
    assert "long.mp4: 5000 frames (container) are more than max_frames = 4096" in message
    assert peak < MIB  # not one frame array was made


def test_too_many_decoded_pixels_is_refused_from_the_container(videos: dict[str, Path]) -> None:
    peak, message = _peak_traced(lambda: read_video(videos["big"]))  # type: ignore[misc]
    assert "big.mp4: 2000 frames of 512x512" in message
    assert f"more than max_decoded_pixels = {DEFAULT_VIDEO_LIMITS.max_decoded_pixels}" in message
    assert peak < MIB


def test_decoding_stops_at_the_limit_when_the_container_states_no_count(videos: dict[str, Path]) -> None:
    kept: list[np.ndarray] = []
    with pytest.raises(VideoTooLarge, match=r"11 frames \(decoded so far\) are more than max_frames = 10"):
        decode_frames(videos["raw"], kept.append, VideoLimits(max_frames=10))
    assert len(kept) == 10  # the decoder stopped at the first frame past the limit
    assert read_video(videos["raw"])[0].shape == (50, 16, 16, 3)  # within the defaults: whole


def test_frame_size_is_bounded(videos: dict[str, Path]) -> None:
    with pytest.raises(
        VideoTooLarge, match=r"512x512 = 262144 pixels \(container\) are more than max_frame_pixels"
    ):
        read_video(videos["big"], VideoLimits(max_frame_pixels=512 * 511))


def test_the_trainers_clip_loader_refuses_before_decoding(videos: dict[str, Path]) -> None:
    with pytest.raises(VideoTooLarge, match="max_decoded_pixels"):
        load_clip(videos["big"], num_frames=4, height=32, width=32)


def test_a_manifest_naming_one_file_many_times_decodes_it_once(
    tmp_path: Path, videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huvidpo.video_io

    (tmp_path / "v.mp4").write_bytes(videos["ok"].read_bytes())
    records = [{"id": f"v{i}", "file": "v.mp4", "prompt": "p"} for i in range(500)]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    calls: list[object] = []
    real = huvidpo.video_io.decode_frames

    def counting(source, on_frame, limits=DEFAULT_VIDEO_LIMITS):  # type: ignore[no-untyped-def]
        calls.append(source)
        return real(source, on_frame, limits)

    monkeypatch.setattr(huvidpo.video_io, "decode_frames", counting)
    ds = load_dataset(tmp_path)
    assert len(calls) == 1
    assert {v.num_frames for v in ds.videos.values()} == {8}


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS


def _peak_rss() -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_a_committed_oversized_video_fails_validation_naming_file_and_limit_within_budget(
    tmp_path: Path, videos: dict[str, Path]
) -> None:
    """The probe through the REST API: the version's validation (run inline here) names the file and
    the limit, and the control plane's memory (this process) grows by less than 100 MiB."""
    from services.common.settings import ControlPlaneSettings
    from services.common.store import LocalStore
    from services.controlplane.app import create_app
    from tests.doubles import IdleExecutor

    app = create_app(
        ControlPlaneSettings(work_dir=tmp_path / "work", dev_mode=True),
        LocalStore(tmp_path / "store"),
        IdleExecutor(),
        background=False,
    )
    client = TestClient(app)
    assert client.post("/v1/datasets", json={"name": "probe"}).status_code == 201
    manifest = "".join(
        json.dumps(r) + "\n"
        for r in [
            {"id": "big", "file": "videos/big.mp4", "prompt": "p"},
            {"id": "long", "file": "videos/long.mp4", "prompt": "p"},
            {"id": "ok", "file": "videos/ok.mp4", "prompt": "p"},
        ]
    )
    files = [
        ("files", ("manifest.jsonl", manifest.encode(), "application/jsonl")),
        *[("files", (f"videos/{n}.mp4", videos[n].read_bytes(), "video/mp4")) for n in ("big", "long", "ok")],
    ]
    _peak_rss_reset()
    before = _peak_rss()
    r = client.post("/v1/datasets/probe/versions", files=files)
    assert r.status_code == 201, r.text
    validation = client.get(f"/v1/datasets/probe/versions/{r.json()['id']}").json()["validation"]
    grown = _peak_rss() - before
    assert validation["state"] == "failed", validation
    problems = "\n".join(validation["problems"])
    assert "videos/big.mp4" in problems and "max_decoded_pixels" in problems, problems
    assert "videos/long.mp4" in problems and "max_frames = 4096" in problems, problems
    assert "videos/ok.mp4" not in problems
    assert str(tmp_path) not in problems
    assert grown < 100 * MIB, f"peak RSS grew by {grown / MIB:.0f} MiB"


def test_the_trainers_frame_count_is_bounded_too(videos: dict[str, Path]) -> None:
    from huvidpo.training.common import count_frames

    assert count_frames(videos["raw"]) == 50  # no count in the container: decoded, under the limit
    with pytest.raises(VideoTooLarge, match="5000 frames are more than max_frames = 4096"):
        count_frames(videos["long"])
