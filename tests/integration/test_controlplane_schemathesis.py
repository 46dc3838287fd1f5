"""schemathesis against the served OpenAPI document: property-based requests, no 5xx allowed.

The control plane runs under uvicorn on 127.0.0.1 over a LocalStore with a fake executor; the run is
time-boxed. schemathesis exits non-zero when a check fails; the check here is ``not_a_server_error``.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from tests.doubles import IdleExecutor

MAX_SECONDS = 60


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    from services.common.publish import publish_dir

    store = LocalStore(tmp_path / "store")
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(b"fuzz-token").hexdigest()],
        work_dir=tmp_path / "work",
        max_upload_bytes=1_000_000,
    )
    app = create_app(settings, store, IdleExecutor((b"log\n",)), background=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    try:
        proc = subprocess.run(
            [
                cli,
                "run",
                f"http://127.0.0.1:{port}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-time",
                str(MAX_SECONDS),
                "--max-examples",
                "30",
                "--request-timeout",
                "30",
                "--seed",
                "20261125",
                "-H",
                "Authorization: Bearer fuzz-token",
            ],
            capture_output=True,
            text=True,
            timeout=MAX_SECONDS + 120,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    summary = proc.stdout[-6000:]
    assert "ST101" not in proc.stdout, summary
    assert proc.returncode == 0, summary
