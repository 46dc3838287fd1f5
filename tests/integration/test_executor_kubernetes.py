"""KubernetesExecutor with the official client against kmock (an in-memory Kubernetes API server).

kmock runs no controllers, so the test plays the Job controller by patching Job status. Every Job
the executor builds is validated with kubernetes-validate (strict) against current schemas.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from fastapi.testclient import TestClient
from kubernetes import client

from services.common.publish import publish_dir
from services.common.settings import ControlPlaneSettings, StoreSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.domain.ports import JobSpec
from services.controlplane.executors.kubernetes import KubernetesExecutor, build_job, job_name

K8S_VERSION = "1.37.0"
NS = "ml"


def _settings(tmp: Path, **kw: Any) -> ControlPlaneSettings:
    base: dict[str, Any] = {
        "namespace": NS,
        "work_dir": tmp / "work",
        "watch_timeout_seconds": 2,
        "resync_seconds": 1.0,
    }
    base.update(kw)
    return ControlPlaneSettings(**base)


@pytest.fixture
def k8s(kmock: Any) -> Any:
    kmock.resources["batch/v1/jobs"].kind = "Job"
    cfg = client.Configuration()
    cfg.host = str(kmock.url).rstrip("/")
    return client.ApiClient(cfg)


def _plain(obj: Any) -> Any:
    """kmock hands out its own mapping types; the validator wants plain dicts and lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _job_in_server(kmock: Any, name: str) -> dict[str, Any]:
    return dict(_plain(kmock.objects[kmock.resource("batch/v1/jobs"), NS, name]))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "gpu_count": 2,
            "node_selector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        {"service_account": "trainer", "delete_propagation": "Foreground", "job_ttl_seconds": 0},
    ],
)
def test_every_built_job_is_valid_against_current_kubernetes_schemas(
    tmp_path: Path, overrides: dict[str, Any]
) -> None:
    settings = _settings(tmp_path, **overrides)
    for store in (StoreSettings(backend="s3", endpoint="minio:9000"), StoreSettings(backend="local")):
        job = build_job(
            JobSpec(
                "ft-0123456789abcdef0123",
                {"dataset": "cats", "dataset_digest": "a" * 64, "base_model": "tiny"},
                {"stage": "dpo"},
            ),
            settings,
            store,
        )
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        container = job["spec"]["template"]["spec"]["containers"][0]
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert rules[0] == {
            "action": "FailJob",
            "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]},
        }
        assert any(r["action"] == "Count" and r["onExitCodes"]["values"] == [75] for r in rules)
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        gpus = overrides.get("gpu_count", 0)
        assert container["resources"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
        secret_vars = {e["name"]: e for e in container["env"] if "valueFrom" in e}
        assert (
            secret_vars["HUVIDPO_STORE_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"]
            == settings.store_secret
        )
        assert job["metadata"]["annotations"]["huvidpo.dev/dataset-digest"] == "a" * 64


def test_a_job_with_a_bad_field_fails_strict_validation(tmp_path: Path) -> None:
    job = build_job(JobSpec("ft-x"), _settings(tmp_path), StoreSettings())
    job["spec"]["backoffLimit"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


@pytest.fixture
def world(tmp_path: Path, tiny_model_dir: Path) -> dict[str, Any]:
    from huvidpo.data import make_synthetic_dataset

    store = LocalStore(tmp_path / "store")
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    ds = make_synthetic_dataset(tmp_path / "ds", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    return {"store": store, "dataset_dir": ds, "tmp": tmp_path}


def _upload(c: TestClient, ds: Path) -> str:
    assert c.post("/v1/datasets", json={"name": "cats"}).status_code == 201
    files = [
        ("files", (p.relative_to(ds).as_posix(), p.read_bytes(), "video/mp4"))
        for p in sorted(ds.rglob("*"))
        if p.is_file()
    ]
    r = c.post("/v1/datasets/cats/versions", files=files)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _ft_body(version: str) -> dict[str, Any]:
    return {"dataset": "cats", "version": version, "base_model": "tiny", "hyperparameters": {"max_steps": 2}}


@pytest.mark.asyncio
async def test_retried_create_with_the_same_key_makes_one_job(
    k8s: Any, kmock: Any, world: dict[str, Any]
) -> None:
    settings = _settings(world["tmp"])
    store = world["store"]
    app1 = create_app(
        settings, store, KubernetesExecutor(k8s, settings, StoreSettings(backend="s3")), background=False
    )
    c1 = TestClient(app1)
    version = await asyncio.to_thread(_upload, c1, world["dataset_dir"])
    key = {"Idempotency-Key": "train-cats-1"}
    first = await asyncio.to_thread(c1.post, "/v1/fine-tunes", json=_ft_body(version), headers=key)
    assert first.status_code == 201, first.text
    # the client timed out and retries against another replica (a fresh app, same store and cluster)
    app2 = create_app(
        settings, store, KubernetesExecutor(k8s, settings, StoreSettings(backend="s3")), background=False
    )
    second = await asyncio.to_thread(
        TestClient(app2).post, "/v1/fine-tunes", json=_ft_body(version), headers=key
    )
    assert second.status_code == 200 and second.json()["id"] == first.json()["id"]
    batch = client.BatchV1Api(k8s)
    jobs = await asyncio.to_thread(batch.list_namespaced_job, NS)
    assert [j.metadata.name for j in jobs.items] == [job_name(first.json()["id"])]
    submitted = _job_in_server(kmock, job_name(first.json()["id"]))
    kubernetes_validate.validate(submitted, K8S_VERSION, strict=True)
    assert submitted["metadata"]["labels"]["huvidpo.dev/finetune-id"] == first.json()["id"]


@pytest.mark.asyncio
async def test_state_follows_the_job_by_watch_and_cancel_deletes_it(
    k8s: Any, kmock: Any, world: dict[str, Any]
) -> None:
    settings = _settings(world["tmp"])
    store = world["store"]
    executor = KubernetesExecutor(k8s, settings, StoreSettings(backend="s3"))
    app = create_app(settings, store, executor, background=True)  # runs the watch loop
    batch = client.BatchV1Api(k8s)
    with TestClient(app) as c:
        version = await asyncio.to_thread(_upload, c, world["dataset_dir"])
        ft = (await asyncio.to_thread(c.post, "/v1/fine-tunes", json=_ft_body(version))).json()
        name = job_name(ft["id"])
        assert ft["state"] == "queued"

        # the Job controller starts a pod
        await asyncio.to_thread(batch.patch_namespaced_job_status, name, NS, {"status": {"active": 1}})
        got = (await asyncio.to_thread(c.get, f"/v1/fine-tunes/{ft['id']}")).json()
        assert got["state"] == "running" and got["job"]["name"] == name

        # the trainer exits 2: podFailurePolicy fails the Job; the watch (no GET) records it in the store
        await asyncio.to_thread(
            batch.patch_namespaced_job_status,
            name,
            NS,
            {
                "status": {
                    "active": 0,
                    "failed": 1,
                    "conditions": [
                        {
                            "type": "Failed",
                            "status": "True",
                            "reason": "PodFailurePolicy",
                            "message": "Container trainer exited with code 2",
                        }
                    ],
                }
            },
        )
        record: dict[str, Any] = {}
        for _ in range(100):
            record = store.get_json(f"finetunes/{ft['id']}/record.json")
            if record["state"] != "running":
                break
            await asyncio.sleep(0.1)
        assert (record["state"], record["reason"]) == ("failed", "PodFailurePolicy")

        # a second fine-tune is cancelled: its Job is deleted
        ft2 = (
            await asyncio.to_thread(
                c.post, "/v1/fine-tunes", json={**_ft_body(version), "hyperparameters": {"max_steps": 3}}
            )
        ).json()
        cancelled = await asyncio.to_thread(c.post, f"/v1/fine-tunes/{ft2['id']}/cancel")
        assert cancelled.json()["state"] == "cancelled"
        with pytest.raises(client.exceptions.ApiException) as err:
            await asyncio.to_thread(batch.read_namespaced_job, job_name(ft2["id"]), NS)
        assert err.value.status == 404
