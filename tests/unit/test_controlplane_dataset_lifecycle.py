"""Datasets over their life: ratings checked against the current version, a version named by either of
its two forms, and the retention rule (what may be deleted while fine-tunes, checkpoints and rollouts
use it). REST through the app over a LocalStore with a fake executor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.publish import publish_dir
from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.domain.ports import ExecStatus
from tests.unit.test_controlplane_api import (
    AUTH,
    TOKEN,
    FakeExecutor,
    _files,
    _is_problem,
    _publish_checkpoint,
)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from huvidpo.data import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("ds") / "d", n_prompts=1, videos_per_prompt=3, num_frames=4, size=32
    )


@pytest.fixture
def env(tmp_path: Path, tiny_model_dir: Path) -> dict[str, Any]:
    store = LocalStore(tmp_path / "store")
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(TOKEN.encode()).hexdigest()], work_dir=tmp_path / "work"
    )
    executor = FakeExecutor()
    client = TestClient(create_app(settings, store, executor, background=False))
    return {"store": store, "executor": executor, "client": client, "tmp": tmp_path}


def _upload(client: TestClient, d: Path, name: str = "cats", create: bool = True) -> dict[str, Any]:
    if create:
        assert client.post("/v1/datasets", json={"name": name}, headers=AUTH).status_code == 201
    r = client.post(f"/v1/datasets/{name}/versions", files=_files(d), headers=AUTH)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _finetune(client: TestClient, version: str) -> dict[str, Any]:
    body = {
        "dataset": "cats",
        "version": version,
        "base_model": "tiny",
        "hyperparameters": {"max_steps": 3, "num_frames": 4, "height": 32, "width": 32},
    }
    r = client.post("/v1/fine-tunes", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    return dict(r.json())


# ------------------------------------------------------------------------------- version id forms
def test_a_version_is_named_by_its_id_or_its_digest_everywhere(
    env: dict[str, Any], synthetic_dir: Path
) -> None:
    client = env["client"]
    v = _upload(client, synthetic_dir)
    assert v["digest"] == "sha256:" + v["id"]
    got = client.get(f"/v1/datasets/cats/versions/{v['digest']}", headers=AUTH)
    assert got.status_code == 200, got.text
    assert got.json()["id"] == v["id"]
    pairs = client.post(f"/v1/datasets/cats/versions/{v['digest']}/pairs", json={}, headers=AUTH)
    assert pairs.status_code == 200, pairs.text
    assert pairs.json()["version"] == v["id"]
    derived = client.post("/v1/datasets/cats/derive", json={"base": v["digest"]}, headers=AUTH)
    assert derived.status_code == 201, derived.text
    session = client.get(
        "/v1/datasets/cats/rating-session", params={"rater_id": "ann", "version": v["digest"]}, headers=AUTH
    )
    assert session.status_code == 200 and session.json()["version"] == v["id"]
    score = {"version": v["digest"], "rater_id": "ann", "video_id": "p0_v0", "score": 5}
    put = client.put("/v1/datasets/cats/ratings/score", json=score, headers=AUTH)
    assert put.status_code == 200 and put.json()["version"] == v["id"]
    # a fine-tune records the one canonical form, so its reference matches the version's id
    ft = _finetune(client, v["digest"])
    assert ft["version"] == v["id"]
    _is_problem(client.delete(f"/v1/datasets/cats/versions/{v['id']}", headers=AUTH), 409, "conflict")
    # a malformed version is still a 422 naming the field
    bad = client.get("/v1/datasets/cats/versions/sha256:xyz", headers=AUTH)
    assert _is_problem(bad, 422, "validation-error")["field"] == "version"
