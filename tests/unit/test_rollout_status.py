"""``GET /v1/rollouts/{name}`` status: desired vs served per inference replica, from the heartbeat
records the replicas write (services/inference/heartbeat.py), and the ``Ready`` condition."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.publish import publish_dir
from services.common.records.keys import replica_key
from services.common.settings import ControlPlaneSettings, InferenceSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.inference.heartbeat import Heartbeat
from tests.doubles import IdleExecutor

TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Replica:
    """What a ModelManager shows its heartbeat: ready, and the rollout it applied."""

    def __init__(self, store: LocalStore, name: str) -> None:
        self.ready = True
        self.view: dict[str, Any] = {"revision": 0, "current": "", "canary": "", "canary_percent": 0}
        settings = InferenceSettings(replica_id=name, poll_seconds=5)
        self.heartbeat = Heartbeat(settings, store, self)

    def rollout_view(self) -> dict[str, Any]:
        return self.view

    def serve(self, revision: int, current: str, canary: str = "", percent: int = 0) -> None:
        self.view = {"revision": revision, "current": current, "canary": canary, "canary_percent": percent}
        self.heartbeat.beat()


@pytest.fixture
def env(tmp_path: Path) -> tuple[TestClient, LocalStore]:
    store = LocalStore(tmp_path / "store")
    for step in (10, 20):
        cid = f"ckpt-ft-x-{step}"
        (tmp_path / cid / "adapter").mkdir(parents=True)
        (tmp_path / cid / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * step)
        publish_dir(store, tmp_path / cid, f"checkpoints/{cid}/", {"id": cid, "step": step, "lineage": {}})
    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(TOKEN.encode()).hexdigest()], work_dir=tmp_path / "w"
    )
    return TestClient(create_app(settings, store, IdleExecutor(), background=False)), store


def status(client: TestClient) -> dict[str, Any]:
    r = client.get("/v1/rollouts/default", headers=AUTH)
    assert r.status_code == 200, r.text
    return dict(r.json()["status"])


def ready(st: dict[str, Any]) -> tuple[str, str, str]:
    (cond,) = st["conditions"]
    assert cond["type"] == "Ready"
    return cond["status"], cond["reason"], cond["message"]


def test_ready_when_every_live_replica_serves_the_desired_revision(
    env: tuple[TestClient, LocalStore],
) -> None:
    client, store = env
    rev1 = client.put(
        "/v1/rollouts/default?create=true", json={"checkpoint": "ckpt-ft-x-10"}, headers=AUTH
    ).json()
    st = status(client)
    assert st["desired"] == {"revision": 1, "current": "ckpt-ft-x-10", "canary": None, "canary_percent": 0}
    assert ready(st)[:2] == ("False", "NoReplicas")

    a, b = Replica(store, "inference-a"), Replica(store, "inference-b")
    a.serve(1, "ckpt-ft-x-10")
    b.serve(0, "base")  # still on the base model: it has not applied revision 1
    state, reason, message = ready(status(client))
    assert (state, reason) == ("False", "ReplicasNotUpToDate") and "inference-b" in message
    b.serve(rev1["revision"], "ckpt-ft-x-10")
    st = status(client)
    assert ready(st)[0] == "True"
    assert [
        (r["replica"], r["state"], r["revision"], r["current"], r["up_to_date"]) for r in st["replicas"]
    ] == [
        ("inference-a", "serving", 1, "ckpt-ft-x-10", True),
        ("inference-b", "serving", 1, "ckpt-ft-x-10", True),
    ]

    # A canary: desired changes, so the replicas are behind until they apply it.
    client.post(
        "/v1/rollouts/default/canary", json={"checkpoint": "ckpt-ft-x-20", "percent": 25}, headers=AUTH
    )
    st = status(client)
    assert st["desired"] == {
        "revision": 2,
        "current": "ckpt-ft-x-10",
        "canary": "ckpt-ft-x-20",
        "canary_percent": 25,
    }
    assert ready(st)[:2] == ("False", "ReplicasNotUpToDate")
    a.serve(2, "ckpt-ft-x-10", "ckpt-ft-x-20", 25)
    # b applied revision 2 but refused the canary (its verification failed): served != desired.
    b.serve(2, "ckpt-ft-x-10")
    state, _, message = ready(status(client))
    assert state == "False" and "inference-b" in message and "inference-a" not in message
    b.serve(2, "ckpt-ft-x-10", "ckpt-ft-x-20", 25)
    assert ready(status(client))[0] == "True"


def test_gone_stopped_and_draining_replicas_do_not_hold_the_rollout(
    env: tuple[TestClient, LocalStore],
) -> None:
    client, store = env
    client.put("/v1/rollouts/default?create=true", json={"checkpoint": "ckpt-ft-x-10"}, headers=AUTH)
    up, old, gone, stopping = (Replica(store, n) for n in ("up", "old", "gone", "stopping"))
    up.serve(1, "ckpt-ft-x-10")
    old.serve(0, "base")
    gone.serve(0, "base")
    stopping.serve(0, "base")
    # "gone" died: its record was last refreshed more than 3 of its poll intervals (5 s) ago.
    rec = store.get_json(replica_key("default", "gone"))
    rec["updated_at"] = (datetime.now(UTC) - timedelta(seconds=16)).isoformat()
    store.put_json(replica_key("default", "gone"), rec)
    stopping.heartbeat.stop()  # a clean shutdown writes "stopped" last
    old.heartbeat.drain()  # a draining replica takes no requests: shown, not waited for
    st = status(client)
    assert [(r["replica"], r["state"], r["up_to_date"]) for r in st["replicas"]] == [
        ("old", "draining", False),
        ("up", "serving", True),
    ]
    assert ready(st)[0] == "True"
    # Only a draining replica left: nothing takes requests.
    store.delete(replica_key("default", "up"))
    assert ready(status(client))[:2] == ("False", "NoReplicas")


def test_a_list_has_no_status_and_garbage_under_replicas_is_ignored(
    env: tuple[TestClient, LocalStore],
) -> None:
    client, store = env
    client.put("/v1/rollouts/default?create=true", json={"checkpoint": "base"}, headers=AUTH)
    store.put_bytes(replica_key("default", "junk"), b"not json")
    store.put_json(replica_key("default", "other"), {"deployment": "default"})
    Replica(store, "r1").serve(1, "base")
    (item,) = client.get("/v1/rollouts", headers=AUTH).json()["items"]
    assert item["deployment"] == "default" and item["status"] is None
    st = status(client)
    assert [r["replica"] for r in st["replicas"]] == ["r1"] and ready(st)[0] == "True"
