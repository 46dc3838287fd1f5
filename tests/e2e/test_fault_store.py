"""The object store briefly unavailable during an upload: the control plane (a process on the real S3
server, reached through a proxy the test cuts) answers a retryable 503 problem+json, publishes no
partial dataset version, and the same upload retried after the outage commits one version."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from demo.loop import LoopOptions, make_rated_videos
from tests.e2e.harness import fresh_bucket_env

pytestmark = pytest.mark.slow


class CutMidway(io.RawIOBase):
    """A file that takes the store down after its first ``chunk`` bytes went out."""

    def __init__(self, data: bytes, on_cut: Any, chunk: int = 64 * 1024) -> None:
        self.buf = io.BytesIO(data)
        self.on_cut = on_cut
        self.chunk = chunk
        self.sent = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.sent >= self.chunk and self.on_cut is not None:
            self.on_cut()
            self.on_cut = None
        data = self.buf.read(self.chunk if n is None or n < 0 else min(n, self.chunk))
        self.sent += len(data)
        return data


def test_store_unavailable_during_upload_gives_retryable_503_and_no_partial_version(
    make_stack: Any, s3_endpoint: dict[str, str], tcp_proxy: Any, tmp_path: Path
) -> None:
    proxy = tcp_proxy(s3_endpoint["endpoint"])
    env = fresh_bucket_env({**s3_endpoint, "endpoint": proxy.endpoint}, timeout_seconds="3")
    running = make_stack(store_env=env, inference=False)
    cp = running.cp
    cp.datasets.create("outage")
    data = make_rated_videos(
        tmp_path / "videos", LoopOptions(prompts=1, videos_per_prompt=2, video_frames=4, video_size=32)
    )
    files = sorted(p for p in data.rglob("*") if p.is_file())
    # one large part first, so the outage starts while the control plane streams it into the store
    big = bytes(range(256)) * (24 * 1024)  # 6 MiB: more than one S3 multipart part
    parts: list[tuple[str, tuple[str, Any, str]]] = [
        ("files", ("videos/zz_big.mp4", CutMidway(big, proxy.down, 2 * 1024 * 1024), "video/mp4"))
    ]
    parts += [
        ("files", (p.relative_to(data).as_posix(), p.read_bytes(), "application/octet-stream")) for p in files
    ]

    # the one-request upload route (not the SDK's sessions): the outage hits one streamed request
    r = cp.http.client.post("/v1/datasets/outage/versions", files=parts, timeout=120)
    assert r.status_code == 503, r.text[:500]
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "Retry-After" in r.headers
    body = r.json()
    assert body["status"] == 503 and "retry" in body["detail"].lower()

    proxy.up()
    # no version was published, not even a partial one
    assert cp.datasets.versions("outage") == []
    assert not [
        k
        for k in (o.key for o in running.store.list("datasets/outage/", recursive=True))
        if k.endswith("manifest.json") and "/uploads/" not in k
    ]

    # the same upload after the outage: one complete version
    parts[0] = ("files", ("videos/zz_big.mp4", big, "video/mp4"))
    r = cp.http.client.post("/v1/datasets/outage/versions", files=parts, timeout=120)
    assert r.status_code == 201, r.text[:500]
    version = r.json()
    assert version["videos"] == 2
    assert "data/videos/zz_big.mp4" in version["files"] and version["files"]["data/videos/zz_big.mp4"][
        "size"
    ] == len(big)
    assert [v["id"] for v in cp.datasets.versions("outage")] == [version["id"]]
    # The version references the video where the upload staged it (no copy at commit).
    stored = running.store.get_json(f"datasets/outage/{version['id']}/manifest.json")
    meta = stored["files"]["data/videos/zz_big.mp4"]
    key = meta.get("key", f"datasets/outage/{version['id']}/data/videos/zz_big.mp4")
    assert running.store.get_bytes(key) == big
    assert running.stack.controlplane.alive()
