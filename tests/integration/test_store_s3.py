"""MinioStore against real S3 servers: the shared contract on moto and Ceph radosgw, then what only a
real server can show (SigV4 refusals, presigned URL tampering and expiry, multipart ETags), and the
mapping of unreachable, failing and hanging endpoints to ``StoreUnavailable``."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from minio.error import ServerError

from services.common.publish import RolloutRecord, read_rollout, write_rollout
from services.common.store import ObjectStore, PreconditionFailed, StoreAccessDenied, StoreUnavailable
from services.common.store.s3 import MinioStore
from tests.store_contract import ChunkedStream, StoreContract, race_rollout_writes

MakeStore = Callable[..., MinioStore]


@pytest.fixture(params=["moto", "radosgw"])
def s3(request: pytest.FixtureRequest) -> dict[str, str]:
    fixture = "moto_s3_endpoint" if request.param == "moto" else "s3_endpoint"
    return {**request.getfixturevalue(fixture), "kind": request.param}


class TestS3StoreContract(StoreContract):
    @pytest.fixture
    def store(self, s3: dict[str, str], make_s3_store: MakeStore) -> ObjectStore:
        return make_s3_store(s3)

    @pytest.fixture
    def corrupt(self, store: MinioStore):  # type: ignore[no-untyped-def]
        def corrupt(key: str, data: bytes, keep_digest: bool) -> None:
            if keep_digest:  # new bytes under the old recorded digest, written past the adapter
                old = store.stat(key)
                assert old is not None and old.sha256
                store.client.put_object(
                    store.bucket, key, io.BytesIO(data), len(data), metadata={"sha256": old.sha256}
                )
            else:
                store.put_bytes(key, data)

        return corrupt


# ------------------------------------------------------------------------------- both servers
def test_presigned_get_and_put_urls_work_over_plain_http(
    s3: dict[str, str], make_s3_store: MakeStore
) -> None:
    store = make_s3_store(s3)
    store.put_bytes("share/clip.mp4", b"video bytes")
    got = httpx.get(store.presigned_get_url("share/clip.mp4", timedelta(minutes=5)), timeout=10)
    assert got.status_code == 200 and got.content == b"video bytes"
    put = httpx.put(
        store.presigned_put_url("uploads/big.bin", timedelta(minutes=5)), content=b"uploaded", timeout=10
    )
    assert put.status_code == 200
    assert store.get_bytes("uploads/big.bin") == b"uploaded"
    st = store.stat("uploads/big.bin")
    assert st is not None and st.sha256 is None  # a direct upload records no digest; manifests carry it


# ---------------------------------------------------------------------------- radosgw only
def test_large_stream_is_a_real_multipart_upload(
    s3_endpoint: dict[str, str], make_s3_store: MakeStore
) -> None:
    store = make_s3_store(s3_endpoint, part_size=5 * 1024 * 1024)
    data = hashlib.sha256(b"seed").digest() * (12 * 1024 * 1024 // 32)  # 12 MiB -> 3 parts
    info = store.put_stream("ckpt/weights.bin", ChunkedStream(data))  # type: ignore[arg-type]
    st = store.stat("ckpt/weights.bin")
    assert st is not None and st.etag is not None
    assert st.etag.endswith("-3"), st.etag  # S3 multipart ETag: md5-of-md5s dash part count
    assert st.sha256 == info.sha256 == hashlib.sha256(data).hexdigest()
    assert store.get_bytes("ckpt/weights.bin") == data
    assert [o.key for o in store.list("")] == ["ckpt/weights.bin"]  # the temp upload is gone
    uploads = store.client._list_multipart_uploads(store.bucket).uploads
    assert not uploads  # nothing left incomplete


def test_failed_multipart_upload_is_aborted(s3_endpoint: dict[str, str], make_s3_store: MakeStore) -> None:
    store = make_s3_store(s3_endpoint)
    stream = ChunkedStream(b"z" * (12 * 1024 * 1024), fail_after=11 * 1024 * 1024)
    with pytest.raises(ConnectionResetError):
        store.put_stream("ckpt/broken.bin", stream)  # type: ignore[arg-type]
    assert store.stat("ckpt/broken.bin") is None
    assert not store.client._list_multipart_uploads(store.bucket).uploads


@pytest.mark.parametrize(
    ("parts_of_size", "extra", "etag_suffix"),
    [(1, 0, None), (1, 1, "-2"), (2, 0, "-2"), (2, 1, "-3"), (3, 0, "-3")],
)
def test_stream_sizes_at_part_boundaries(
    s3_endpoint: dict[str, str],
    make_s3_store: MakeStore,
    parts_of_size: int,
    extra: int,
    etag_suffix: str | None,
) -> None:
    """Exactly one part is one PUT; one byte more starts a multipart upload; whole parts add no empty
    part at the end (S3 would refuse a 0-byte part that is not the only one)."""
    part = 5 * 1024 * 1024
    store = make_s3_store(s3_endpoint, part_size=part, num_parallel_uploads=2)
    data = hashlib.sha256(b"edge").digest() * ((parts_of_size * part + extra) // 32 + 1)
    data = data[: parts_of_size * part + extra]
    info = store.put_stream("edge/blob.bin", ChunkedStream(data, chunk=300_007))  # type: ignore[arg-type]
    st = store.stat("edge/blob.bin")
    assert st is not None and st.etag is not None
    if etag_suffix is None:
        assert "-" not in st.etag, st.etag
    else:
        assert st.etag.endswith(etag_suffix), st.etag
    assert info.size == st.size == len(data)
    assert st.sha256 == info.sha256 == hashlib.sha256(data).hexdigest()
    assert store.get_bytes("edge/blob.bin") == data
    assert [o.key for o in store.list("")] == ["edge/blob.bin"]
    assert not store.client._list_multipart_uploads(store.bucket).uploads


def test_failed_part_upload_is_aborted_and_raised_as_a_store_error(
    s3_endpoint: dict[str, str], make_s3_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = 5 * 1024 * 1024
    store = make_s3_store(s3_endpoint, part_size=part, num_parallel_uploads=2)
    real = store.client._upload_part
    sent: list[int] = []

    def flaky(bucket: str, key: str, data: bytes, headers: Any, upload_id: str, number: int) -> str:
        if number == 3:
            # what the SDK raises for a 503 it could not retry away
            raise ServerError("server failed with HTTP 503", 503)
        sent.append(number)
        return real(bucket, key, data, headers, upload_id, number)

    monkeypatch.setattr(store.client, "_upload_part", flaky)
    stream = ChunkedStream(b"q" * (6 * part))
    with pytest.raises(StoreUnavailable, match="503"):
        store.put_stream("ckpt/flaky.bin", stream)  # type: ignore[arg-type]
    assert sorted(sent)[:2] == [1, 2]
    assert stream.consumed < 6 * part  # it stopped reading once a part had failed
    assert store.stat("ckpt/flaky.bin") is None
    assert [o.key for o in store.list("")] == []
    assert not store.client._list_multipart_uploads(store.bucket).uploads


def test_put_file_uploads_once_by_multipart_with_its_digest(
    s3_endpoint: dict[str, str], make_s3_store: MakeStore, tmp_path: Path
) -> None:
    store = make_s3_store(s3_endpoint)
    path = tmp_path / "f.bin"
    path.write_bytes(b"\x01\x02" * (6 * 1024 * 1024))
    info = store.put_file("files/f.bin", path)
    st = store.stat("files/f.bin")
    assert st is not None and st.etag is not None and st.etag.endswith("-3")
    assert st.sha256 == info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def _replica_stores(s3_endpoint: dict[str, str], bucket: str, n: int) -> list[MinioStore]:
    """``n`` stores on one bucket, each with its own client and connections (like ``n`` replicas)."""
    return [
        MinioStore(
            s3_endpoint["endpoint"],
            s3_endpoint["access_key"],
            s3_endpoint["secret_key"],
            bucket=bucket,
            create_bucket=False,
            timeout=20.0,
        )
        for _ in range(n)
    ]


def _put_all_at_once(writers: list[MinioStore], key: str, etag: str, rnd: int) -> list[str]:
    """Every writer PUTs ``round {rnd} writer {i}`` with ``if_match=etag`` at the same moment."""
    barrier = threading.Barrier(len(writers), timeout=30)
    outcomes = [""] * len(writers)

    def put(i: int) -> None:
        barrier.wait()
        try:
            writers[i].put_bytes(key, f"round {rnd} writer {i}".encode(), if_match=etag)
            outcomes[i] = "ok"
        except PreconditionFailed:
            outcomes[i] = "refused"

    threads = [threading.Thread(target=put, args=(i,)) for i in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return outcomes


def test_concurrent_if_match_writes_have_exactly_one_winner_on_radosgw(
    s3_endpoint: dict[str, str], make_s3_store: MakeStore
) -> None:
    # Separate clients PUT with the same If-Match at once: the server must test and write in one
    # step, so exactly one succeeds whatever the interleaving (no timing is asserted; running them
    # at once only gives a server that checks before it locks the chance to let two through).
    setup = make_s3_store(s3_endpoint)
    writers = _replica_stores(s3_endpoint, setup.bucket, 6)
    setup.put_bytes("rec/cas.json", b"round -1")
    for rnd in range(8):
        _, etag = setup.get_bytes_with_etag("rec/cas.json")
        assert etag is not None
        outcomes = _put_all_at_once(writers, "rec/cas.json", etag, rnd)
        assert sorted(outcomes) == ["ok"] + ["refused"] * (len(writers) - 1), (rnd, outcomes)
        winner = outcomes.index("ok")
        assert setup.get_bytes("rec/cas.json") == f"round {rnd} writer {winner}".encode()


def test_concurrent_rollout_writers_on_separate_clients_lose_no_update_on_radosgw(
    s3_endpoint: dict[str, str], make_s3_store: MakeStore
) -> None:
    setup = make_s3_store(s3_endpoint)
    replicas = _replica_stores(s3_endpoint, setup.bucket, 4)
    base = RolloutRecord(deployment="edge").next("set-current", current="ckpt-a-1")
    write_rollout(setup, base)
    for rnd in range(6):
        records = [base.next("promote", current=f"ckpt-r{rnd}w{i}-2") for i in range(len(replicas))]
        outcomes = race_rollout_writes(replicas, records, ordered=False)  # all write at once
        assert sorted(outcomes) == ["conflict"] * (len(records) - 1) + ["ok"], (rnd, outcomes)
        stored = read_rollout(setup, "edge")
        assert stored == records[outcomes.index("ok")], (rnd, stored)
        base = stored


def test_wrong_secret_is_refused_with_a_clear_error(
    s3_endpoint: dict[str, str], make_s3_store: MakeStore
) -> None:
    good = make_s3_store(s3_endpoint)
    good.put_bytes("x", b"1")
    endpoint, access = s3_endpoint["endpoint"], s3_endpoint["access_key"]
    bad = MinioStore(endpoint, access, "not-the-secret", bucket=good.bucket, retries=0, create_bucket=False)
    with pytest.raises(StoreAccessDenied, match="SignatureDoesNotMatch") as err:
        bad.put_bytes("y", b"2")
    assert "HUVIDPO_STORE_SECRET_KEY" in str(err.value)
    with pytest.raises(StoreAccessDenied, match="SignatureDoesNotMatch"):
        bad.get_bytes("x")
    # HEAD requests carry no error body: the bucket probe before a first write gets a bare 403, which a
    # least-privilege key gets too, so the write itself tells what is wrong
    with pytest.raises(StoreAccessDenied, match="SignatureDoesNotMatch"):
        MinioStore(endpoint, access, "not-the-secret", bucket=good.bucket, retries=0).put_bytes("y", b"2")
    unknown = MinioStore(
        endpoint, "NOSUCHKEY", "whatever", bucket=good.bucket, retries=0, create_bucket=False
    )
    with pytest.raises(StoreAccessDenied, match="InvalidAccessKeyId"):
        unknown.put_bytes("y", b"2")
    assert good.stat("y") is None


def test_tampered_or_expired_presigned_url_is_refused(
    s3_endpoint: dict[str, str], make_s3_store: MakeStore
) -> None:
    store = make_s3_store(s3_endpoint)
    store.put_bytes("share/a.txt", b"a")
    store.put_bytes("share/b.txt", b"b")
    url = store.presigned_get_url("share/a.txt", timedelta(minutes=5))
    assert httpx.get(url, timeout=10).status_code == 200
    sig = url.rsplit("X-Amz-Signature=", 1)[1]
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    assert httpx.get(url.replace(sig, flipped), timeout=10).status_code == 403
    assert httpx.get(url.replace("share/a.txt", "share/b.txt"), timeout=10).status_code == 403
    assert httpx.get(url.replace("X-Amz-Expires=300", "X-Amz-Expires=600"), timeout=10).status_code == 403
    short = store.presigned_get_url("share/a.txt", timedelta(seconds=1))
    time.sleep(2.1)
    assert httpx.get(short, timeout=10).status_code == 403


def test_streamed_upload_memory_stays_bounded(s3_endpoint: dict[str, str], make_s3_store: MakeStore) -> None:
    part = 5 * 1024 * 1024
    store = make_s3_store(s3_endpoint, part_size=part, num_parallel_uploads=2)
    size = 48 * 1024 * 1024

    class Zeros:
        def __init__(self) -> None:
            self.left = size

        def read(self, n: int = -1) -> bytes:
            n = min(self.left, 256 * 1024 if n < 0 else min(n, 256 * 1024))
            self.left -= n
            return b"\0" * n

    tracemalloc.start()
    try:
        info = store.put_stream("big/zeros.bin", Zeros())  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.size == size
    # parallel parts in flight + the one being read + the peeked head, far below the object size
    assert peak < 8 * part, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB stream"


def test_presigned_url_for_a_public_endpoint_names_it_and_still_verifies(
    s3_endpoint: dict[str, str], make_s3_store: MakeStore
) -> None:
    port = s3_endpoint["endpoint"].rsplit(":", 1)[1]
    store = make_s3_store(
        s3_endpoint, public_endpoint=f"http://localhost:{port}"
    )  # another name, same server
    store.put_bytes("share/p.txt", b"public")
    url = store.presigned_get_url("share/p.txt", timedelta(minutes=5))
    assert url.startswith(f"http://localhost:{port}/{store.bucket}/share/p.txt?")
    got = httpx.get(url, timeout=10)
    assert got.status_code == 200 and got.content == b"public"
    # signed for that host: presented under another Host header it is refused
    other = httpx.get(url.replace("localhost", "127.0.0.1"), timeout=10)
    assert other.status_code == 403


def test_check_reports_a_missing_bucket_it_may_not_create(s3_endpoint: dict[str, str]) -> None:
    store = MinioStore(
        s3_endpoint["endpoint"],
        s3_endpoint["access_key"],
        s3_endpoint["secret_key"],
        bucket="never-created-bucket",
        create_bucket=False,
    )
    with pytest.raises(StoreUnavailable, match="does not exist"):
        store.check()


def test_frozen_radosgw_is_unavailable_and_the_store_recovers_when_it_returns(
    s3_endpoint: dict[str, str], make_s3_store: MakeStore
) -> None:
    setup = make_s3_store(s3_endpoint)  # the first bucket of a fresh cluster takes seconds (pools)
    setup.put_bytes("k", b"before")
    store = MinioStore(
        s3_endpoint["endpoint"],
        s3_endpoint["access_key"],
        s3_endpoint["secret_key"],
        bucket=setup.bucket,
        timeout=1.0,
        retries=0,
        create_bucket=False,  # so the PUT below is really sent, not stopped at the bucket probe
    )
    rgw_pid = int((Path(s3_endpoint["cluster_dir"]) / "rgw.pid").read_text())
    os.kill(rgw_pid, signal.SIGSTOP)  # the server hangs: connections queue, nothing answers
    try:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.get_bytes("k")
        with pytest.raises(StoreUnavailable):
            store.put_bytes("k", b"during")
        assert time.monotonic() - start < 15
    finally:
        os.kill(rgw_pid, signal.SIGCONT)
    # Same store object, once the server answers again (it may need a moment to catch up after the
    # freeze: its mon session and queued requests, so allow a few 1 s timeouts).
    deadline = time.monotonic() + 30
    while True:
        try:
            got = store.get_bytes("k")
            break
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    # a timed-out PUT has an unknown outcome (the frozen server may still process it), never a partial one
    assert got in (b"before", b"during")
    # That PUT may even land after a later write to "k" (it sat in the frozen server's queue), so the
    # recovered store is checked on another key: writes and reads through it work again.
    store.put_bytes("k2", b"after")
    assert setup.get_bytes("k2") == b"after"
    assert store.get_bytes("k2") == b"after"


# ---------------------------------------------------------------------- endpoints that fail
def _all_calls_unavailable(store: MinioStore) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.put_bytes("k", b"x"),
        lambda: store.stat("k"),
        lambda: store.get_bytes("k"),
        lambda: store.list(""),
        lambda: store.delete("k"),
        store.check,
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable):
            call()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_endpoint_down_is_store_unavailable_quickly() -> None:
    store = MinioStore(f"127.0.0.1:{_free_port()}", "a", "b", timeout=2, retries=1)
    start = time.monotonic()
    _all_calls_unavailable(store)
    assert time.monotonic() - start < 15


@pytest.fixture
def failing_server() -> Iterator[dict[str, Any]]:
    """An HTTP server answering 503 to everything, counting requests."""
    hits = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def _fail(self) -> None:
            hits["n"] += 1
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            body = (
                b"<?xml version='1.0'?><Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
            )
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _fail

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"port": server.server_port, "hits": hits}
    finally:
        server.shutdown()
        server.server_close()


def test_5xx_is_store_unavailable_after_retries(failing_server: dict[str, Any]) -> None:
    store = MinioStore(f"127.0.0.1:{failing_server['port']}", "a", "b", timeout=5, retries=2)
    _all_calls_unavailable(store)
    assert failing_server["hits"]["n"] >= 6


def test_hanging_endpoint_times_out_as_store_unavailable() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections into the backlog, never answers
    try:
        store = MinioStore(f"127.0.0.1:{listener.getsockname()[1]}", "a", "b", timeout=1, retries=0)
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.stat("k")
        assert time.monotonic() - start < 10
    finally:
        listener.close()
