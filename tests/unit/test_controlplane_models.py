"""``/v1/models``: registering base models (streamed upload, or an ``imports/`` store prefix), the
layout checks, idempotent re-registration, 409 on other files, and a fine-tune against one."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.publish import fetch_published, publish_dir
from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from tests.unit.test_controlplane_api import (
    AUTH,
    READ_TOKEN,
    TOKEN,
    FakeExecutor,
    assert_problem,
    upload_files,
)

READ = {"Authorization": f"Bearer {READ_TOKEN}"}


@pytest.fixture(scope="module")
def image_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose unet/ is a plain 2D UNet2DConditionModel (an SD-1.x checkpoint's layout)."""
    from huvidpo.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-2d") / "model", unet_2d=True)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    store = LocalStore(tmp_path / "store")
    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(TOKEN.encode()).hexdigest()],
        read_tokens=[hashlib.sha256(READ_TOKEN.encode()).hexdigest()],
        work_dir=tmp_path / "work",
        max_upload_bytes=8_000_000,
    )
    app = create_app(settings, store, FakeExecutor(), background=False)
    return {"store": store, "client": TestClient(app), "tmp": tmp_path}


def register(client: TestClient, model_id: str, d: Path, description: str = "") -> Any:
    return client.post(
        "/v1/models", data={"id": model_id, "description": description}, files=upload_files(d), headers=AUTH
    )


def copy_of(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_an_uploaded_video_model_is_published_where_fine_tunes_and_inference_read_it(
    env: dict[str, Any], tiny_model_dir: Path
) -> None:
    client, store = env["client"], env["store"]
    r = register(client, "tiny", tiny_model_dir, "a tiny test model")
    assert r.status_code == 201, r.text
    view = r.json()
    assert r.headers["location"] == "/v1/models/tiny"
    n = sum(1 for p in tiny_model_dir.rglob("*") if p.is_file())
    assert view["prefix"] == "models/tiny/" and view["unet"] == "video" and view["files"] == n
    assert view["description"] == "a tiny test model" and view["created_by"].startswith("token-")
    assert view["size_bytes"] == sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    from huvidpo.models.components import directory_digest

    # the same identity as the library computes on disk (lineage digests agree)
    assert view["digest"] == "sha256:" + directory_digest(tiny_model_dir)
    # the inference service's and the trainer's fetch reads it back, verified, file for file
    out = fetch_published(store, "models/tiny/", env["tmp"] / "fetched")
    assert set(out["files"]) == {
        p.relative_to(tiny_model_dir).as_posix() for p in tiny_model_dir.rglob("*") if p.is_file()
    }
    assert (env["tmp"] / "fetched/unet/config.json").read_bytes() == (
        tiny_model_dir / "unet/config.json"
    ).read_bytes()
    assert client.get("/v1/models/tiny", headers=READ).json() == view
    assert client.get("/v1/models", headers=READ).json() == {"items": [view], "next_page_token": None}


def test_the_same_files_again_are_the_same_model_and_other_files_are_a_conflict(
    env: dict[str, Any], tiny_model_dir: Path, image_model_dir: Path
) -> None:
    client, store = env["client"], env["store"]
    first = register(client, "m1", tiny_model_dir)
    assert first.status_code == 201, first.text
    again = register(client, "m1", tiny_model_dir)
    assert again.status_code == 200 and again.json() == first.json()
    other = register(client, "m1", image_model_dir)
    body = assert_problem(other, 409, "conflict")
    assert body["field"] == "id" and "m1" in body["detail"]
    # the refused and the repeated uploads left no staged files behind: only the first's
    staged = {o.key.split("/")[3] for o in store.list("models/m1/uploads/")}
    assert len(staged) == 1
    assert client.get("/v1/models/m1", headers=AUTH).json()["digest"] == first.json()["digest"]


def test_a_2d_sd_unet_is_accepted_as_an_image_unet_and_a_finetune_can_use_it(
    env: dict[str, Any], image_model_dir: Path, tiny_model_dir: Path
) -> None:
    client = env["client"]
    r = register(client, "sd-tiny", image_model_dir)
    assert r.status_code == 201, r.text
    assert r.json()["unet"] == "image"
    # a fine-tune is created against the model registered through the API
    from huvidpo.data import make_synthetic_dataset

    data = make_synthetic_dataset(env["tmp"] / "ds", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    assert client.post("/v1/datasets", json={"name": "cats"}, headers=AUTH).status_code == 201
    v = client.post("/v1/datasets/cats/versions", files=upload_files(data), headers=AUTH)
    assert v.status_code == 201, v.text
    ft = client.post(
        "/v1/fine-tunes",
        json={
            "dataset": "cats",
            "version": v.json()["id"],
            "base_model": "sd-tiny",
            "hyperparameters": {"max_steps": 2, "num_frames": 4, "height": 32, "width": 32},
        },
        headers=AUTH,
    )
    assert ft.status_code == 201, ft.text
    assert ft.json()["lineage"]["base_model_digest"] == r.json()["digest"].removeprefix("sha256:")


def test_from_prefix_registers_files_already_in_the_store(env: dict[str, Any], tiny_model_dir: Path) -> None:
    client, store = env["client"], env["store"]
    store.upload_dir(tiny_model_dir, "imports/sd/")
    r = client.post("/v1/models", json={"id": "from-store", "from_prefix": "imports/sd/"}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["unet"] == "video" and r.json()["prefix"] == "models/from-store/"
    # copied: the model does not depend on the import staying there
    store.delete_prefix("imports/sd/")
    fetch_published(store, "models/from-store/", env["tmp"] / "f")
    again = client.post("/v1/models", json={"id": "from-store", "from_prefix": "imports/sd"}, headers=AUTH)
    assert again.status_code == 422 and again.json()["field"] == "from_prefix"  # nothing there any more
    outside = client.post("/v1/models", json={"id": "x", "from_prefix": "datasets/cats/"}, headers=AUTH)
    assert assert_problem(outside, 422, "validation-error")["field"] == "from_prefix"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            lambda d: (d / "unet/diffusion_pytorch_model.bin").write_bytes(b"pickle"),
            "unet/diffusion_pytorch_model.bin",
        ),
        (lambda d: shutil.rmtree(d / "scheduler"), "scheduler/"),
        (lambda d: (d / "vae/diffusion_pytorch_model.safetensors").unlink(), "vae/"),
        (lambda d: (d / "unet/config.json").write_text("{not json"), "unet/config.json"),
        (
            lambda d: (d / "unet/config.json").write_text(
                json.dumps({"_class_name": "UNet3DConditionModel"})
            ),
            "unet/config.json",
        ),
        (
            lambda d: (d / "text_encoder/config.json").write_text(
                json.dumps({**json.loads((d / "text_encoder/config.json").read_text()), "hidden_size": 768})
            ),
            "text_encoder/config.json",
        ),
        (lambda d: (d / "tokenizer/tokenizer.json").unlink(), "tokenizer/"),
    ],
    ids=["pickle", "no-scheduler", "no-vae-weights", "bad-json", "not-sd1-unet", "text-dim", "tokenizer"],
)
def test_a_bad_layout_is_refused_naming_the_file_and_nothing_is_published(
    env: dict[str, Any], tiny_model_dir: Path, change: Any, field: str
) -> None:
    client, store = env["client"], env["store"]
    d = copy_of(tiny_model_dir, env["tmp"] / "bad")
    change(d)
    body = assert_problem(register(client, "bad", d), 422, "invalid-model-layout")
    assert body["field"] == field, body
    assert store.list("models/") == []  # the staged files are gone too
    assert_problem(client.get("/v1/models/bad", headers=AUTH), 404, "not-found")
    # the same checks for files already in the store
    store.upload_dir(d, "imports/bad/")
    r = client.post("/v1/models", json={"id": "bad", "from_prefix": "imports/bad/"}, headers=AUTH)
    assert assert_problem(r, 422, "invalid-model-layout")["field"] == field
    assert store.list("models/") == []


def test_registration_requests_are_checked(env: dict[str, Any], tiny_model_dir: Path) -> None:
    client = env["client"]
    bad_id = register(client, "Bad_Name", tiny_model_dir)
    assert assert_problem(bad_id, 422, "validation-error")["field"] == "id"
    bad_json = client.post("/v1/models", json={"id": "Bad_Name", "from_prefix": "imports/x/"}, headers=AUTH)
    assert assert_problem(bad_json, 422, "validation-error")["field"] == "id"
    missing = client.post("/v1/models", json={"id": "ok"}, headers=AUTH)
    assert assert_problem(missing, 422, "validation-error")["field"] == "from_prefix"
    two_ids = client.post(
        "/v1/models", data={"id": ["a", "b"]}, files=upload_files(tiny_model_dir), headers=AUTH
    )
    assert assert_problem(two_ids, 422, "validation-error")["field"] == "id"
    files_first = client.post("/v1/models", files=upload_files(tiny_model_dir), headers=AUTH)
    assert assert_problem(files_first, 422, "validation-error")["field"] == "id"
    text = client.post("/v1/models", content=b"id=x", headers={**AUTH, "Content-Type": "text/plain"})
    assert_problem(text, 415, "unsupported-media-type")
    broken = client.post("/v1/models", content=b"{", headers={**AUTH, "Content-Type": "application/json"})
    assert_problem(broken, 400, "invalid-json")
    big = client.post(
        "/v1/models",
        data={"id": "big"},
        files=[
            (
                "files",
                ("unet/diffusion_pytorch_model.safetensors", b"x" * 8_100_000, "application/octet-stream"),
            )
        ],
        headers=AUTH,
    )
    assert_problem(big, 413, "payload-too-large")
    assert env["store"].list("models/") == []
    # registering needs the data scope; reading needs read
    read_only = client.post("/v1/models", json={"id": "m", "from_prefix": "imports/m/"}, headers=READ)
    assert_problem(read_only, 403, "forbidden")
    assert_problem(client.get("/v1/models"), 401, "unauthorized")


def test_models_list_is_paginated_and_includes_models_published_before_the_api(
    env: dict[str, Any], tiny_model_dir: Path, image_model_dir: Path
) -> None:
    client, store = env["client"], env["store"]
    publish_dir(store, tiny_model_dir, "models/legacy/", {"id": "legacy"})
    publish_dir(store, image_model_dir, "models/legacy-2d/", {"id": "legacy-2d"})
    assert register(client, "new", tiny_model_dir).status_code == 201
    page1 = client.get("/v1/models", params={"page_size": 2}, headers=READ).json()
    assert [m["id"] for m in page1["items"]] == ["legacy", "legacy-2d"]
    assert [m["unet"] for m in page1["items"]] == ["video", "image"]
    page2 = client.get(
        "/v1/models", params={"page_size": 2, "page_token": page1["next_page_token"]}, headers=READ
    )
    assert [m["id"] for m in page2.json()["items"]] == ["new"] and page2.json()["next_page_token"] is None
    assert_problem(
        client.get("/v1/models", params={"page_token": "nope!"}, headers=READ), 422, "validation-error"
    )
    assert_problem(client.get("/v1/models/Nope_", headers=READ), 422, "validation-error")
