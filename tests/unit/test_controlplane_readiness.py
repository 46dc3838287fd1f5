"""/readyz and /healthz of the control plane: a store outage is reported, not used to drop the pod.

Every replica shares one store: if readiness followed the store, a store restart would take every
control-plane replica out of its Service at once, and clients would get connection errors instead of
the API's own 503 problems. Readiness follows what is per-pod (the executor); liveness stays separate.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app


class FlakyStore(LocalStore):
    """A LocalStore whose health check fails while ``down`` is set."""

    down = False

    def check(self) -> None:
        if self.down:
            raise ConnectionError("store unreachable")
        super().check()


class Executor:
    up = True
    kind = "fake"

    def ready(self) -> bool:
        return self.up


def _client(tmp_path: Path) -> tuple[TestClient, FlakyStore, Executor]:
    store = FlakyStore(tmp_path / "store")
    executor = Executor()
    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(b"t").hexdigest()], work_dir=tmp_path / "work", max_upload_bytes=1000
    )
    app = create_app(settings, store, executor, background=False)  # type: ignore[arg-type]
    return TestClient(app), store, executor


def test_readyz_stays_ready_and_reports_the_store_when_only_the_store_is_down(tmp_path: Path) -> None:
    client, store, executor = _client(tmp_path)
    ok: Any = client.get("/readyz")
    assert ok.status_code == 200 and ok.json() == {
        "status": "ok",
        "checks": {"store": "ok", "executor": "ok"},
    }

    store.down = True
    degraded = client.get("/readyz")
    assert degraded.status_code == 200
    body = degraded.json()
    assert body["status"] == "degraded"
    assert body["checks"] == {"store": "unavailable: ConnectionError", "executor": "ok"}
    assert client.get("/healthz").status_code == 200  # liveness never looks at dependencies

    executor.up = False  # this pod cannot start or watch trainer Jobs: not ready
    down = client.get("/readyz")
    assert down.status_code == 503 and down.json()["status"] == "unavailable"
    assert client.get("/healthz").status_code == 200
