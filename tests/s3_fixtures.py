"""S3 servers for tests, shared by the integration and e2e tests through tests/conftest.py.

S3 fixtures (reusable by any integration test):
- ``s3_endpoint``: a real Ceph radosgw (``scripts/ceph-s3.sh``), real SigV4 and multipart. A dict
  ``{"endpoint": "127.0.0.1:PORT", "access_key", "secret_key", "region", "url", "cluster_dir"}``. Skips only when the
  Ceph binaries are not installed (apt: radosgw ceph-mon ceph-osd); a cluster that fails to start fails.
- ``moto_s3_endpoint``: moto's in-thread S3 double, same dict shape. Fast, but it accepts any
  signature: use it for behaviour, not for auth.
- ``make_s3_store``: ``make_s3_store(endpoint_dict, **kwargs) -> MinioStore`` on a fresh bucket, emptied
  and removed at teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.store.s3 import MinioStore

REPO = Path(__file__).resolve().parents[1]
CEPH_SCRIPT = REPO / "scripts" / "ceph-s3.sh"
CEPH_BINARIES = ("radosgw", "ceph-mon", "ceph-osd", "radosgw-admin", "monmaptool", "ceph")
RADOSGW_ACCESS_KEY = "HUVIDPOTESTACCESS"
RADOSGW_SECRET_KEY = "huvidpo-test-secret-key-0123456789"


def free_port() -> int:
    """A TCP port nothing listens on right now (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict[str, str]]:
    """A throwaway Ceph radosgw serving S3 on 127.0.0.1 for the whole session (about 12 s to start)."""
    missing = [b for b in CEPH_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"Ceph radosgw not installed (missing {', '.join(missing)}); "
            "apt-get install radosgw ceph-mon ceph-osd (listed in .ci/apt-packages.txt)"
        )
    # Short path: Ceph's admin sockets live in it and unix socket paths are limited to 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="huvidpo-ceph-"))
    cluster = workdir / "c"
    port = free_port()
    mon_port = free_port()
    while mon_port == port:
        mon_port = free_port()
    env = {
        **os.environ,
        "CEPH_S3_ACCESS_KEY": RADOSGW_ACCESS_KEY,
        "CEPH_S3_SECRET_KEY": RADOSGW_SECRET_KEY,
    }
    try:
        proc = subprocess.run(
            ["bash", str(CEPH_SCRIPT), "start", str(cluster), str(port), str(mon_port)],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        if proc.returncode != 0 or "READY" not in proc.stdout:
            pytest.fail(
                f"radosgw did not start (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        yield {
            "endpoint": f"127.0.0.1:{port}",
            "url": f"http://127.0.0.1:{port}",
            "access_key": RADOSGW_ACCESS_KEY,
            "secret_key": RADOSGW_SECRET_KEY,
            "region": "us-east-1",
            "cluster_dir": str(cluster),  # {rgw,osd,mon}.pid and log/ inside
        }
    finally:
        subprocess.run(
            ["bash", str(CEPH_SCRIPT), "stop", str(cluster)], capture_output=True, timeout=120, env=env
        )
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def moto_s3_endpoint() -> Iterator[dict[str, str]]:
    """moto's S3 server in a thread of this process (0.3 s to start)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield {
            "endpoint": f"{host}:{port}",
            "url": f"http://{host}:{port}",
            "access_key": "moto-access",
            "secret_key": "moto-secret",
            "region": "us-east-1",
        }
    finally:
        server.stop()


def _drop_bucket(store: MinioStore) -> None:
    client = store.client
    with contextlib.suppress(Exception):
        if not client.bucket_exists(store.bucket):
            return
        for upload in client._list_multipart_uploads(store.bucket).uploads:  # leftovers of aborted tests
            with contextlib.suppress(Exception):
                client._abort_multipart_upload(store.bucket, upload.object_name, upload.upload_id or "")
        for obj in client.list_objects(store.bucket, recursive=True):
            client.remove_object(store.bucket, obj.object_name or "")
        client.remove_bucket(store.bucket)


@pytest.fixture
def make_s3_store() -> Iterator[Callable[..., MinioStore]]:
    """Factory of ``MinioStore``s on fresh buckets of an endpoint dict; buckets removed at teardown."""
    made: list[MinioStore] = []

    def make(endpoint: dict[str, str], **kwargs: Any) -> MinioStore:
        options: dict[str, Any] = {
            "bucket": f"t-{uuid.uuid4().hex[:20]}",
            "region": endpoint.get("region", "us-east-1"),
            "part_size": 5 * 1024 * 1024,
            "timeout": 20.0,
        }
        options.update(kwargs)
        store = MinioStore(endpoint["endpoint"], endpoint["access_key"], endpoint["secret_key"], **options)
        made.append(store)
        return store

    yield make
    for store in made:
        _drop_bucket(store)
