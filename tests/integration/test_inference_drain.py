"""Graceful drain: SIGTERM to a real ``python -m services.inference`` process under load.

Every request the replica accepted (it answered with a first progress message) must complete with a
result; once the drain began, health is NOT_SERVING and new requests are refused with UNAVAILABLE
saying the replica is draining; the process then exits 0. The counts are printed (``-s``)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.inference.gen import inference_pb2 as pb
from services.inference.gen import inference_pb2_grpc as pb_grpc
from services.inference.testing import image_bytes, inference_env

REPO = Path(__file__).resolve().parents[2]


def request(seed: int, steps: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt="a red ball",
        first_frame_image=image_bytes(seed=1),
        seed=seed,
        steps=steps,
        frames=4,
        height=64,
        width=64,
    )


class Stream:
    """One Generate stream consumed on its own thread: ``accepted`` once the server answered."""

    def __init__(self, stub: pb_grpc.VideoGenerationServiceStub, req: pb.GenerateRequest) -> None:
        self.accepted = threading.Event()
        self.result: pb.GenerationResult | None = None
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._run, args=(stub, req), daemon=True)
        self._thread.start()

    def _run(self, stub: pb_grpc.VideoGenerationServiceStub, req: pb.GenerateRequest) -> None:
        try:
            for event in stub.Generate(req, timeout=300):
                self.accepted.set()
                if event.HasField("result"):
                    self.result = event.result
        except grpc.RpcError as exc:
            self.error = exc

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@pytest.fixture()
def replica(
    tiny_model_dir: Path, tmp_path: Path
) -> Iterator[tuple[Callable[..., tuple[subprocess.Popen[str], str]], dict[int, list[str]]]]:
    """``start(**env)`` runs a replica and returns (process, address); its log lines by pid."""

    def start(**env: str) -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.inference"],
            cwd=REPO,
            env=inference_env(tmp_path, tiny_model_dir, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"listening grpc=\S+:(\d+)", line)
            if m:
                # Keep reading the log so the pipe never fills; the test reads it after exit.
                threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
                logs[proc.pid] = lines
                return proc, f"127.0.0.1:{m.group(1)}"
        raise AssertionError("the inference server did not start:\n" + "".join(lines[-30:]))

    procs: list[subprocess.Popen[str]] = []
    logs: dict[int, list[str]] = {}
    yield start, logs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _wait_serving(channel: grpc.Channel, want: int, timeout: float = 120) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
        except grpc.RpcError:
            status = None
        if status == want:
            return
        assert time.monotonic() < deadline, f"health did not become {want} (is {status})"
        time.sleep(0.05)


def test_sigterm_under_load_finishes_every_accepted_request_and_refuses_new_ones(replica) -> None:  # type: ignore[no-untyped-def]
    start, logs = replica
    proc, address = start(
        HUVIDPO_INFERENCE_MAX_BATCH="2",
        HUVIDPO_INFERENCE_MAX_QUEUE="16",
        HUVIDPO_INFERENCE_BATCH_WAIT_MS="0",
        HUVIDPO_INFERENCE_GRACE_SECONDS="120",
    )
    with grpc.insecure_channel(address) as channel:
        _wait_serving(channel, health_pb2.HealthCheckResponse.SERVING)
        stub = pb_grpc.VideoGenerationServiceStub(channel)
        streams = [Stream(stub, request(seed=i, steps=40)) for i in range(6)]
        for s in streams:
            assert s.accepted.wait(60), "a request was not accepted before SIGTERM"
        proc.send_signal(signal.SIGTERM)
        _wait_serving(channel, health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
        refused: list[grpc.RpcError] = []
        while not all(s.result is not None or s.error is not None for s in streams) and len(refused) < 5:
            with pytest.raises(grpc.RpcError) as err:
                for _ in stub.Generate(request(seed=100 + len(refused), steps=2), timeout=10):
                    pass
            refused.append(err.value)
        rc = proc.wait(120)
        for s in streams:
            s.join(30)

    completed = sum(s.result is not None for s in streams)
    failed = [(s.error.code(), s.error.details()) for s in streams if s.error is not None]
    print(
        f"\ndrain: {len(streams)} accepted, {completed} completed, {len(failed)} failed; "
        f"{len(refused)} new requests refused ({sorted({e.code().name for e in refused})}); exit {rc}"
    )
    assert completed == len(streams), f"accepted requests failed: {failed}"
    assert refused, "the drain ended before a new request could be sent"
    for e in refused:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
        assert "draining" in (e.details() or ""), e.details()
    assert rc == 0, "".join(logs[proc.pid][-30:])
    assert any("every accepted request finished" in ln for ln in logs[proc.pid])


def test_requests_left_at_the_drain_deadline_end_unavailable(replica) -> None:  # type: ignore[no-untyped-def]
    start, _ = replica
    proc, address = start(
        HUVIDPO_INFERENCE_MAX_BATCH="1",
        HUVIDPO_INFERENCE_BATCH_WAIT_MS="0",
        HUVIDPO_INFERENCE_GRACE_SECONDS="1",
        HUVIDPO_INFERENCE_MAX_STEPS="2000",
    )
    with grpc.insecure_channel(address) as channel:
        _wait_serving(channel, health_pb2.HealthCheckResponse.SERVING)
        stub = pb_grpc.VideoGenerationServiceStub(channel)
        streams = [Stream(stub, request(seed=i, steps=900)) for i in range(3)]
        for s in streams:
            assert s.accepted.wait(60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        for s in streams:
            s.join(30)
    assert rc == 0 and time.monotonic() - t0 < 20
    for s in streams:
        assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE, s.error
        assert "drain deadline" in (s.error.details() or "")
