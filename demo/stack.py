"""The services of the loop as subprocesses on 127.0.0.1: the control plane (REST, with its executor)
and the inference service (gRPC + metrics). Used by ``python -m demo`` and by ``tests/e2e``.

Each process gets its settings through ``HUVIDPO_*`` variables (the services read nothing else), logs
to a file of its own, and is stopped by its PID: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing listens on right now on 127.0.0.1 (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StackError(RuntimeError):
    """A service did not start (the message carries the tail of its log)."""


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return "(no log)"


@dataclass
class Service:
    """One running subprocess and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 15.0, kill: bool = False) -> int | None:
        """SIGTERM (SIGKILL with ``kill``), wait ``grace`` seconds, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@dataclass
class Stack:
    """Starts and stops the control plane and the inference service for one store.

    ``store_env`` holds the ``HUVIDPO_STORE_*`` variables every process (and the trainers the local
    executor starts) shares; ``extra_env`` is added to every process (e.g. ``HUVIDPO_CONTROLPLANE_EXECUTOR``).
    """

    work_dir: Path
    store_env: Mapping[str, str]
    extra_env: Mapping[str, str] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    deployment: str = "default"
    base_model: str = "models/tiny"
    poll_seconds: float = 1.0
    controlplane_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    controlplane: Service | None = None
    inference: Service | None = None

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir).resolve()
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------------------------- addresses
    @property
    def controlplane_url(self) -> str:
        return f"http://127.0.0.1:{self.controlplane_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def inference_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    # -------------------------------------------------------------------------------- processes
    def _env(self, own: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUVIDPO_")}
        env.update(
            {
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_VERBOSITY": "error",
                "DIFFUSERS_VERBOSITY": "error",
                "PYTHONUNBUFFERED": "1",
                # Two cores shared by three processes: more torch threads only oversubscribe them.
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            }
        )
        # One token table for both services: the demo's own token, named "demo", with every scope.
        env["HUVIDPO_TOKENS"] = f"demo:admin:{hashlib.sha256(self.token.encode()).hexdigest()}"
        env.update(self.store_env)
        env.update(self.extra_env)
        env.update(own)
        return env

    def _spawn(self, name: str, module: str, env: dict[str, str]) -> Service:
        log = self.work_dir / "logs" / f"{name}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", module],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        return Service(name, proc, log)

    def start_controlplane(self, timeout: float = 90.0) -> Service:
        """Start (or restart) the control plane on its port and wait until ``/readyz`` answers 200."""
        env = self._env(
            {
                "HUVIDPO_CONTROLPLANE_HOST": "127.0.0.1",
                "HUVIDPO_CONTROLPLANE_PORT": str(self.controlplane_port),
                "HUVIDPO_CONTROLPLANE_WORK_DIR": str(self.work_dir / "controlplane"),
                "HUVIDPO_STORE_PUBLIC_BASE_URL": self.controlplane_url,
                # The trainers it starts (local executor) inherit this: one torch thread each. Two
                # OpenMP threads on two loaded cores wait on each other (a DPO step of the demo took
                # 15-20 s instead of 0.3 s, measured at load 12).
                "OMP_NUM_THREADS": "1",
            }
        )
        svc = self._spawn("controlplane", "services.controlplane", env)
        self.controlplane = svc
        deadline = time.monotonic() + timeout
        while True:
            if not svc.alive():
                raise StackError(f"the control plane exited with {svc.proc.returncode}:\n{_tail(svc.log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.controlplane_url + "/readyz", timeout=2).status_code == 200:
                    return svc
            if time.monotonic() > deadline:
                raise StackError(f"the control plane was not ready in {timeout:.0f} s:\n{_tail(svc.log)}")
            time.sleep(0.2)

    def start_inference(self, settings: Mapping[str, str] | None = None, timeout: float = 180.0) -> Service:
        """Start the inference service and wait until its gRPC health check says SERVING."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        own = {
            "HUVIDPO_INFERENCE_HOST": "127.0.0.1",
            "HUVIDPO_INFERENCE_PORT": str(self.grpc_port),
            "HUVIDPO_INFERENCE_METRICS_PORT": str(self.metrics_port),
            "HUVIDPO_INFERENCE_BASE_MODEL": self.base_model,
            "HUVIDPO_INFERENCE_DEPLOYMENT": self.deployment,
            "HUVIDPO_INFERENCE_POLL_SECONDS": str(self.poll_seconds),
            "HUVIDPO_INFERENCE_CACHE_DIR": str(self.work_dir / "inference"),
            "HUVIDPO_INFERENCE_GRACE_SECONDS": "5",
        }
        own.update({f"HUVIDPO_INFERENCE_{k.upper()}": v for k, v in (settings or {}).items()})
        svc = self._spawn("inference", "services.inference", self._env(own))
        self.inference = svc
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.grpc_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not svc.alive():
                    raise StackError(
                        f"the inference service exited with {svc.proc.returncode}:\n{_tail(svc.log)}"
                    )
                with contextlib.suppress(grpc.RpcError):
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return svc
                if time.monotonic() > deadline:
                    raise StackError(
                        f"the inference service was not serving in {timeout:.0f} s:\n{_tail(svc.log)}"
                    )
                time.sleep(0.3)

    def stop(self) -> dict[str, Any]:
        """Stop both services (inference first: it may be answering a request); returns their exit codes."""
        codes: dict[str, Any] = {}
        for svc in (self.inference, self.controlplane):
            if svc is not None:
                codes[svc.name] = svc.stop()
        return codes

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_store_env(root: Path) -> dict[str, str]:
    """``HUVIDPO_STORE_*`` for the embedded default: a local directory."""
    return {"HUVIDPO_STORE_BACKEND": "local", "HUVIDPO_STORE_ROOT": str(Path(root).resolve())}


def s3_store_env(
    endpoint: str, access_key: str, secret_key: str, bucket: str, **extra: str
) -> dict[str, str]:
    """``HUVIDPO_STORE_*`` for an S3 server (MinIO, Ceph radosgw, AWS)."""
    env = {
        "HUVIDPO_STORE_BACKEND": "s3",
        "HUVIDPO_STORE_ENDPOINT": endpoint,
        "HUVIDPO_STORE_ACCESS_KEY": access_key,
        "HUVIDPO_STORE_SECRET_KEY": secret_key,
        "HUVIDPO_STORE_BUCKET": bucket,
    }
    env.update({f"HUVIDPO_STORE_{k.upper()}": v for k, v in extra.items()})
    return env
