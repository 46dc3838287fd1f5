"""The dataset upload path against a real S3 server (Ceph radosgw: real SigV4 and multipart).

The control plane runs under uvicorn on 127.0.0.1 and the client streams its body, so the streamed
multipart path is exercised end to end: HTTP chunks -> parser -> multipart S3 upload.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from services.common.settings import ControlPlaneSettings
from services.common.store.s3 import MinioStore
from services.controlplane.app import create_app
from tests.doubles import IdleExecutor

MakeStore = Callable[..., MinioStore]
BOUNDARY = "huvidpo-test-boundary-7f3a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(s3_endpoint: dict[str, str], make_s3_store: MakeStore, tmp_path: Path) -> Iterator[dict[str, Any]]:
    store = make_s3_store(s3_endpoint)
    settings = ControlPlaneSettings(
        work_dir=tmp_path / "work", dev_mode=True, max_upload_bytes=200 * 1024 * 1024
    )
    app = create_app(settings, store, IdleExecutor(), background=False)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield {"url": f"http://127.0.0.1:{port}", "store": store}
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def multipart_stream(files: list[tuple[str, Callable[[], Iterator[bytes]]]]) -> Iterator[bytes]:
    """A multipart/form-data body produced chunk by chunk (never whole in memory)."""
    for name, chunks in files:
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        yield from chunks()
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def test_streamed_multipart_upload_lands_in_s3_as_a_multipart_object(served: dict[str, Any]) -> None:
    url, store = served["url"], served["store"]
    size = 23 * 1024 * 1024 + 12345  # several S3 parts (the fixture's part size is 5 MiB)
    seed = os.urandom(1 << 20)
    digest = hashlib.sha256()
    for _ in range(size // len(seed)):
        digest.update(seed)
    digest.update(seed[: size % len(seed)])

    def big() -> Iterator[bytes]:
        for _ in range(size // len(seed)):
            yield seed
        yield seed[: size % len(seed)]

    with httpx.Client(base_url=url, timeout=120) as c:
        assert c.post("/v1/datasets", json={"name": "s3cats"}).status_code == 201
        up = c.post("/v1/datasets/s3cats/uploads").json()
        r = c.post(
            f"/v1/datasets/s3cats/uploads/{up['id']}/files",
            content=multipart_stream([("videos/big.mp4", big), ("notes.json", lambda: iter([b'{"a": 1}']))]),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        assert r.status_code == 200, r.text
        got = {f["path"]: f for f in r.json()["files"]}
        assert got["videos/big.mp4"]["size"] == size and got["videos/big.mp4"]["sha256"] == digest.hexdigest()
        info = store.stat(f"datasets/s3cats/uploads/{up['id']}/files/videos/big.mp4")
        assert info is not None and info.size == size and info.sha256 == digest.hexdigest()
        assert info.etag is not None and info.etag.strip('"').endswith("-5")  # a real 5-part upload
        metrics = c.get("/metrics").text
        assert "huvidpo_controlplane_upload_bytes_total" in metrics


def test_dataset_version_from_upload_and_from_presigned_puts(served: dict[str, Any], tmp_path: Path) -> None:
    from huvidpo.data import make_synthetic_dataset

    url, store = served["url"], served["store"]
    ds = make_synthetic_dataset(tmp_path / "ds", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    paths = [p for p in sorted(ds.rglob("*")) if p.is_file()]
    with httpx.Client(base_url=url, timeout=60) as c:
        c.post("/v1/datasets", json={"name": "s3ds"})
        body = multipart_stream(
            [(p.relative_to(ds).as_posix(), lambda p=p: iter([p.read_bytes()])) for p in paths]
        )
        r = c.post(
            "/v1/datasets/s3ds/versions",
            content=body,
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        assert r.status_code == 201, r.text
        v1 = r.json()
        assert store.exists(f"datasets/s3ds/{v1['id']}/manifest.json")

        # large sets: presigned PUTs straight to radosgw (real SigV4), then commit
        c.post("/v1/datasets", json={"name": "s3big"})
        up = c.post("/v1/datasets/s3big/uploads").json()
        rels = [p.relative_to(ds).as_posix() for p in paths]
        urls = c.post(f"/v1/datasets/s3big/uploads/{up['id']}/presign", json={"files": rels}).json()["urls"]
        for rel, put_url in urls.items():
            assert put_url.startswith("http://127.0.0.1") and "X-Amz-Signature" in put_url
            assert httpx.put(put_url, content=(ds / rel).read_bytes(), timeout=30).status_code == 200
        v2 = c.post(f"/v1/datasets/s3big/uploads/{up['id']}/commit", json={})
        assert v2.status_code == 201, v2.text
        assert v2.json()["id"] == v1["id"]  # same content, same digest, whatever the path it came by
        assert c.get(f"/v1/datasets/s3big/uploads/{up['id']}").status_code == 404  # the session is over
        # the presigned videos stay where they were put (hashed at commit: S3 holds them without a
        # sha256); the validation fetched them from there and decoded them
        manifest = store.get_json(f"datasets/s3big/{v2.json()['id']}/manifest.json")
        assert all(
            f["key"].startswith(f"datasets/s3big/uploads/{up['id']}/files/")
            for rel, f in manifest["files"].items()
            if rel.endswith(".mp4")
        )
        checked = c.get(f"/v1/datasets/s3big/versions/{v2.json()['id']}").json()
        assert checked["validation"]["state"] == "passed", checked["validation"]

        # A presigned URL cannot be revoked on S3, but it dies at commit all the same: it names a key
        # under the upload's presigned/ (moved into files/ at commit), which no version references.
        video = next(rel for rel in rels if rel.endswith(".mp4"))
        assert httpx.put(urls[video], content=b"other bytes", timeout=30).status_code == 200
        key = manifest["files"]["data/" + video]["key"]
        assert store.get_bytes(key) == (ds / video).read_bytes()
        assert store.get_bytes(f"datasets/s3big/uploads/{up['id']}/presigned/{video}") == b"other bytes"
        # deleting the version removes the upload, stray presigned objects included
        assert c.delete(f"/v1/datasets/s3big/versions/{v2.json()['id']}").status_code == 204
        assert store.list(f"datasets/s3big/uploads/{up['id']}/") == []
