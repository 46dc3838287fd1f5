"""Resource bounds of the control plane under a real uvicorn server (issue 16's exhaustion probes).

- A 400 MiB body with no token gets 401 before the server reads it: the server process's peak RSS
  (``VmHWM``) stays within 60 MiB of what it was before.
- 45 concurrent ``logs?follow=true`` streams do not stall another route (each waits on the event
  loop, not in the shared thread pool), and a token holds at most ``max_streams_per_token`` streams.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.domain.ports import ExecStatus
from services.controlplane.executors.local import LocalExecutor

REPO = Path(__file__).resolve().parents[2]
TOKEN = "bounds-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MIB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """``python -m services.controlplane`` on 127.0.0.1 with one token: ``(pid, port)``."""
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HUVIDPO_CONTROLPLANE_PORT": str(port),
        "HUVIDPO_CONTROLPLANE_TOKENS": hashlib.sha256(TOKEN.encode()).hexdigest(),
        "HUVIDPO_CONTROLPLANE_WORK_DIR": str(tmp_path / "work"),
        "HUVIDPO_STORE_ROOT": str(tmp_path / "store"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.controlplane"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("the control plane did not start")
        yield proc.pid, port
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_an_unauthenticated_400_mib_body_is_refused_before_it_is_read(
    server_process: tuple[int, int],
) -> None:
    pid, port = server_process
    before = _peak_rss(pid)
    size = 400 * MIB
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            (
                f"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {size}\r\n\r\n"
            ).encode()
        )
        chunk = b"0" * MIB
        sock.settimeout(0.5)
        response = b""
        # Send until the server answers or stops reading (it answers from the headers alone).
        while sent < size:
            try:
                sock.sendall(chunk)
                sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            try:
                response = sock.recv(65536)
                if response:
                    break
            except TimeoutError:
                continue
        sock.settimeout(10)
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            try:
                more = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not more:
                break
            response += more
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    assert b"application/problem+json" in head and b"bearer token" in body
    assert sent < size  # the server did not take the whole body
    grown = _peak_rss(pid) - before
    assert grown < 60 * MIB, f"peak RSS grew by {grown / MIB:.0f} MiB"


# ------------------------------------------------------------------------------------ log follows
class RunningExecutor(LocalExecutor):
    """The local executor's log follower over a run that never ends (the trainer is quiet)."""

    def status(self, finetune_id: str) -> ExecStatus:
        return ExecStatus("running")


@pytest.fixture
def follow_server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    executor = RunningExecutor(tmp_path / "work", {})
    (executor.runs / "ft-quiet").mkdir(parents=True)
    (executor.runs / "ft-quiet" / "trainer.log").write_bytes(b"step 1\n")
    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(t.encode()).hexdigest() for t in (TOKEN, "other-token")],
        work_dir=tmp_path / "work",
        max_streams_per_token=50,
    )
    app = create_app(settings, LocalStore(tmp_path / "store"), executor, background=False)
    # The follower needs a fine-tune record to exist; the record's contents do not matter here.
    app.state.ctx.finetunes._load = lambda finetune_id: None
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield {"url": f"http://127.0.0.1:{port}", "app": app}
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _follow(url: str, headers: dict[str, str], opened: list[int], stop: threading.Event) -> None:
    with (
        httpx.Client(base_url=url, timeout=30) as c,
        c.stream("GET", "/v1/fine-tunes/ft-quiet/logs?follow=true", headers=headers) as r,
    ):
        opened.append(r.status_code)
        if r.status_code != 200:
            return
        for _ in r.iter_raw():
            if stop.is_set():
                return
        # (the run never ends: the stream closes when the client leaves)


def test_many_log_followers_do_not_stall_other_routes(follow_server: dict[str, Any]) -> None:
    url = follow_server["url"]
    opened: list[int] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_follow, args=(url, AUTH, opened, stop), daemon=True) for _ in range(45)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(opened) < 45 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert opened == [200] * 45
    time.sleep(1.0)  # every follower is waiting for the quiet trainer now
    t0 = time.monotonic()
    r = httpx.get(f"{url}/v1/datasets", headers=AUTH, timeout=30)
    took = time.monotonic() - t0
    assert r.status_code == 200 and took < 2.0, f"another route took {took:.1f} s"
    stop.set()
    # new output wakes every follower, which then leaves
    (Path(follow_server["app"].state.ctx.executor.runs) / "ft-quiet" / "trainer.log").write_bytes(
        b"step 1\nstep 2\n"
    )
    for t in threads:
        t.join(timeout=10)


def test_a_token_holds_at_most_its_limit_of_streams(follow_server: dict[str, Any]) -> None:
    url = follow_server["url"]
    follow_server["app"].state.streams.per_token = 2
    opened: list[int] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_follow, args=(url, AUTH, opened, stop), daemon=True) for _ in range(2)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(opened) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert opened == [200, 200]
    r = httpx.get(f"{url}/v1/fine-tunes/ft-quiet/logs?follow=true", headers=AUTH, timeout=10)
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "2 open streams" in r.json()["detail"] and r.headers.get("Retry-After")
    # another token has its own slots
    with (
        httpx.Client(base_url=url, timeout=10) as c,
        c.stream(
            "GET", "/v1/fine-tunes/ft-quiet/logs?follow=true", headers={"Authorization": "Bearer other-token"}
        ) as other,
    ):
        assert other.status_code == 200
    stop.set()
    (Path(follow_server["app"].state.ctx.executor.runs) / "ft-quiet" / "trainer.log").write_bytes(
        b"step 1\nstep 2\n"
    )
    for t in threads:
        t.join(timeout=10)
