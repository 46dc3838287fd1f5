"""Concurrent streamed uploads through a real uvicorn server: each one bounded, none starving the others.

Every upload holds one parser thread and applies backpressure to its client; many at once must not
exhaust a shared thread pool (which would deadlock producers waiting for room behind consumers
waiting for data).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn

from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from tests.doubles import IdleExecutor

BOUNDARY = "concurrent-upload-boundary"


class SlowStore(LocalStore):
    """A store that reads slowly, so every upload's queue fills and its producer must wait."""

    def put_stream(self, key, stream, length=None, content_type=None, metadata=None):  # type: ignore[no-untyped-def]
        class Slow:
            def read(self, n: int = -1) -> bytes:
                time.sleep(0.005)
                return stream.read(min(n, 256 * 1024) if n and n > 0 else 256 * 1024)

        return super().put_stream(key, Slow(), length, content_type, metadata)  # type: ignore[arg-type]


def test_many_concurrent_streamed_uploads_all_complete(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "store")
    app = create_app(
        ControlPlaneSettings(work_dir=tmp_path / "w", dev_mode=True), store, IdleExecutor(), background=False
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    size = 20 * 1024 * 1024
    data = os.urandom(size)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.post("/v1/datasets", json={"name": "many"}).status_code == 201
            uploads = [c.post("/v1/datasets/many/uploads").json()["id"] for _ in range(12)]

        def upload(upload_id: str) -> dict[str, object]:
            def body() -> Iterator[bytes]:
                yield (
                    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="v.mp4"\r\n\r\n'
                ).encode()
                for i in range(0, size, 64 * 1024):
                    yield data[i : i + 64 * 1024]
                yield f"\r\n--{BOUNDARY}--\r\n".encode()

            r = httpx.post(
                f"{url}/v1/datasets/many/uploads/{upload_id}/files",
                content=body(),
                headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            return dict(r.json()["files"][0])

        with concurrent.futures.ThreadPoolExecutor(len(uploads)) as pool:
            results = list(pool.map(upload, uploads, timeout=90))
        digest = hashlib.sha256(data).hexdigest()
        assert all(r["size"] == size and r["sha256"] == digest for r in results)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
