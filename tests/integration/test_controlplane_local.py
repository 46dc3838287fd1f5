"""The whole fine-tune path on the embedded default: REST API, LocalExecutor, the real trainer entrypoint.

One run proves three promises at once: a trainer killed mid-run is retried and resumes from its last
*uploaded* checkpoint; a control plane replaced mid fine-tune (a new app over the same store) loses
nothing and reports the right state; the result has checkpoints with manifests and lineage.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient

from services.common.publish import publish_dir
from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.executors.local import LocalExecutor

REPO = Path(__file__).resolve().parents[2]


def _app(store: LocalStore, settings: ControlPlaneSettings, store_root: Path) -> TestClient:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HUVIDPO_STORE_BACKEND": "local",
        "HUVIDPO_STORE_ROOT": str(store_root),
        "HUVIDPO_TRAINER_WORK_DIR": str(settings.work_dir / "trainer"),
        "OMP_NUM_THREADS": "1",
    }
    executor = LocalExecutor(settings.work_dir, env, max_retries=2, python=sys.executable)
    return TestClient(create_app(settings, store, executor, background=False))


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.slow
def test_killed_trainer_resumes_and_a_restarted_control_plane_loses_nothing(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from huvidpo.data import make_synthetic_dataset

    store_root = tmp_path / "store"
    store = LocalStore(store_root)
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    settings = ControlPlaneSettings(work_dir=tmp_path / "work", dev_mode=True)
    c1 = _app(store, settings, store_root)

    ds = make_synthetic_dataset(tmp_path / "ds", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    assert c1.post("/v1/datasets", json={"name": "cats"}).status_code == 201
    files = [
        ("files", (p.relative_to(ds).as_posix(), p.read_bytes(), "video/mp4"))
        for p in sorted(ds.rglob("*"))
        if p.is_file()
    ]
    version = c1.post("/v1/datasets/cats/versions", files=files).json()["id"]
    hp = {"max_steps": 4, "checkpoint_every": 1, "num_frames": 4, "height": 32, "width": 32, "plot": False}
    ft = c1.post(
        "/v1/fine-tunes",
        json={"dataset": "cats", "version": version, "base_model": "tiny", "hyperparameters": hp},
    )
    assert ft.status_code == 201, ft.text
    ft_id = ft.json()["id"]

    # Wait for the first uploaded checkpoint, then kill the trainer (not its supervisor) without warning.
    _wait(lambda: store.exists(f"checkpoints/ckpt-{ft_id}-1/manifest.json"), 400, "the first checkpoint")
    assert c1.get(f"/v1/fine-tunes/{ft_id}").json()["state"] == "running"
    run = json.loads((settings.work_dir / "runs" / ft_id / "run.json").read_text())
    trainer = _wait(lambda: psutil.Process(run["pid"]).children(), 30, "the trainer process")[0]
    os.kill(trainer.pid, signal.SIGKILL)

    # The control plane is replaced too: a new app and executor over the same store and work dir.
    del c1
    c2 = _app(store, settings, store_root)
    view = _wait(
        lambda: (
            (v := c2.get(f"/v1/fine-tunes/{ft_id}").json())["state"] in ("succeeded", "failed", "cancelled")
            and v
        ),
        600,
        "the fine-tune to finish",
    )
    assert view["state"] == "succeeded", view
    progress = view["progress"]
    assert progress["attempts"] == 2 and progress["step"] == 4
    resumed = progress["resumed_from_step"]
    assert resumed is not None and resumed >= 1

    # The retry resumed at the last uploaded checkpoint: no step at or before it was trained again.
    records = [
        json.loads(x) for x in store.get_bytes(f"finetunes/{ft_id}/progress.jsonl").decode().splitlines()
    ]
    second_start = [i for i, r in enumerate(records) if r["event"] == "start"][1]
    assert all(r["step"] > resumed for r in records[second_start:] if r["event"] == "step")

    # Checkpoints: manifest with digests and lineage; downloadable.
    assert view["checkpoints"][-1] == f"ckpt-{ft_id}-4"
    ck = c2.get(f"/v1/checkpoints/ckpt-{ft_id}-4").json()
    lineage = ck["lineage"]
    assert lineage["dataset_digest"] == version and lineage["finetune_id"] == ft_id
    assert lineage["base_model_digest"] and lineage["config"]["max_steps"] == 4 and lineage["job"] == ft_id
    assert all(len(f["sha256"]) == 64 for f in ck["files"].values())
    assert "adapter/adapter_model.safetensors" in ck["files"]
    logs = c2.get(f"/v1/fine-tunes/{ft_id}/logs").text
    assert "--- attempt 2 ---" in logs and "resuming fine-tune" in logs


def _version(client: TestClient, tmp_path: Path) -> str:
    from huvidpo.data import make_synthetic_dataset

    ds = make_synthetic_dataset(tmp_path / "ds", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    assert client.post("/v1/datasets", json={"name": "cats"}).status_code == 201
    files = [
        ("files", (p.relative_to(ds).as_posix(), p.read_bytes(), "video/mp4"))
        for p in sorted(ds.rglob("*"))
        if p.is_file()
    ]
    return str(client.post("/v1/datasets/cats/versions", files=files).json()["id"])


def _finished(client: TestClient, ft_id: str, timeout: float = 400) -> dict[str, Any]:
    terminal = ("succeeded", "failed", "cancelled")
    return dict(
        _wait(
            lambda: (v := client.get(f"/v1/fine-tunes/{ft_id}").json())["state"] in terminal and v,
            timeout,
            f"fine-tune {ft_id} to finish",
        )
    )


@pytest.mark.slow
def test_a_config_the_data_cannot_serve_fails_on_the_first_attempt(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.controlplane.domain.datasets import DatasetService

    store_root = tmp_path / "store"
    store = LocalStore(store_root)
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    client = _app(store, ControlPlaneSettings(work_dir=tmp_path / "work", dev_mode=True), store_root)
    version = _version(client, tmp_path)
    # A version whose background validation has no result yet: the submit-time check cannot see
    # that its 4-frame clips are too short, so the trainer finds out.
    store.delete(f"datasets/cats/{version}/validation.json")
    monkeypatch.setattr(DatasetService, "validate_version", lambda self, name, digest: {})  # still running
    hp = {"max_steps": 2, "num_frames": 8, "height": 32, "width": 32, "plot": False}
    ft = client.post(
        "/v1/fine-tunes",
        json={"dataset": "cats", "version": version, "base_model": "tiny", "hyperparameters": hp},
    )
    assert ft.status_code == 201, ft.text
    view = _finished(client, ft.json()["id"])
    assert view["state"] == "failed" and view["reason"] == "ConfigError", view
    assert "num_frames 8" in view["message"] and "has 4 frames" in view["message"], view["message"]
    assert view["progress"]["attempts"] == 1
    logs = client.get(f"/v1/fine-tunes/{view['id']}/logs").text
    assert "--- attempt 2 ---" not in logs


@pytest.mark.slow
def test_logs_tell_each_step_checkpoint_upload_and_a_cancel(tmp_path: Path, tiny_model_dir: Path) -> None:
    store_root = tmp_path / "store"
    store = LocalStore(store_root)
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    client = _app(store, ControlPlaneSettings(work_dir=tmp_path / "work", dev_mode=True), store_root)
    version = _version(client, tmp_path)
    hp = {"max_steps": 2, "checkpoint_every": 1, "num_frames": 4, "height": 32, "width": 32, "plot": False}
    body = {"dataset": "cats", "version": version, "base_model": "tiny", "hyperparameters": hp}
    ok = client.post("/v1/fine-tunes", json=body).json()
    assert _finished(client, ok["id"])["state"] == "succeeded"
    logs = client.get(f"/v1/fine-tunes/{ok['id']}/logs?follow=true").text
    for step in (1, 2):
        line = next((ln for ln in logs.splitlines() if f"step {step}/2 " in ln), None)
        assert line is not None, logs
        assert all(w in line for w in ("loss ", "reward_acc ", "lr ")), line
        assert f"checkpoint ckpt-{ok['id']}-{step} uploaded" in logs, logs
    assert "trained 2 steps" in logs

    # A user's cancel is logged as a cancel, not as an error that a retry will mend.
    long = client.post("/v1/fine-tunes", json={**body, "hyperparameters": {**hp, "max_steps": 1000}}).json()
    _wait(lambda: store.exists(f"checkpoints/ckpt-{long['id']}-1/manifest.json"), 300, "a checkpoint")
    assert client.post(f"/v1/fine-tunes/{long['id']}/cancel").json()["state"] == "cancelled"
    run_dir = tmp_path / "work" / "runs" / long["id"]
    _wait(lambda: (run_dir / "exit.json").exists(), 60, "the supervisor to finish")
    logs = client.get(f"/v1/fine-tunes/{long['id']}/logs").text
    assert "cancelled on request" in logs, logs
    assert "ERROR" not in logs and "retry resumes" not in logs, logs


@pytest.mark.slow
def test_a_broken_video_is_reported_by_validation_and_refused_by_the_trainer(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from huvidpo.data import make_synthetic_dataset

    store_root = tmp_path / "store"
    store = LocalStore(store_root)
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    client = _app(store, ControlPlaneSettings(work_dir=tmp_path / "work", dev_mode=True), store_root)
    ds = make_synthetic_dataset(tmp_path / "ds", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    broken = sorted(ds.rglob("*.mp4"))[0]
    broken.write_bytes(b"not a video at all")
    assert client.post("/v1/datasets", json={"name": "cats"}).status_code == 201
    files = [
        ("files", (p.relative_to(ds).as_posix(), p.read_bytes(), "video/mp4"))
        for p in sorted(ds.rglob("*"))
        if p.is_file()
    ]
    committed = client.post("/v1/datasets/cats/versions", files=files)
    assert committed.status_code == 201, committed.text  # commit decodes nothing
    version = client.get(f"/v1/datasets/cats/versions/{committed.json()['id']}").json()
    assert version["validation"]["state"] == "failed" and version["video_stats"] is None
    assert broken.relative_to(ds).as_posix() in "\n".join(version["validation"]["problems"])
    hp = {"max_steps": 2, "num_frames": 4, "height": 32, "width": 32, "plot": False}
    ft = client.post(
        "/v1/fine-tunes",
        json={"dataset": "cats", "version": version["id"], "base_model": "tiny", "hyperparameters": hp},
    )
    assert ft.status_code == 201, ft.text
    view = _finished(client, ft.json()["id"])
    assert view["state"] == "failed" and view["progress"]["attempts"] == 1, view
    assert view["reason"] in ("DatasetError", "VideoDecodeError"), view
