"""The control plane's REST API over a LocalStore, with a fake executor the test drives.

Covers datasets (streamed multipart upload, digests, ratings, pairs, delete refused while referenced),
fine-tunes (validation, idempotency, state derivation, restart, cancel, progress), checkpoints,
rollouts, problem+json everywhere, auth and metrics.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.publish import publish_dir, read_rollout
from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.domain.ports import ExecStatus, JobSpec
from services.controlplane.problems import PROBLEM_BASE

TOKEN = "s3cret-write"
READ_TOKEN = "s3cret-read"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeExecutor:
    """Records submits; the test sets each Job's phase like a Job controller would."""

    kind = "fake"

    def __init__(self) -> None:
        self.submits: list[str] = []
        self.phases: dict[str, ExecStatus] = {}
        self.cancelled: list[str] = []

    def submit(self, spec: JobSpec) -> dict[str, str]:
        if spec.finetune_id not in self.phases:
            self.submits.append(spec.finetune_id)
            self.phases[spec.finetune_id] = ExecStatus("pending")
        return {"kind": "fake", "name": f"job-{spec.finetune_id}"}

    def status(self, finetune_id: str) -> ExecStatus:
        return self.phases.get(finetune_id, ExecStatus("missing"))

    def cancel(self, finetune_id: str) -> None:
        self.cancelled.append(finetune_id)
        self.phases.pop(finetune_id, None)

    def logs(self, finetune_id: str, follow: bool = False) -> Iterator[bytes]:
        return iter([b"line 1\n", b"line 2\n"])

    def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from huvidpo.data import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("ds") / "d", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32
    )


@pytest.fixture
def env(tmp_path: Path, tiny_model_dir: Path) -> dict[str, Any]:
    store = LocalStore(tmp_path / "store")
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(TOKEN.encode()).hexdigest()],
        read_tokens=[hashlib.sha256(READ_TOKEN.encode()).hexdigest()],
        work_dir=tmp_path / "work",
        max_upload_bytes=2_000_000,
    )
    executor = FakeExecutor()
    app = create_app(settings, store, executor, background=False)
    return {
        "store": store,
        "settings": settings,
        "executor": executor,
        "client": TestClient(app),
        "tmp": tmp_path,
    }


def upload_files(d: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("files", (p.relative_to(d).as_posix(), p.read_bytes(), "application/octet-stream"))
        for p in sorted(d.rglob("*"))
        if p.is_file()
    ]


def _dataset(client: TestClient, synthetic_dir: Path, name: str = "cats") -> dict[str, Any]:
    assert client.post("/v1/datasets", json={"name": name}, headers=AUTH).status_code == 201
    r = client.post(f"/v1/datasets/{name}/versions", files=upload_files(synthetic_dir), headers=AUTH)
    assert r.status_code == 201, r.text
    return dict(r.json())


def validated(client: Any, name: str, version: str, timeout: float = 60.0) -> dict[str, Any]:
    """The version once its background validation (decoding every video) has a result."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        v: dict[str, Any] = client.get(f"/v1/datasets/{name}/versions/{version}", headers=AUTH).json()
        if v["validation"]["state"] != "pending" or time.monotonic() > deadline:
            return v
        time.sleep(0.05)


def assert_problem(r: Any, status: int, kind: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = dict(r.json())
    assert body["type"] == PROBLEM_BASE + kind
    assert body["status"] == status
    return body


def test_upload_makes_an_immutable_version_named_by_its_digest(
    env: dict[str, Any], synthetic_dir: Path
) -> None:
    client = env["client"]
    v1 = _dataset(client, synthetic_dir)
    assert len(v1["id"]) == 64 and v1["videos"] == 2
    assert set(v1["files"]) == {
        "data/" + p.relative_to(synthetic_dir).as_posix() for p in synthetic_dir.rglob("*") if p.is_file()
    }
    # the same content again is the same version (no duplicate)
    again = client.post("/v1/datasets/cats/versions", files=upload_files(synthetic_dir), headers=AUTH)
    assert again.status_code == 201 and again.json()["id"] == v1["id"]
    assert client.get("/v1/datasets/cats", headers=AUTH).json()["versions"] == [v1["id"]]
    # stored bytes match what was sent (a video stays where it was staged; the manifest names its key)
    store: LocalStore = env["store"]
    video = next(k for k in v1["files"] if k.endswith(".mp4"))
    entry = store.get_json(f"datasets/cats/{v1['id']}/manifest.json")["files"][video]
    assert entry["key"].startswith("datasets/cats/uploads/")
    assert store.get_bytes(entry["key"]) == (synthetic_dir / video[len("data/") :]).read_bytes()


def test_ratings_make_a_new_version_and_pairs_compile_with_a_report(
    env: dict[str, Any], synthetic_dir: Path
) -> None:
    client = env["client"]
    v1 = _dataset(client, synthetic_dir)
    manifest = [
        json.loads(x) for x in (synthetic_dir / "manifest.jsonl").read_text().splitlines() if x.strip()
    ]
    vids = [m["id"] for m in manifest if m.get("type", "video") == "video" and "id" in m]
    r = client.post(
        "/v1/datasets/cats/ratings",
        json={"records": [{"type": "rating", "video_id": vids[1], "rater_id": "zoe", "score": 10}]},
        headers=AUTH,
    )
    assert r.status_code == 201 and len(r.json()["ids"]) == 1
    v2 = client.post("/v1/datasets/cats/derive", json={"base": v1["id"]}, headers=AUTH)
    assert v2.status_code == 201, v2.text
    assert v2.json()["id"] != v1["id"] and v2.json()["rating_records"] == 1
    report = client.post(
        f"/v1/datasets/cats/versions/{v1['id']}/pairs", json={"tie_policy": "drop"}, headers=AUTH
    )
    assert report.status_code == 200, report.text
    assert report.json()["pairs"] >= 1 and "pairs" in report.json()["text"].lower()
    # a rating of an unknown video is refused when posted (it would poison every later version)
    bad = client.post(
        "/v1/datasets/cats/ratings",
        json={"records": [{"type": "rating", "video_id": "nope", "rater_id": "x", "score": 1}]},
        headers=AUTH,
    )
    assert "nope" in assert_problem(bad, 422, "validation-error")["detail"]


def test_upload_without_a_manifest_to_a_dataset_with_ratings_is_a_422_not_a_500(env: dict[str, Any]) -> None:
    # Found by schemathesis: appending stored ratings to an upload that has no manifest raised past
    # the validation error mapping.
    client = env["client"]
    client.post("/v1/datasets", json={"name": "rated"}, headers=AUTH)
    # stored directly, as before ratings were checked: the API now refuses a rating of a dataset without a version
    record = {"type": "rating", "video_id": "v1", "rater_id": "zoe", "score": 7}
    env["store"].put_json("datasets/rated/ratings/r-old.json", {"id": "r-old", "record": record})
    bad = client.post(
        "/v1/datasets/rated/versions", files=[("files", ("v.mp4", b"not a video", "video/mp4"))], headers=AUTH
    )
    assert "no manifest" in assert_problem(bad, 422, "validation-error")["detail"]
    assert client.get("/v1/datasets/rated/versions", headers=AUTH).json()["items"] == []


def test_upload_limits_types_and_names(env: dict[str, Any], synthetic_dir: Path) -> None:
    client = env["client"]
    client.post("/v1/datasets", json={"name": "d1"}, headers=AUTH)
    too_big = client.post(
        "/v1/datasets/d1/versions", files=[("files", ("v.mp4", b"x" * 2_100_000, "video/mp4"))], headers=AUTH
    )
    assert_problem(too_big, 413, "payload-too-large")
    exe = client.post(
        "/v1/datasets/d1/versions", files=[("files", ("run.sh", b"rm -rf /", "text/x-sh"))], headers=AUTH
    )
    assert_problem(exe, 415, "unsupported-media-type")
    trav = client.post(
        "/v1/datasets/d1/versions",
        files=[("files", ("../../etc/x.json", b"{}", "application/json"))],
        headers=AUTH,
    )
    assert_problem(trav, 422, "validation-error")
    ctl = client.post(
        "/v1/datasets/d1/versions",
        files=[("files", ("a\x01b.json", b"{}", "application/json"))],
        headers=AUTH,
    )
    assert ctl.status_code in (400, 422)
    bad_name = client.post("/v1/datasets", json={"name": "../x"}, headers=AUTH)
    body = assert_problem(bad_name, 422, "validation-error")
    assert body["errors"][0]["field"] == "name"
    not_multipart = client.post(
        "/v1/datasets/d1/versions", content=b"{}", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_problem(not_multipart, 415, "unsupported-media-type")
    # nothing half-written: no version exists, and the failed uploads left no staged files
    assert client.get("/v1/datasets/d1", headers=AUTH).json()["versions"] == []
    assert env["store"].list("datasets/d1/uploads/") == []


def test_presigned_upload_then_commit(env: dict[str, Any], synthetic_dir: Path) -> None:
    client = env["client"]
    client.post("/v1/datasets", json={"name": "big"}, headers=AUTH)
    up = client.post("/v1/datasets/big/uploads", headers=AUTH).json()
    paths = [p.relative_to(synthetic_dir).as_posix() for p in synthetic_dir.rglob("*") if p.is_file()]
    urls = client.post(
        f"/v1/datasets/big/uploads/{up['id']}/presign", json={"files": paths}, headers=AUTH
    ).json()["urls"]
    for path, url in urls.items():
        # LocalStore presigned URLs are served by this app (at the address the request used); the
        # signature is the authorisation
        r = client.put(url, content=(synthetic_dir / path).read_bytes())
        assert r.status_code == 200, r.text
    first = next(iter(urls.values()))
    flipped = first[:-1] + ("0" if first[-1] != "0" else "1")  # one hex digit of the signature changed
    assert_problem(client.put(flipped, content=b"x"), 403, "forbidden")
    v = client.post(f"/v1/datasets/big/uploads/{up['id']}/commit", json={}, headers=AUTH)
    assert v.status_code == 201, v.text
    assert v.json()["videos"] == 2


def _create_ft(client: TestClient, version: str, key: str | None = None, **extra: Any) -> Any:
    body = {
        "dataset": "cats",
        "version": version,
        "base_model": "tiny",
        "hyperparameters": {"max_steps": 3, "num_frames": 4, "height": 32, "width": 32},
    }
    body.update(extra)
    headers = {**AUTH, **({"Idempotency-Key": key} if key else {})}
    return client.post("/v1/fine-tunes", json=body, headers=headers)


def test_finetune_is_validated_before_anything_is_scheduled(env: dict[str, Any], synthetic_dir: Path) -> None:
    client, executor = env["client"], env["executor"]
    v = _dataset(client, synthetic_dir)
    bad_hp = _create_ft(client, v["id"], hyperparameters={"lr": -1})
    assert assert_problem(bad_hp, 422, "validation-error")["field"].endswith("hyperparameters.lr")
    unknown = _create_ft(client, v["id"], hyperparameters={"lerning_rate": 1})
    assert_problem(unknown, 422, "validation-error")
    reserved = _create_ft(client, v["id"], hyperparameters={"output_dir": "/etc"})
    assert_problem(reserved, 422, "validation-error")
    no_model = _create_ft(client, v["id"], base_model="sd15")
    assert assert_problem(no_model, 422, "validation-error")["field"] == "base_model"
    no_version = _create_ft(client, "0" * 64)
    assert assert_problem(no_version, 422, "validation-error")["field"] == "version"
    assert executor.submits == []


def test_retry_with_same_idempotency_key_creates_one_job(env: dict[str, Any], synthetic_dir: Path) -> None:
    client, executor = env["client"], env["executor"]
    v = _dataset(client, synthetic_dir)
    first = _create_ft(client, v["id"], key="req-1")
    assert first.status_code == 201, first.text
    again = _create_ft(client, v["id"], key="req-1")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    # a new app instance (another replica, or after a restart) honours the key too: it lives in the store
    app2 = create_app(env["settings"], env["store"], executor, background=False)
    third = _create_ft(TestClient(app2), v["id"], key="req-1")
    assert third.status_code == 200 and third.json()["id"] == first.json()["id"]
    assert executor.submits == [first.json()["id"]]
    reused = _create_ft(client, v["id"], key="req-1", stage="stage1")
    assert_problem(reused, 422, "idempotency-key-reused")
    other = _create_ft(client, v["id"], key="req-2")
    assert other.status_code == 201 and executor.submits == [first.json()["id"], other.json()["id"]]


def test_a_finetune_trains_on_the_pairs_the_preview_showed(env: dict[str, Any], synthetic_dir: Path) -> None:
    """The same options and seed name the same compiled pairs in the preview and in the fine-tune's
    spec, which the trainer reads (``pairs.jsonl``, checked against the recorded digest)."""
    client, store = env["client"], env["store"]
    v = _dataset(client, synthetic_dir)
    clips = {"max_steps": 3, "num_frames": 4, "height": 32, "width": 32}
    for options in ({}, {"tie_policy": "keep", "seed": 5}):
        preview = client.post(f"/v1/datasets/cats/versions/{v['id']}/pairs", json=options, headers=AUTH)
        assert preview.status_code == 200, preview.text
        ft = _create_ft(client, v["id"], hyperparameters={**clips, **options})
        assert ft.status_code == 201, ft.text
        pairs = ft.json()["pairs"]
        assert pairs["digest"] == preview.json()["pairs_sha256"]
        assert pairs["options"] == preview.json()["options"]
        assert store.get_json(pairs["prefix"] + "report.json") == preview.json()
        spec = store.get_json(f"finetunes/{ft.json()['id']}/spec.json")
        assert (
            spec["pairs"] == pairs
            and client.get(f"/v1/fine-tunes/{ft.json()['id']}", headers=AUTH).json()["pairs"] == pairs
        )
    stage1 = _create_ft(client, v["id"], stage="stage1", hyperparameters=clips)
    assert stage1.status_code == 201 and stage1.json()["pairs"] is None
    reserved = _create_ft(client, v["id"], hyperparameters={**clips, "pairs_file": "/etc/passwd"})
    assert assert_problem(reserved, 422, "validation-error")["field"] == "hyperparameters.pairs_file"


def test_state_follows_the_job_and_progress_and_survives_a_restart(
    env: dict[str, Any], synthetic_dir: Path
) -> None:
    client, executor, store = env["client"], env["executor"], env["store"]
    v = _dataset(client, synthetic_dir)
    ft = _create_ft(client, v["id"]).json()
    assert ft["state"] == "queued"
    executor.phases[ft["id"]] = ExecStatus("running")
    lines = [
        {"event": "start", "time": "t0", "total_steps": 10},
        {
            "event": "step",
            "time": "t1",
            "step": 4,
            "total_steps": 10,
            "loss": 0.5,
            "implicit_acc": 0.75,
            "step_seconds": 2.0,
        },
    ]
    store.put_bytes(
        f"finetunes/{ft['id']}/progress.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()
    )
    got = client.get(f"/v1/fine-tunes/{ft['id']}", headers=AUTH).json()
    assert got["state"] == "running"
    assert got["progress"]["step"] == 4 and got["progress"]["total_steps"] == 10
    assert got["progress"]["reward_accuracy"] == 0.75 and got["progress"]["eta_seconds"] == pytest.approx(
        12.0
    )
    # restart: a brand-new app over the same store and executor reports the same state
    app2 = create_app(env["settings"], store, executor, background=False)
    c2 = TestClient(app2)
    assert c2.get(f"/v1/fine-tunes/{ft['id']}", headers=AUTH).json()["progress"]["step"] == 4
    executor.phases[ft["id"]] = ExecStatus("failed", "PodFailurePolicy", "exit code 2")
    store.put_bytes(
        f"finetunes/{ft['id']}/progress.jsonl",
        "".join(
            json.dumps(x) + "\n"
            for x in [
                *lines,
                {"event": "end", "state": "failed", "reason": "DatasetError", "message": "bad video"},
            ]
        ).encode(),
    )
    done = c2.get(f"/v1/fine-tunes/{ft['id']}", headers=AUTH).json()
    assert (done["state"], done["reason"], done["message"]) == ("failed", "DatasetError", "bad video")
    # terminal is final, even if the executor later says otherwise
    executor.phases[ft["id"]] = ExecStatus("succeeded")
    assert client.get(f"/v1/fine-tunes/{ft['id']}", headers=AUTH).json()["state"] == "failed"
    listed = client.get("/v1/fine-tunes", params={"state": "failed"}, headers=AUTH).json()["items"]
    assert [x["id"] for x in listed] == [ft["id"]]


def test_cancel_list_filters_pagination_and_logs(env: dict[str, Any], synthetic_dir: Path) -> None:
    client, executor = env["client"], env["executor"]
    v = _dataset(client, synthetic_dir)
    ids = [_create_ft(client, v["id"], key=f"k{i}").json()["id"] for i in range(3)]
    c = client.post(f"/v1/fine-tunes/{ids[0]}/cancel", headers=AUTH)
    assert (
        c.status_code == 200 and c.json()["state"] == "cancelled" and c.json()["reason"] == "CancelledByUser"
    )
    assert executor.cancelled == [ids[0]]
    page1 = client.get("/v1/fine-tunes", params={"page_size": 2}, headers=AUTH).json()
    page2 = client.get(
        "/v1/fine-tunes", params={"page_size": 2, "page_token": page1["next_page_token"]}, headers=AUTH
    ).json()
    seen = [x["id"] for x in page1["items"] + page2["items"]]
    assert sorted(seen) == sorted(ids) and page2["next_page_token"] is None
    queued = client.get("/v1/fine-tunes", params={"state": "queued"}, headers=AUTH).json()["items"]
    assert sorted(x["id"] for x in queued) == sorted(ids[1:])
    assert client.get("/v1/fine-tunes", params={"dataset": "other"}, headers=AUTH).json()["items"] == []
    assert client.get(f"/v1/fine-tunes/{ids[1]}/logs", headers=AUTH).text == "line 1\nline 2\n"
    assert_problem(
        client.get("/v1/fine-tunes", params={"page_token": "garbage!"}, headers=AUTH), 422, "validation-error"
    )


def test_dataset_delete_is_refused_while_a_finetune_references_it(
    env: dict[str, Any], synthetic_dir: Path
) -> None:
    client = env["client"]
    v = _dataset(client, synthetic_dir)
    assert _create_ft(client, v["id"]).status_code == 201
    assert_problem(client.delete("/v1/datasets/cats", headers=AUTH), 409, "conflict")
    assert_problem(client.delete(f"/v1/datasets/cats/versions/{v['id']}", headers=AUTH), 409, "conflict")
    client.post("/v1/datasets", json={"name": "free"}, headers=AUTH)
    assert client.delete("/v1/datasets/free", headers=AUTH).status_code == 204
    assert_problem(client.get("/v1/datasets/free", headers=AUTH), 404, "not-found")


def publish_checkpoint(store: LocalStore, tmp: Path, ft: str, step: int) -> str:
    cid = f"ckpt-{ft}-{step}"
    d = tmp / cid / "adapter"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"weights" * step)
    publish_dir(
        store,
        tmp / cid,
        f"checkpoints/{cid}/",
        {"id": cid, "step": step, "lineage": {"finetune_id": ft, "dataset_digest": "abc"}},
    )
    return cid


def test_checkpoints_of_an_unknown_finetune_are_not_found(env: dict[str, Any]) -> None:
    client, store, tmp = env["client"], env["store"], env["tmp"]
    publish_checkpoint(store, tmp, "ft-gone", 10)  # checkpoints alone do not make the fine-tune exist
    body = assert_problem(client.get("/v1/fine-tunes/ft-gone/checkpoints", headers=AUTH), 404, "not-found")
    assert "ft-gone" in body["detail"]
    # A value that cannot be a fine-tune id breaks the path parameter's documented pattern: 422 naming it.
    bad = client.get("/v1/fine-tunes/Not_A_Name/checkpoints", headers=AUTH)
    assert assert_problem(bad, 422, "validation-error")["field"] == "path:finetune_id"


def test_checkpoints_and_rollouts_write_the_record_inference_follows(env: dict[str, Any]) -> None:
    client, store, tmp = env["client"], env["store"], env["tmp"]
    a = publish_checkpoint(store, tmp, "ft-x", 10)
    b = publish_checkpoint(store, tmp, "ft-x", 20)
    ck = client.get(f"/v1/checkpoints/{a}", headers=AUTH).json()
    assert (
        ck["step"] == 10
        and ck["lineage"]["dataset_digest"] == "abc"
        and "adapter/adapter_model.safetensors" in ck["files"]
    )
    urls = client.get(f"/v1/checkpoints/{b}/download", headers=AUTH).json()["urls"]
    got = client.get(urls["adapter/adapter_model.safetensors"])
    assert got.content == b"weights" * 20
    assert [
        c["id"]
        for c in client.get("/v1/checkpoints", params={"finetune_id": "ft-x"}, headers=AUTH).json()["items"]
    ] == [a, b]

    assert_problem(
        client.put("/v1/rollouts/default", json={"checkpoint": "ckpt-nope-1"}, headers=AUTH),
        422,
        "validation-error",
    )
    r = client.put("/v1/rollouts/default?create=true", json={"checkpoint": a}, headers=AUTH).json()
    assert (r["revision"], r["current"], r["canary"]) == (1, a, None)
    assert_problem(client.post("/v1/rollouts/default/promote", headers=AUTH), 409, "conflict")
    r = client.post("/v1/rollouts/default/canary", json={"checkpoint": b, "percent": 25}, headers=AUTH).json()
    assert (r["current"], r["canary"], r["canary_percent"]) == (a, b, 25)
    rec = read_rollout(store, "default")  # what the inference service reads
    assert rec is not None and (rec.current, rec.canary, rec.canary_percent, rec.revision) == (a, b, 25, 2)
    stale = client.post("/v1/rollouts/default/promote", json={"expected_revision": 1}, headers=AUTH)
    assert_problem(stale, 409, "conflict")
    r = client.post("/v1/rollouts/default/promote", json={"expected_revision": 2}, headers=AUTH).json()
    assert (r["current"], r["canary"]) == (b, None)
    r = client.post("/v1/rollouts/default/rollback", headers=AUTH).json()
    assert r["current"] == a and r["revision"] == 4
    hist = client.get("/v1/rollouts/default/history", headers=AUTH).json()
    assert [h["action"] for h in hist] == ["set_current", "set_canary", "promote", "rollback"]


def test_download_links_name_the_address_the_client_used(env: dict[str, Any], synthetic_dir: Path) -> None:
    # No HUVIDPO_STORE_PUBLIC_BASE_URL: the links are built from the request's own base URL (here a
    # control plane on port 18080), not from a default that names port 8080.
    store, tmp = env["store"], env["tmp"]
    client = TestClient(env["client"].app, base_url="http://127.0.0.1:18080")
    cid = publish_checkpoint(store, tmp, "ft-port", 3)
    body = client.get(f"/v1/checkpoints/{cid}/download", headers=AUTH).json()
    assert body["urls"] and all(
        u.startswith(f"http://127.0.0.1:18080/v1/objects/checkpoints/{cid}/") for u in body["urls"].values()
    ), body
    got = client.get(body["urls"]["adapter/adapter_model.safetensors"])
    assert got.status_code == 200 and got.content == b"weights" * 3
    client.post("/v1/datasets", json={"name": "ported"}, headers=AUTH)
    up = client.post("/v1/datasets/ported/uploads", headers=AUTH).json()
    urls = client.post(
        f"/v1/datasets/ported/uploads/{up['id']}/presign", json={"files": ["manifest.jsonl"]}, headers=AUTH
    ).json()["urls"]
    assert urls["manifest.jsonl"].startswith("http://127.0.0.1:18080/v1/objects/"), urls


def test_a_configured_public_base_url_wins_over_the_request(env: dict[str, Any]) -> None:
    root = env["tmp"] / "store"
    store = LocalStore(root, public_base_url="https://models.example.com/huvidpo/")
    app = create_app(env["settings"], store, FakeExecutor(), background=False)
    cid = publish_checkpoint(store, env["tmp"], "ft-proxy", 2)
    urls = TestClient(app).get(f"/v1/checkpoints/{cid}/download", headers=AUTH).json()["urls"]
    assert all(u.startswith("https://models.example.com/huvidpo/v1/objects/") for u in urls.values()), urls


def test_a_new_deployment_is_created_only_when_asked(env: dict[str, Any]) -> None:
    client, store, tmp = env["client"], env["store"], env["tmp"]
    a = publish_checkpoint(store, tmp, "ft-y", 1)
    assert (
        client.put("/v1/rollouts/default?create=true", json={"checkpoint": a}, headers=AUTH).status_code
        == 200
    )
    # A typo in the deployment name: refused, nothing written, the existing names listed.
    body = assert_problem(
        client.put("/v1/rollouts/defualt", json={"checkpoint": a}, headers=AUTH), 404, "not-found"
    )
    assert "defualt" in body["detail"] and "create=true" in body["detail"] and "default" in body["detail"], (
        body
    )
    assert read_rollout(store, "defualt") is None
    assert_problem(client.get("/v1/rollouts/defualt", headers=AUTH), 404, "not-found")
    # Asked for explicitly: created; create=true on an existing deployment just updates it.
    r = client.put("/v1/rollouts/staging?create=true", json={"checkpoint": a}, headers=AUTH)
    assert r.status_code == 200 and r.json()["revision"] == 1, r.text
    r = client.put("/v1/rollouts/staging?create=true", json={"checkpoint": "base"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["revision"] == 2, r.text
    spec = client.get("/openapi.json").json()
    params = spec["paths"]["/v1/rollouts/{deployment}"]["put"]["parameters"]
    assert any(p["name"] == "create" for p in params)


def test_rolling_back_to_the_base_model_through_rest(env: dict[str, Any]) -> None:
    client, store, tmp = env["client"], env["store"], env["tmp"]
    a = publish_checkpoint(store, tmp, "ft-z", 1)
    b = publish_checkpoint(store, tmp, "ft-z", 2)
    client.put("/v1/rollouts/default?create=true", json={"checkpoint": a}, headers=AUTH)
    r = client.put("/v1/rollouts/default", json={"checkpoint": "base"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["current"] == "base"
    rec = read_rollout(store, "default")  # the inference service serves the base model for "base"
    assert rec is not None and rec.current == "base"
    # A canary against the base model, then a rollback drops it and the base model serves again.
    r = client.post("/v1/rollouts/default/canary", json={"checkpoint": b, "percent": 10}, headers=AUTH)
    assert r.status_code == 200 and (r.json()["current"], r.json()["canary"]) == ("base", b), r.text
    r = client.post("/v1/rollouts/default/rollback", headers=AUTH).json()
    assert (r["current"], r["canary"]) == ("base", None)
    # Rollback with no canary goes to the previous current one, and back to "base" from there.
    assert client.post("/v1/rollouts/default/rollback", headers=AUTH).json()["current"] == a
    assert client.post("/v1/rollouts/default/rollback", headers=AUTH).json()["current"] == "base"
    # "base" names the base model only: it cannot be the canary of itself, nor a checkpoint to download.
    assert_problem(
        client.post("/v1/rollouts/default/canary", json={"checkpoint": "base", "percent": 5}, headers=AUTH),
        422,
        "validation-error",
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/datasets"), ("PUT", "/v1/rollouts/default"), ("POST", "/v1/fine-tunes")],
)
def test_a_json_route_refuses_other_media_types_with_415(env: dict[str, Any], method: str, path: str) -> None:
    client = env["client"]
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        r = client.request(
            method, path, content=b'{"name": "cats"}', headers={**AUTH, "Content-Type": content_type}
        )
        body = assert_problem(r, 415, "unsupported-media-type")
        assert content_type in body["detail"] and "application/json" in body["detail"], body


@pytest.mark.parametrize("payload", [b'{"name": "cats",', b"not json at all", b'{"name": "cats"} trailing'])
def test_malformed_json_is_400_with_its_own_type(env: dict[str, Any], payload: bytes) -> None:
    r = env["client"].post(
        "/v1/datasets", content=payload, headers={**AUTH, "Content-Type": "application/json"}
    )
    body = assert_problem(r, 400, "invalid-json")
    assert "not valid JSON" in body["detail"] and "character" in body["detail"], body


def test_a_json_body_needs_a_json_content_type(env: dict[str, Any]) -> None:
    client = env["client"]
    # No Content-Type at all: not parsed as JSON (FastAPI's strict content type, a CSRF guard).
    body = assert_problem(
        client.post("/v1/datasets", content=b'{"name": "plain"}', headers=AUTH), 415, "unsupported-media-type"
    )
    assert "no Content-Type" in body["detail"], body
    r = client.post(
        "/v1/datasets",
        content=b'{"name": "suffixed"}',
        headers={**AUTH, "Content-Type": "application/merge-patch+json; charset=utf-8"},
    )
    assert r.status_code == 201, r.text
    # A valid JSON body of the wrong shape stays a 422 naming the field.
    assert_problem(client.post("/v1/datasets", json={"nme": "x"}, headers=AUTH), 422, "validation-error")


def test_docs_and_openapi_are_labelled_by_their_route_in_metrics(env: dict[str, Any]) -> None:
    client = env["client"]
    for path in ("/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 200, path
    client.get("/v1/nothing-here", headers=AUTH)
    text = client.get("/metrics").text
    for path in ("/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"):
        assert (
            f'huvidpo_controlplane_requests_total{{method="GET",route="{path}",status="200"}} 1.0' in text
        ), path
    # A path no route matches stays one bounded label.
    assert 'route="<unmatched>",status="404"' in text
    assert 'route="/v1/nothing-here"' not in text


def test_auth_problems_health_and_metrics(env: dict[str, Any]) -> None:
    client = env["client"]
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["checks"] == {"store": "ok", "executor": "ok"}
    assert_problem(client.get("/v1/datasets"), 401, "unauthorized")
    assert_problem(client.get("/v1/datasets", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    read = {"Authorization": f"Bearer {READ_TOKEN}"}
    assert client.get("/v1/datasets", headers=read).status_code == 200
    assert_problem(client.post("/v1/datasets", json={"name": "x"}, headers=read), 403, "forbidden")
    assert_problem(client.get("/v1/nothing-here", headers=AUTH), 404, "not-found")
    assert_problem(client.delete("/v1/fine-tunes", headers=AUTH), 405, "method-not-allowed")
    assert_problem(client.get("/v1/fine-tunes/ft-missing", headers=AUTH), 404, "not-found")
    assert_problem(
        client.post(
            "/v1/datasets", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
        ),
        400,
        "invalid-json",
    )
    client.post(
        "/v1/datasets", files=[("files", ("a.json", io.BytesIO(b"{}"), "application/json"))], headers=AUTH
    )
    text = client.get("/metrics").text
    assert (
        'huvidpo_controlplane_requests_total{method="GET",route="/v1/fine-tunes/{finetune_id}",status="404"} 1.0'
        in text
    )
    assert 'route="/v1/datasets",status="401"' in text
    assert "huvidpo_controlplane_request_duration_seconds_bucket" in text
    assert 'huvidpo_controlplane_finetunes{state="queued"}' in text
    spec = client.get("/openapi.json").json()
    assert "/v1/fine-tunes/{finetune_id}/cancel" in spec["paths"]


def test_finetune_frames_and_size_are_checked_against_the_version_stats(
    env: dict[str, Any], synthetic_dir: Path
) -> None:
    client, executor = env["client"], env["executor"]
    v = validated(client, "cats", _dataset(client, synthetic_dir)["id"])  # every clip: 4 frames of 32x32 px
    assert v["validation"]["state"] == "passed", v["validation"]
    assert v["video_stats"] == {"videos": 2, "min_frames": 4, "min_height": 32, "min_width": 32}
    sized = {"max_steps": 3, "height": 32, "width": 32}
    for hp, field, words in (
        ({**sized, "num_frames": 8}, "num_frames", ("num_frames 8", "4 frames")),
        (sized, "num_frames", ("num_frames 16", "4 frames")),  # the default on short clips
        ({**sized, "num_frames": 3, "frame_stride": 2}, "num_frames", ("frame_stride 2", "needs 5")),
        ({**sized, "num_frames": 4, "height": 64}, "height", ("height 64", "32 px")),
        ({**sized, "num_frames": 4, "width": 40}, "width", ("width 40", "32 px")),
    ):
        body = assert_problem(_create_ft(client, v["id"], hyperparameters=hp), 422, "validation-error")
        assert body["field"] == f"hyperparameters.{field}", body
        assert all(w in body["detail"] for w in words), body["detail"]
    assert executor.submits == []
    assert _create_ft(client, v["id"]).status_code == 201
    # A version whose validation is not recorded (committed before versions had one, or the control
    # plane restarted meanwhile) is validated again when it is read.
    env["store"].delete(f"datasets/cats/{v['id']}/validation.json")
    assert client.get(f"/v1/datasets/cats/versions/{v['id']}", headers=AUTH).json()["validation"][
        "state"
    ] in (
        "pending",
        "passed",
    )
    assert validated(client, "cats", v["id"])["video_stats"] == v["video_stats"]
    assert (
        env["store"].get_json(f"datasets/cats/{v['id']}/validation.json")["video_stats"] == v["video_stats"]
    )


def test_absurd_hyperparameters_get_a_422_naming_the_field_and_the_bound(
    env: dict[str, Any], synthetic_dir: Path
) -> None:
    client, executor = env["client"], env["executor"]
    v = _dataset(client, synthetic_dir)
    ok = {"max_steps": 3, "num_frames": 4, "height": 32, "width": 32}
    for hp, field, bound in (
        ({**ok, "max_steps": 1e23}, "max_steps", "10000000"),
        ({**ok, "height": 100000}, "height", "2048"),
        ({**ok, "width": 100000}, "width", "2048"),
        ({**ok, "lr": 50}, "lr", "1"),
        ({"max-steps": 1e23, "num-frames": 4, "height": 32, "width": 32}, "max_steps", "10000000"),
    ):
        body = assert_problem(_create_ft(client, v["id"], hyperparameters=hp), 422, "validation-error")
        assert body["field"] == f"hyperparameters.{field}", body
        assert bound in body["detail"] and "Value error" not in body["detail"], body["detail"]
    assert executor.submits == []
    # The bounds are in the OpenAPI document.
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    props = schemas["FineTuneHyperparameters"]["properties"]
    assert props["max_steps"]["anyOf"][0]["maximum"] == 10_000_000
    assert props["height"]["maximum"] == 2048 and props["height"]["multipleOf"] == 8


def test_compiling_with_a_holdout_writes_heldout_pairs_and_a_finetune_trains_beside_them(
    env: dict[str, Any], tmp_path: Path
) -> None:
    """Whole prompts are held out (seeded, shown in the report) into ``heldout.jsonl`` beside
    ``pairs.jsonl``; without a hold-out the compiled pairs keep the key they always had; a DPO
    fine-tune with ``holdout_fraction`` and ``seed`` S names the pairs of ``holdout_seed`` S."""
    from huvidpo.data import make_synthetic_dataset, read_pairs
    from services.controlplane.domain.datasets import PairOptions

    client, store = env["client"], env["store"]
    data = make_synthetic_dataset(tmp_path / "d4", n_prompts=4, videos_per_prompt=2, num_frames=4, size=32)
    v = _dataset(client, data)
    url = f"/v1/datasets/cats/versions/{v['id']}/pairs"
    plain = client.post(url, json={}, headers=AUTH).json()
    assert plain["heldout"] == 0 and plain["heldout_sha256"] is None and plain["pairs"] == 4
    old_key = hashlib.sha256(
        json.dumps(
            {"tie_policy": "drop", "min_margin": 0.0, "margin_weighting": False, "seed": 33}, sort_keys=True
        ).encode()
    ).hexdigest()[:16]
    assert PairOptions().key() == old_key  # pairs compiled before the hold-out existed are still found
    r = client.post(url, json={"holdout_fraction": 0.25, "seed": 7}, headers=AUTH)  # holdout_seed: seed
    assert r.status_code == 200, r.text
    body = r.json()
    held = body["report"]["holdout"]
    assert held["fraction"] == 0.25 and held["seed"] == 7 and len(held["prompts"]) == 1 and held["pairs"] == 1
    assert (body["pairs"], body["heldout"]) == (3, 1)
    assert "held out      1 pairs of 1 prompt(s)" in body["text"] and held["prompts"][0] in body["text"]
    prefix = f"datasets/cats/compiled/{v['id'].removeprefix('sha256:')}/"
    keys = [o.key for o in store.list(prefix) if o.key.endswith("heldout.jsonl")]
    assert len(keys) == 1
    heldout_file, pairs_file = tmp_path / "h.jsonl", tmp_path / "p.jsonl"
    store.get_file(keys[0], heldout_file)
    store.get_file(keys[0].replace("heldout.jsonl", "pairs.jsonl"), pairs_file)
    assert {p.prompt for p in read_pairs(heldout_file)} == set(held["prompts"])
    assert not {p.prompt for p in read_pairs(pairs_file)} & set(held["prompts"])
    other = client.post(url, json={"holdout_fraction": 0.25, "seed": 7, "holdout_seed": 8}, headers=AUTH)
    assert other.json()["report"]["holdout"]["seed"] == 8
    bad = client.post(url, json={"holdout_fraction": 0.9}, headers=AUTH)
    assert assert_problem(bad, 422, "validation-error")["field"] == "holdout_fraction"
    out_of_range = client.post(url, json={"holdout_fraction": 1.0}, headers=AUTH)
    assert out_of_range.status_code == 422

    hp = {"max_steps": 3, "num_frames": 4, "height": 32, "width": 32, "holdout_fraction": 0.25, "seed": 7}
    ft = _create_ft(client, v["id"], hyperparameters=hp)
    assert ft.status_code == 201, ft.text
    pairs = ft.json()["pairs"]
    assert pairs["digest"] == body["pairs_sha256"] and pairs["heldout_digest"] == body["heldout_sha256"]
    assert pairs["prefix"] + "heldout.jsonl" == keys[0]
    assert pairs["options"]["holdout_fraction"] == 0.25 and pairs["options"]["holdout_seed"] == 7
