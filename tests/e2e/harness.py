"""Helpers of the end-to-end tests: the store the services use, a real Prometheus, a TCP proxy that
cuts the object store, and settings of a fresh S3 bucket."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from demo.stack import Stack, free_port, s3_store_env
from huvidpo.client import Client
from services.common.settings import StoreSettings
from services.common.store import ObjectStore, make_store


def store_from_env(env: dict[str, str]) -> ObjectStore:
    """The ``ObjectStore`` the services build from the same ``HUVIDPO_STORE_*`` variables."""
    prefix = "HUVIDPO_STORE_"
    values: dict[str, Any] = {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}
    return make_store(StoreSettings(**values))


class Running:
    """A started stack plus the handles a test uses: ``cp`` is the SDK client of its control plane
    and inference service."""

    def __init__(self, stack: Stack, store: ObjectStore, model_digest: str) -> None:
        self.stack = stack
        self.store = store
        self.model_digest = model_digest
        self.cp = Client(stack.controlplane_url, stack.token, stack.grpc_address, timeout=120.0)

    def close(self) -> None:
        self.cp.close()
        self.stack.stop()


# ------------------------------------------------------------------------------------ Prometheus
class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping ``targets`` every second; ``query`` is PromQL over HTTP."""

    def __init__(self, binary: str, targets: dict[str, str], work: Path) -> None:
        self.port = free_port()
        self.work = work
        lines = ["global:", "  scrape_interval: 1s", "  evaluation_interval: 1s", "scrape_configs:"]
        for job, url in targets.items():
            parsed = urllib.parse.urlparse(url)
            lines += [
                f"  - job_name: {job}",
                f"    metrics_path: {parsed.path or '/metrics'}",
                "    static_configs:",
                f"      - targets: ['{parsed.netloc}']",
            ]
        (work / "prometheus.yml").write_text("\n".join(lines) + "\n")
        self.log = open(work / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"prometheus did not start: {(work / 'prometheus.log').read_text()[-2000:]}"
                )
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, promql: str) -> float | None:
        """The single value of an instant query (None when it returns nothing)."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, promql: str, pred: Callable[[float], bool], timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            v = self.value(promql)
            if v is not None and pred(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql} = {v} after {timeout:.0f} s")
            time.sleep(1.0)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


# ------------------------------------------------------------------------------------ store outage
class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target``; ``down()`` closes every connection and refuses
    new ones until ``up()``: an object store that is briefly unavailable."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.available = True
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if not self.available:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        self.available = False
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()

    def up(self) -> None:
        self.available = True

    def close(self) -> None:
        self._closed = True
        self.down()
        self._sock.close()


def fresh_bucket_env(endpoint: dict[str, str], **extra: str) -> dict[str, str]:
    """Store settings for a new bucket on the S3 server (the services create it)."""
    return s3_store_env(
        endpoint["endpoint"],
        endpoint["access_key"],
        endpoint["secret_key"],
        f"e2e-{uuid.uuid4().hex[:16]}",
        region=endpoint.get("region", "us-east-1"),
        part_size=str(5 * 1024 * 1024),
        **extra,
    )
