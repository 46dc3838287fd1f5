"""schemathesis against the served OpenAPI document: property-based requests, every check, 0 failures.

The control plane runs under uvicorn on 127.0.0.1 over a LocalStore with a fake executor; the run is
time-boxed with a fixed seed. ``--checks all``: no 5xx, every status and content type documented,
responses fit their schema, schema-valid requests accepted and invalid ones refused, 405 with ``Allow``
for methods a path does not take, created resources found, auth enforced. The few refusals no schema
can state (a body naming something not stored) are listed, with the reason, in
``schemathesis/schemathesis.toml``; ``schemathesis/hooks.py`` leaves made-up page tokens out of
schema-valid cases (only a token the API issued is one).
"""

from __future__ import annotations

import hashlib
import json
import os
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
HERE = Path(__file__).parent / "schemathesis"


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
    report_path = tmp_path / "schemathesis.json"
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    try:
        proc = subprocess.run(
            [
                cli,
                "--config-file",
                str(HERE / "schemathesis.toml"),
                "run",
                f"http://127.0.0.1:{port}/openapi.json",
                "--checks",
                "all",
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
                "--report",
                "json",
                "--report-json-path",
                str(report_path),
            ],
            capture_output=True,
            text=True,
            timeout=MAX_SECONDS + 120,
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(HERE / "hooks.py")},
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    summary = proc.stdout[-8000:] + proc.stderr[-2000:]
    assert "ST101" not in proc.stdout, summary  # no server error, whatever else
    report = json.loads(report_path.read_text())
    assert report["failures"] == [] and report["errors"] == [], summary
    assert report["operations"]["tested"] == report["operations"]["total"], summary
    assert proc.returncode == 0, summary
