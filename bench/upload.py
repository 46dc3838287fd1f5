"""Upload throughput through the control plane's API versus a direct SDK put, to the same S3 server.

Both paths send the same bytes to the same Ceph radosgw (started here with scripts/ceph-s3.sh): the
API path is an HTTP multipart upload streamed into the control plane, which streams it on into a
multipart S3 upload; the direct path is the minio SDK's ``put_object`` with the same part size. The
control plane runs as its own process so its RSS can be watched: the benchmark reports the peak RSS
growth during the upload (the streaming path must not hold the file).

Targets (issue 5): API/direct throughput ratio >= 0.8, RSS growth < 100 MB for a 500 MB upload.

Each API upload is then committed into a dataset version (``POST .../commit``), timed with the
control plane's RSS watched. Targets (issue 15): commit <= 0.1x the upload's time, RSS growth
< 100 MB. The background validation that follows (it decodes the video: here random bytes, so it
fails) is waited for and timed too, then the version is deleted so each round commits afresh.

It runs in two CPU layouts, each with a fresh server and control plane, and prints both:

- ``S3 server on its own CPUs``: the ceph daemons pinned to half of the CPUs, the client and the
  control plane to the other half. In a deployment the S3 server has its own machines; this asks
  whether the API path keeps the server as busy as a direct put does.
- ``all on shared CPUs``: everything on every CPU. On a small machine the control plane's CPU is
  then taken from the S3 server's, so the ratio also prices the control plane's CPU per byte.

For each it reports the CPU time each path costs, per process (the client, the control plane, the
S3 server's ceph daemons); with shared CPUs that both uploads keep busy, the throughput ratio comes
to the CPU ratio (direct CPU-seconds / API CPU-seconds).

    python bench/upload.py                   # 500 MB, 3 rounds, both layouts
    python bench/upload.py --quick           # 100 MB, 1 round
    python bench/upload.py --layout shared   # one layout: own | shared | both
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common.store.s3 import MinioStore  # noqa: E402

ACCESS, SECRET = "BENCHACCESSKEY", "bench-secret-key-0123456789"
PART = 8 * 1024 * 1024
BOUNDARY = "huvidpo-bench-boundary"
BLOCK = os.urandom(1 << 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def payload(size: int) -> Iterator[bytes]:
    left = size
    while left > 0:
        chunk = BLOCK[: min(len(BLOCK), left)]
        left -= len(chunk)
        yield chunk


class StreamFile:
    """A file-like over the same repeating bytes as ``payload``, O(n) per read (no whole-file copy)."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.offset = 0

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        parts = []
        got = 0
        while got < n:
            take = min(len(BLOCK) - self.offset, n - got)
            parts.append(BLOCK[self.offset : self.offset + take])
            self.offset = (self.offset + take) % len(BLOCK)
            got += take
        self.left -= n
        return b"".join(parts)


class RssWatch:
    """Samples a process's RSS every 20 ms; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self) -> RssWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def start_radosgw(tmp: Path, size: int, cpus: set[int]) -> tuple[str, Path]:
    d = tmp / "ceph"
    port = free_port()
    # The memstore OSD keeps objects in RAM and frees deleted ones only when radosgw's GC runs (every
    # few seconds): room for several uploads in flight to GC, or a fast machine fills it (503s).
    memstore = max(2 << 30, 8 * size)
    env = {**os.environ, "CEPH_S3_ACCESS_KEY": ACCESS, "CEPH_S3_SECRET_KEY": SECRET,
           "CEPH_S3_MEMSTORE_BYTES": str(memstore)}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "ceph-s3.sh"), "start", str(d), str(port)],
        capture_output=True, text=True, timeout=300, env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),  # the daemons it starts inherit it
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"radosgw did not start:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return f"127.0.0.1:{port}", d


def start_controlplane(
    endpoint: str, bucket: str, tmp: Path, cpus: set[int]
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HUVIDPO_STORE_BACKEND": "s3",
        "HUVIDPO_STORE_ENDPOINT": endpoint,
        "HUVIDPO_STORE_ACCESS_KEY": ACCESS,
        "HUVIDPO_STORE_SECRET_KEY": SECRET,
        "HUVIDPO_STORE_BUCKET": bucket,
        "HUVIDPO_STORE_PART_SIZE": str(PART),
        "HUVIDPO_CONTROLPLANE_HOST": "127.0.0.1",
        "HUVIDPO_CONTROLPLANE_PORT": str(port),
        "HUVIDPO_CONTROLPLANE_WORK_DIR": str(tmp / "cp"),
    }
    proc = subprocess.Popen([sys.executable, "-m", "services.controlplane"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus))  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the control plane did not start")


class CpuMeter:
    """CPU seconds (user + system) spent by groups of processes between ``start`` and ``stop``."""

    def __init__(self, groups: dict[str, list[psutil.Process]]) -> None:
        self.groups = groups
        self._t0: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        out = {}
        for name, procs in self.groups.items():
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            out[name] = total
        return out

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self) -> dict[str, float]:
        now = self._now()
        return {name: now[name] - self._t0[name] for name in now}


def ceph_processes(ceph_dir: Path) -> list[psutil.Process]:
    """The S3 server's daemons (ceph-mon, ceph-osd, radosgw), found by the config path they run with."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(ceph_dir) in part for part in p.info["cmdline"] or []):
            out.append(p)
    return out


def direct_put(store: MinioStore, size: int) -> float:
    key = f"bench/direct-{uuid.uuid4().hex}"
    t0 = time.perf_counter()
    store.client.put_object(store.bucket, key, StreamFile(size), length=size, part_size=PART)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    store.delete(key)
    return seconds


@dataclass
class ApiRun:
    upload_s: float
    upload_growth: int
    commit_s: float
    commit_growth: int
    validation_s: float
    validation: str


MANIFEST = b'{"id": "big", "file": "videos/big.mp4", "prompt": "p"}\n'


def api_upload(url: str, size: int, cp_pid: int, uploaded: Callable[[], None] = lambda: None) -> ApiRun:
    """Upload, call ``uploaded`` (the CPU meter stops there), then commit and await the validation."""
    with httpx.Client(base_url=url, timeout=600) as c:
        up = c.post("/v1/datasets/bench/uploads").json()

        def body() -> Iterator[bytes]:
            yield (
                (
                    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="manifest.jsonl"\r\n'
                    "Content-Type: application/jsonl\r\n\r\n"
                ).encode()
                + MANIFEST
                + b"\r\n"
            )
            yield (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="videos/big.mp4"\r\n'
                "Content-Type: video/mp4\r\n\r\n"
            ).encode()
            yield from payload(size)
            yield f"\r\n--{BOUNDARY}--\r\n".encode()

        before = psutil.Process(cp_pid).memory_info().rss
        with RssWatch(cp_pid) as watch:
            t0 = time.perf_counter()
            r = c.post(
                f"/v1/datasets/bench/uploads/{up['id']}/files",
                content=body(),
                headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
            )
            seconds = time.perf_counter() - t0
        r.raise_for_status()
        assert size in [f["size"] for f in r.json()["files"]], r.text
        uploaded()
        commit_before = psutil.Process(cp_pid).memory_info().rss
        with RssWatch(cp_pid) as commit_watch:
            t0 = time.perf_counter()
            v = c.post(f"/v1/datasets/bench/uploads/{up['id']}/commit", json={"include_ratings": False})
            commit_s = time.perf_counter() - t0
        v.raise_for_status()
        version = v.json()["id"]
        t0 = time.perf_counter()
        state = v.json()["validation"]["state"]
        while state == "pending" and time.perf_counter() - t0 < 600:
            time.sleep(0.1)
            state = c.get(f"/v1/datasets/bench/versions/{version}").json()["validation"]["state"]
        validation_s = time.perf_counter() - t0
        c.delete(f"/v1/datasets/bench/versions/{version}").raise_for_status()
    return ApiRun(
        seconds, watch.peak - before, commit_s, commit_watch.peak - commit_before, validation_s, state
    )


@dataclass
class Layout:
    """Which CPUs the S3 server's daemons run on, and which the client and the control plane run on."""

    name: str
    server_cpus: set[int]
    client_cpus: set[int]


def layouts(which: str) -> list[Layout]:
    cpus = sorted(os.sched_getaffinity(0))
    out = []
    if which in ("own", "both") and len(cpus) >= 2:
        half = len(cpus) // 2
        out.append(Layout("S3 server on its own CPUs", set(cpus[:half]), set(cpus[half:])))
    if which in ("shared", "both") or not out:
        out.append(Layout("all on shared CPUs", set(cpus), set(cpus)))
    return out


def _cpus(cpus: set[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def run_layout(layout: Layout, size: int, rounds: int) -> None:
    """Start a fresh radosgw and control plane pinned as ``layout`` says, time both paths, print."""
    # This thread's affinity is inherited by the threads it starts (SDK part uploads, RSS watch).
    os.sched_setaffinity(0, layout.client_cpus)
    tmp = Path(tempfile.mkdtemp(prefix="huvidpo-bench-upload-"))
    ceph_dir: Path | None = None
    cp: subprocess.Popen[bytes] | None = None
    try:
        endpoint, ceph_dir = start_radosgw(tmp, size, layout.server_cpus)
        bucket = "bench-upload"
        store = MinioStore(endpoint, ACCESS, SECRET, bucket=bucket, part_size=PART, timeout=120.0)
        store.check()
        cp, url = start_controlplane(endpoint, bucket, tmp, layout.client_cpus)
        httpx.post(url + "/v1/datasets", json={"name": "bench"}, timeout=30).raise_for_status()
        # Warm-up, not timed: one upload of the full size by each path. The first write into a fresh
        # cluster creates its pools, and the first ``size`` bytes into a fresh memstore run about half
        # as fast as later ones (measured: 100-150 MB/s against 190-270 for the same direct put), which
        # would count against whichever path runs first.
        direct_put(store, size)
        api_upload(url, size, cp.pid)
        store.delete_prefix("datasets/bench/uploads/")
        servers = ceph_processes(ceph_dir)
        if not servers:
            raise SystemExit(f"no ceph daemon found running with {ceph_dir}")
        meter = CpuMeter(
            {"client": [psutil.Process()], "control plane": [psutil.Process(cp.pid)], "S3 server": servers}
        )
        directs, apis, growths = [], [], []
        runs: list[ApiRun] = []
        cpu: dict[str, list[dict[str, float]]] = {"direct": [], "api": []}
        for r in range(rounds):
            # alternate the order (ABBA...) so a drift in machine load hits both paths alike
            for path in ("direct", "api") if r % 2 == 0 else ("api", "direct"):
                meter.start()
                if path == "direct":
                    directs.append(direct_put(store, size))
                    cpu[path].append(meter.stop())
                else:
                    run = api_upload(url, size, cp.pid, lambda: cpu["api"].append(meter.stop()))
                    apis.append(run.upload_s)
                    growths.append(run.upload_growth)
                    runs.append(run)
                    store.delete_prefix("datasets/bench/uploads/")
    finally:
        if cp is not None:
            cp.terminate()
            cp.wait(timeout=20)
        if ceph_dir is not None:
            subprocess.run(
                ["bash", str(REPO / "scripts" / "ceph-s3.sh"), "stop", str(ceph_dir)],
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(tmp, ignore_errors=True)
    mb = size / 1e6
    d_best, a_best = min(directs), min(apis)
    median = statistics.median_high(d / a for d, a in zip(directs, apis, strict=True))
    tag = f"[{layout.name}]"
    print(f"{tag} S3 server on CPUs {_cpus(layout.server_cpus)}, client and control plane on CPUs "
          f"{_cpus(layout.client_cpus)}, load avg {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(
        f"  direct SDK put_object : {mb / d_best:7.1f} MB/s (runs: {', '.join(f'{mb / s:.1f}' for s in directs)})"
    )
    print(
        f"  through the API       : {mb / a_best:7.1f} MB/s (runs: {', '.join(f'{mb / s:.1f}' for s in apis)})"
    )
    print(f"  ratio API / direct, {layout.name} : {(mb / a_best) / (mb / d_best):5.2f} best vs best, "
          f"{median:.2f} median of rounds (target >= 0.8)")  # fmt: skip
    print(f"  control plane peak RSS growth during upload: {max(growths) / 2**20:.1f} MiB (target < 100 MB)")
    for run in runs:
        print(f"  commit: {run.commit_s:.3f} s = {run.commit_s / run.upload_s:.4f}x the upload's "
              f"{run.upload_s:.2f} s (target <= 0.1x), peak RSS growth {run.commit_growth / 2**20:.1f} MiB "
              f"(target < 100 MB); background validation {run.validation}: {run.validation_s:.1f} s")  # fmt: skip
    # CPU seconds per upload, the median over rounds of each process group
    med = {
        path: {g: statistics.median_high(c[g] for c in runs) for g in runs[0]} for path, runs in cpu.items()
    }
    totals = {path: statistics.median_high(sum(c.values()) for c in runs) for path, runs in cpu.items()}
    for path, label in (("direct", "direct SDK put_object"), ("api", "through the API")):
        parts = ", ".join(
            f"{g} {v:.2f}" for g, v in med[path].items() if path == "api" or g != "control plane"
        )
        print(f"  CPU-s per upload, {label:21s}: {totals[path]:.2f} ({parts}; median of rounds)")
    if layout.server_cpus == layout.client_cpus:
        print(
            f"  CPU ratio direct / API, {layout.name} : {totals['direct'] / totals['api']:5.2f} "
            "(what the throughput ratio comes to when both paths keep the shared CPUs busy)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 MB, one round")
    ap.add_argument("--size-mb", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument(
        "--layout",
        choices=["own", "shared", "both"],
        default="both",
        help="own: the S3 server on half of the CPUs, the client and control plane on the other half "
        "(as in a deployment, where the server has its own machines); shared: everything on every CPU",
    )
    args = ap.parse_args()
    size = (args.size_mb or (100 if args.quick else 500)) * 1024 * 1024
    rounds = args.rounds or (1 if args.quick else 3)
    if shutil.which("radosgw") is None:
        raise SystemExit("radosgw not installed (apt-get install radosgw ceph-mon ceph-osd)")
    print(f"upload benchmark: {size / 2**20:.0f} MiB x {rounds} round(s), S3 = Ceph radosgw (memstore) on 127.0.0.1, "
          f"part size {PART // 2**20} MiB, {os.cpu_count()} CPUs")  # fmt: skip
    everything = os.sched_getaffinity(0)
    try:
        for layout in layouts(args.layout):
            run_layout(layout, size, rounds)
    finally:
        os.sched_setaffinity(0, everything)


if __name__ == "__main__":
    main()
