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
    assert_problem,
    publish_checkpoint,
    upload_files,
    validated,
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
    r = client.post(f"/v1/datasets/{name}/versions", files=upload_files(d), headers=AUTH)
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
    session = client.get("/v1/datasets/cats/rating-session", params={"version": v["digest"]}, headers=AUTH)
    assert session.status_code == 200 and session.json()["version"] == v["id"]
    score = {"version": v["digest"], "video_id": "p0_v0", "score": 5}  # the rater is the token's name
    put = client.put("/v1/datasets/cats/ratings/score", json=score, headers=AUTH)
    assert put.status_code == 200 and put.json()["version"] == v["id"]
    # a fine-tune records the one canonical form, so its reference matches the version's id
    ft = _finetune(client, v["digest"])
    assert ft["version"] == v["id"]
    assert_problem(client.delete(f"/v1/datasets/cats/versions/{v['id']}", headers=AUTH), 409, "conflict")
    # a malformed version is still a 422 naming the path parameter (its pattern is in the OpenAPI)
    bad = client.get("/v1/datasets/cats/versions/sha256:xyz", headers=AUTH)
    assert assert_problem(bad, 422, "validation-error")["field"] == "path:version"


# --------------------------------------------------------------------------- ratings of unknown videos
def _ratings(client: TestClient, records: list[dict[str, Any]], name: str = "cats") -> Any:
    return client.post(f"/v1/datasets/{name}/ratings", json={"records": records}, headers=AUTH)


def test_a_rating_of_an_unknown_video_is_refused_naming_the_id(
    env: dict[str, Any], synthetic_dir: Path
) -> None:
    client = env["client"]
    assert client.post("/v1/datasets", json={"name": "empty"}, headers=AUTH).status_code == 201
    none_yet = _ratings(client, [{"video_id": "p0_v0", "rater_id": "ann", "score": 5}], "empty")
    assert "p0_v0" in assert_problem(none_yet, 422, "validation-error")["detail"]
    _upload(client, synthetic_dir)
    bad = _ratings(
        client,
        [
            {"video_id": "p0_v0", "rater_id": "ann", "score": 5},
            {"video_id": "does-not-exist", "rater_id": "ann", "score": 5},
        ],
    )
    body = assert_problem(bad, 422, "validation-error")
    assert body["field"] == "records[1].video_id" and "'does-not-exist'" in body["detail"]
    choice = _ratings(client, [{"type": "choice", "chosen": "p0_v0", "rejected": "nope", "rater_id": "ann"}])
    assert assert_problem(choice, 422, "validation-error")["field"] == "records[0].rejected"
    assert client.get("/v1/datasets/cats/ratings", headers=AUTH).json()["items"] == []  # nothing stored
    ok = _ratings(client, [{"video_id": "p0_v0", "rater_id": "ann", "score": 5}])
    assert ok.status_code == 201, ok.text


def test_stored_ratings_of_unknown_videos_are_reported_not_fatal_and_can_be_deleted(
    env: dict[str, Any], synthetic_dir: Path, tmp_path: Path
) -> None:
    client, store = env["client"], env["store"]
    v1 = _upload(client, synthetic_dir)
    # a rating stored before ratings were checked, naming a video no version has
    legacy = {"type": "rating", "video_id": "does-not-exist", "rater_id": "old", "score": 3}
    store.put_json("datasets/cats/ratings/r-legacy.json", {"id": "r-legacy", "record": legacy})
    good = _ratings(client, [{"video_id": "p0_v1", "rater_id": "ann", "score": 9, "time": "2026-01-02"}])
    assert good.status_code == 201
    [good_id] = good.json()["ids"]
    later = _ratings(client, [{"video_id": "p0_v1", "rater_id": "ann", "score": 2, "time": "2026-01-03"}])
    [later_id] = later.json()["ids"]

    # a new upload (its manifest differs) still commits; the bad record is reported, the good ones kept
    changed = tmp_path / "changed"
    changed.mkdir()
    for p in synthetic_dir.rglob("*"):
        if p.is_file():
            (changed / p.relative_to(synthetic_dir)).parent.mkdir(parents=True, exist_ok=True)
            (changed / p.relative_to(synthetic_dir)).write_bytes(p.read_bytes())
    (changed / "manifest.jsonl").write_text((synthetic_dir / "manifest.jsonl").read_text() + "\n")
    v2 = _upload(client, changed, create=False)
    assert v2["rating_records"] == 2
    assert v2["skipped_ratings"] == [
        {"id": "r-legacy", "reason": "rating of unknown video id 'does-not-exist'"}
    ]
    derived = client.post("/v1/datasets/cats/derive", json={"base": v1["id"]}, headers=AUTH)
    assert derived.status_code == 201, derived.text
    assert [s["id"] for s in derived.json()["skipped_ratings"]] == ["r-legacy"]

    # compiling reports every rating it dropped, and why
    out = client.post("/v1/datasets/cats/ratings/compile", json={"base": v1["id"]}, headers=AUTH)
    assert out.status_code == 201, out.text
    dropped = {d["id"]: d["reason"] for d in out.json()["dropped"]}
    assert dropped.keys() == {"r-legacy", good_id}
    assert "unknown video id 'does-not-exist'" in dropped["r-legacy"]
    assert later_id in dropped[good_id] and "superseded" in dropped[good_id]

    # and the bad record can be deleted
    assert client.delete("/v1/datasets/cats/ratings/r-legacy", headers=AUTH).status_code == 204
    ids = [i["id"] for i in client.get("/v1/datasets/cats/ratings", headers=AUTH).json()["items"]]
    assert "r-legacy" not in ids and len(ids) == 2
    assert_problem(client.delete("/v1/datasets/cats/ratings/r-legacy", headers=AUTH), 404, "not-found")
    again = client.post("/v1/datasets/cats/derive", json={"base": v1["id"]}, headers=AUTH)
    assert again.json()["skipped_ratings"] == []


# ----------------------------------------------------------------------------- upload error messages
def _assert_no_server_path(detail: str) -> None:
    assert "/tmp" not in detail and "huvidpo-" not in detail and "0x" not in detail, detail


def test_upload_errors_name_the_users_files_not_server_paths(
    env: dict[str, Any], synthetic_dir: Path
) -> None:
    client = env["client"]
    assert client.post("/v1/datasets", json={"name": "cats"}, headers=AUTH).status_code == 201
    no_manifest = client.post(
        "/v1/datasets/cats/versions", files=[("files", ("videos/a.mp4", b"x", "video/mp4"))], headers=AUTH
    )
    detail = assert_problem(no_manifest, 422, "validation-error")["detail"]
    assert "no manifest" in detail
    _assert_no_server_path(detail)

    record = {"id": "a", "file": "videos/a.mp4", "prompt": "p"}
    broken = client.post(
        "/v1/datasets/cats/versions",
        files=[
            ("files", ("manifest.jsonl", json.dumps(record).encode() + b"\n", "application/jsonl")),
            ("files", ("videos/a.mp4", b"not a video", "video/mp4")),
        ],
        headers=AUTH,
    )
    # Commit does not decode videos: it answers at once, and the background validation reports the
    # bad video (the version is not lost; a fine-tune of it is refused by the trainer, exit 2).
    assert broken.status_code == 201, broken.text
    assert broken.json()["validation"]["state"] in ("pending", "failed")
    checked = validated(client, "cats", broken.json()["id"])
    assert checked["validation"]["state"] == "failed", checked["validation"]
    assert checked["video_stats"] is None
    detail = "\n".join(checked["validation"]["problems"])
    assert "manifest.jsonl: line 1: field 'file'" in detail and "'videos/a.mp4'" in detail
    _assert_no_server_path(detail)
    assert client.delete(f"/v1/datasets/cats/versions/{checked['id']}", headers=AUTH).status_code == 204

    # with stored ratings, a JSON-list manifest's problem still names that file and its own line
    _upload(client, synthetic_dir, create=False)
    assert _ratings(client, [{"video_id": "p0_v0", "rater_id": "ann", "score": 5}]).status_code == 201
    listed = json.dumps([record, {**record, "id": "b", "prompt": 7}], indent=1).encode()
    as_list = client.post(
        "/v1/datasets/cats/versions",
        files=[
            ("files", ("manifest.json", listed, "application/json")),
            ("files", ("videos/a.mp4", (synthetic_dir / "videos" / "p0_v0.mp4").read_bytes(), "video/mp4")),
        ],
        headers=AUTH,
    )
    detail = assert_problem(as_list, 422, "validation-error")["detail"]
    assert "manifest.json: line 7: field 'prompt'" in detail and "manifest.jsonl" not in detail
    _assert_no_server_path(detail)


# ------------------------------------------------------------------------------------- retention
def test_a_dataset_only_finished_finetunes_without_checkpoints_used_can_be_deleted(
    env: dict[str, Any], synthetic_dir: Path
) -> None:
    client, executor = env["client"], env["executor"]
    v = _upload(client, synthetic_dir)
    failed, cancelled = _finetune(client, v["id"]), _finetune(client, v["id"])
    held = assert_problem(client.delete("/v1/datasets/cats", headers=AUTH), 409, "conflict")["detail"]
    assert failed["id"] in held and "queued" in held
    assert_problem(client.delete(f"/v1/datasets/cats/versions/{v['id']}", headers=AUTH), 409, "conflict")
    executor.phases[failed["id"]] = ExecStatus("failed", "BackoffLimitExceeded", "exit code 1")
    assert client.post(f"/v1/fine-tunes/{cancelled['id']}/cancel", headers=AUTH).status_code == 200
    assert client.delete("/v1/datasets/cats", headers=AUTH).status_code == 204
    assert_problem(client.get("/v1/datasets/cats", headers=AUTH), 404, "not-found")
    # the fine-tunes' records stay, naming what they used
    assert client.get(f"/v1/fine-tunes/{failed['id']}", headers=AUTH).json()["version"] == v["id"]


def test_checkpoints_hold_their_dataset_and_rollouts_hold_their_checkpoints(
    env: dict[str, Any], synthetic_dir: Path
) -> None:
    client, executor, store, tmp = env["client"], env["executor"], env["store"], env["tmp"]
    v = _upload(client, synthetic_dir)
    ft = _finetune(client, v["id"])["id"]
    active = assert_problem(client.delete(f"/v1/fine-tunes/{ft}", headers=AUTH), 409, "conflict")["detail"]
    assert "queued" in active and "cancel" in active
    executor.phases[ft] = ExecStatus("succeeded")
    a = publish_checkpoint(store, tmp, ft, 10)
    b = publish_checkpoint(store, tmp, ft, 20)
    held = assert_problem(client.delete("/v1/datasets/cats", headers=AUTH), 409, "conflict")["detail"]
    assert a in held and b in held
    has = assert_problem(client.delete(f"/v1/fine-tunes/{ft}", headers=AUTH), 409, "conflict")["detail"]
    assert a in has and b in has

    assert (
        client.put("/v1/rollouts/live?create=true", json={"checkpoint": a}, headers=AUTH).status_code == 200
    )
    body = {"checkpoint": b, "percent": 10}
    assert client.post("/v1/rollouts/live/canary", json=body, headers=AUTH).status_code == 200
    current = assert_problem(client.delete(f"/v1/checkpoints/{a}", headers=AUTH), 409, "conflict")["detail"]
    assert "'live'" in current and "current" in current
    canary = assert_problem(client.delete(f"/v1/checkpoints/{b}", headers=AUTH), 409, "conflict")["detail"]
    assert "'live'" in canary and "canary" in canary

    other = publish_checkpoint(store, tmp, "ft-other", 1)
    assert client.put("/v1/rollouts/live", json={"checkpoint": other}, headers=AUTH).status_code == 200
    for cid in (a, b):
        assert client.delete(f"/v1/checkpoints/{cid}", headers=AUTH).status_code == 204
        assert_problem(client.get(f"/v1/checkpoints/{cid}", headers=AUTH), 404, "not-found")
    assert_problem(client.delete(f"/v1/checkpoints/{a}", headers=AUTH), 404, "not-found")
    assert client.delete(f"/v1/fine-tunes/{ft}", headers=AUTH).status_code == 204
    assert_problem(client.get(f"/v1/fine-tunes/{ft}", headers=AUTH), 404, "not-found")
    assert store.list(f"finetunes/{ft}/") == []
    assert client.delete(f"/v1/datasets/cats/versions/{v['id']}", headers=AUTH).status_code == 204


def test_a_base_model_is_held_by_its_fine_tunes_until_they_hold_nothing(
    env: dict[str, Any], synthetic_dir: Path
) -> None:
    client, executor, store, tmp = env["client"], env["executor"], env["store"], env["tmp"]
    v = _upload(client, synthetic_dir)
    ft = _finetune(client, v["id"])["id"]
    active = assert_problem(client.delete("/v1/models/tiny", headers=AUTH), 409, "conflict")["detail"]
    assert active == f"model tiny cannot be deleted: fine-tune {ft} is queued"
    executor.phases[ft] = ExecStatus("succeeded")
    ckpt = publish_checkpoint(store, tmp, ft, 10)
    held = assert_problem(client.delete("/v1/models/tiny", headers=AUTH), 409, "conflict")["detail"]
    assert ckpt in held
    assert client.get("/v1/models/tiny", headers=AUTH).status_code == 200  # a refusal loses nothing

    assert client.delete(f"/v1/checkpoints/{ckpt}", headers=AUTH).status_code == 204
    assert client.delete("/v1/models/tiny", headers=AUTH).status_code == 204
    assert_problem(client.get("/v1/models/tiny", headers=AUTH), 404, "not-found")
    assert store.list("models/tiny/") == []
    assert_problem(client.delete("/v1/models/tiny", headers=AUTH), 404, "not-found")
    # the fine-tune's record stays, naming its base model; a new one against it is refused
    assert client.get(f"/v1/fine-tunes/{ft}", headers=AUTH).json()["base_model"] == "tiny"
    hp = {"max_steps": 1, "num_frames": 4, "height": 32, "width": 32}
    body = {"dataset": "cats", "version": v["id"], "base_model": "tiny", "hyperparameters": hp}
    problem = assert_problem(client.post("/v1/fine-tunes", json=body, headers=AUTH), 422, "validation-error")
    assert problem["field"] == "base_model"
