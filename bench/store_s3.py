"""Overhead of the ``MinioStore`` adapter over the raw ``minio`` SDK on the same S3 server, same run.

The adapter hashes every byte (sha256 recorded in the object's metadata) and, for a stream of unknown
digest, uploads to a temporary key and server-side copies it to its key with the digest. This
measures what that costs against a plain ``put_object`` / ``get_object`` of the same bytes:

- stream upload: ``MinioStore.put_stream`` vs SDK ``put_object(length=-1)``, same part size and
  parallelism, from the same generated stream (no source file, like an HTTP body);
- file upload: ``MinioStore.put_file`` (hash pass + multipart) vs SDK ``fput_object``;
- download: ``MinioStore.get_file`` (verified, atomic) vs SDK ``fget_object``.

Ratios are throughput adapter / SDK (1.0 = no overhead). Also prints this process's peak RSS growth
during the adapter's stream upload. Starts a throwaway Ceph radosgw with ``scripts/ceph-s3.sh`` unless
``--endpoint`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

import psutil
from minio import Minio

from services.common.store.s3 import MinioStore

REPO = Path(__file__).resolve().parents[1]


class PatternStream:
    """``size`` bytes generated on the fly in reads of at most 64 KiB (like a web framework's body)."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = os.urandom(64 * 1024)

    def read(self, n: int = -1) -> bytes:
        n = min(self.left, len(self.block) if n is None or n < 0 else min(n, len(self.block)))
        self.left -= n
        return self.block[:n]


def _body(size: int) -> BinaryIO:
    return cast(BinaryIO, PatternStream(size))


class FullReads:
    """The same stream, but every ``read(n)`` returns ``n`` bytes until the end (as a file does)."""

    def __init__(self, size: int) -> None:
        self.inner = PatternStream(size)

    def read(self, n: int = -1) -> bytes:
        parts = []
        want = n if n is not None and n >= 0 else 1 << 30
        while want > 0 and (chunk := self.inner.read(want)):
            parts.append(chunk)
            want -= len(chunk)
        return b"".join(parts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed(fn: Callable[[], object], repeats: int, cleanup: Callable[[], object]) -> float:
    """Median seconds of ``fn``; ``cleanup`` runs after each (radosgw's memstore OSD is RAM-sized)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        cleanup()
    return statistics.median(times)


def _peak_rss_growth(fn: Callable[[], object]) -> int:
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return peak - base


def run(endpoint: str, access: str, secret: str, size: int, repeats: int, part: int) -> dict[str, object]:
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    store = MinioStore(endpoint, access, secret, bucket=bucket, part_size=part, timeout=120)
    sdk: Minio = store.client
    store.put_bytes("warmup", b"x")  # creates the bucket (and on a fresh radosgw, its pools)
    sdk.put_object(bucket, "warmup-big", _body(part * 2), -1, part_size=part)
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        src = tmp / "src.bin"
        with open(src, "wb") as fh:
            stream = _body(size)
            while chunk := stream.read(1 << 20):
                fh.write(chunk)
        r: dict[str, float] = {}

        def rm(key: str) -> Callable[[], None]:
            return lambda: sdk.remove_object(bucket, key)

        def keep() -> None:
            pass

        r["sdk_put_stream_s"] = _timed(
            lambda: sdk.put_object(bucket, "sdk/stream", _body(size), -1, part_size=part),
            repeats,
            rm("sdk/stream"),
        )
        r["sdk_put_stream_full_reads_s"] = _timed(
            lambda: sdk.put_object(bucket, "sdk/full", cast(BinaryIO, FullReads(size)), -1, part_size=part),
            repeats,
            rm("sdk/full"),
        )
        r["store_put_stream_s"] = _timed(
            lambda: store.put_stream("store/stream", _body(size)), repeats, rm("store/stream")
        )
        r["sdk_put_file_s"] = _timed(
            lambda: sdk.fput_object(bucket, "sdk/file", str(src), part_size=part), repeats, rm("sdk/file")
        )
        r["store_put_file_s"] = _timed(lambda: store.put_file("store/file", src), repeats, keep)
        r["sdk_get_file_s"] = _timed(
            lambda: sdk.fget_object(bucket, "store/file", str(tmp / "sdk.out")), repeats, keep
        )
        r["store_get_file_s"] = _timed(lambda: store.get_file("store/file", tmp / "store.out"), repeats, keep)
        sdk.remove_object(bucket, "store/file")
        rss = _peak_rss_growth(lambda: store.put_stream("store/rss", _body(size)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for obj in sdk.list_objects(bucket, recursive=True):
            sdk.remove_object(bucket, obj.object_name or "")
        sdk.remove_bucket(bucket)
    mb = size / 1e6
    return {
        "size_mb": mb,
        "part_mb": part / 2**20,
        "repeats": repeats,
        **{k: round(v, 3) for k, v in r.items()},
        "put_stream_ratio": round(r["sdk_put_stream_s"] / r["store_put_stream_s"], 3),
        "put_stream_ratio_vs_full_reads": round(
            r["sdk_put_stream_full_reads_s"] / r["store_put_stream_s"], 3
        ),
        "put_file_ratio": round(r["sdk_put_file_s"] / r["store_put_file_s"], 3),
        "get_file_ratio": round(r["sdk_get_file_s"] / r["store_get_file_s"], 3),
        "store_put_stream_MBps": round(mb / r["store_put_stream_s"], 1),
        "sdk_put_stream_MBps": round(mb / r["sdk_put_stream_s"], 1),
        "store_put_stream_peak_rss_growth_mb": round(rss / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="50 MB, one repeat")
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--part-mb", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--endpoint", help="host:port of an S3 server (default: start radosgw)")
    parser.add_argument("--access-key", default="BENCHACCESS")
    parser.add_argument("--secret-key", default="bench-secret-key-0123456789")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    size = (50 if args.quick else args.size_mb) * 1_000_000
    repeats = 1 if args.quick else args.repeats
    cluster: Path | None = None
    endpoint = args.endpoint
    env = {
        **os.environ,
        "CEPH_S3_ACCESS_KEY": args.access_key,
        "CEPH_S3_SECRET_KEY": args.secret_key,
        "CEPH_S3_MEMSTORE_BYTES": str(max(2 << 30, 12 * size)),
    }
    try:
        if endpoint is None:
            cluster = Path(tempfile.mkdtemp(prefix="huvidpo-ceph-bench-"))
            port = _free_port()
            subprocess.run(
                [
                    "bash",
                    str(REPO / "scripts" / "ceph-s3.sh"),
                    "start",
                    str(cluster / "c"),
                    str(port),
                    str(_free_port()),
                ],
                check=True,
                capture_output=True,
                timeout=240,
                env=env,
            )
            endpoint = f"127.0.0.1:{port}"
        result = run(endpoint, args.access_key, args.secret_key, size, repeats, args.part_mb * 2**20)
    finally:
        if cluster is not None:
            subprocess.run(
                ["bash", str(REPO / "scripts" / "ceph-s3.sh"), "stop", str(cluster / "c")], timeout=120
            )
            shutil.rmtree(cluster, ignore_errors=True)
    result["server"] = "Ceph radosgw 16.2 (memstore OSD)" if args.endpoint is None else args.endpoint
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"MinioStore vs minio SDK on {result['server']} ({result['machine']})")
        print(f"  {result['size_mb']:.0f} MB objects, {result['part_mb']:.0f} MiB parts, median of {repeats}")
        for what in ("put_stream", "put_file", "get_file"):
            print(
                f"  {what:10s}: store {result[f'store_{what}_s']:.3f} s, sdk {result[f'sdk_{what}_s']:.3f} s, "
                f"throughput ratio store/sdk = {result[f'{what}_ratio']:.2f}"
            )
        print(
            f"  put_stream vs an SDK fed full-part reads (no 64 KiB concatenation): sdk "
            f"{result['sdk_put_stream_full_reads_s']:.3f} s, ratio store/sdk = "
            f"{result['put_stream_ratio_vs_full_reads']:.2f}"
        )
        print(
            f"  peak RSS growth during store put_stream: {result['store_put_stream_peak_rss_growth_mb']} MB"
        )
    return result


if __name__ == "__main__":
    main()
