"""The objects of 1x1, 1x4 and 4x8 fine-tunes: built by pure functions, validated (kubernetes-validate
for batch/v1, core and networking; the Kubeflow Trainer models for TrainJob), and served to kmock
through the official client (create, status, cancel, logs) by both executors."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes import client

from services.common.settings import ControlPlaneSettings, StoreSettings
from services.controlplane.domain.ports import JobSpec
from services.controlplane.executors.kubernetes import (
    KubernetesExecutor,
    build_job,
    build_network_policy,
    build_objects,
    build_service,
    job_name,
)
from services.controlplane.executors.trainjob import (
    TrainJobExecutor,
    build_trainjob,
    trainjob_status,
    validate_trainjob,
)

K8S_VERSION = "1.37.0"
NS = "ml"
FT = "ft-0123456789abcdef0123"
SHAPES = [(1, 1), (1, 4), (4, 8)]
LINEAGE = {"dataset": "cats", "dataset_digest": "a" * 64, "base_model": "tiny"}


def _settings(tmp: Path, **kw: Any) -> ControlPlaneSettings:
    base: dict[str, Any] = {
        "namespace": NS,
        "work_dir": tmp / "work",
        "watch_timeout_seconds": 2,
        "resync_seconds": 1.0,
        "gpu_count": 8,
        "service_account": "huvidpo-trainer",
        "priority_class": "huvidpo-training",
        "queue_name": "gpu-queue",
        "dev_mode": True,  # open on 127.0.0.1 (the test's own control plane)
    }
    base.update(kw)
    return ControlPlaneSettings(**base)


def _spec(nodes: int, gpus: int, attempt: int = 1) -> JobSpec:
    return JobSpec(FT, LINEAGE, {"stage": "dpo"}, nodes=nodes, gpus_per_node=gpus, attempt=attempt)


def _plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def _env(container: Mapping[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize(("nodes", "gpus"), SHAPES)
def test_the_objects_of_each_shape_are_valid_kubernetes_objects(
    tmp_path: Path, nodes: int, gpus: int
) -> None:
    settings = _settings(tmp_path)
    spec = _spec(nodes, gpus)
    objects = build_objects(spec, settings, StoreSettings(backend="s3", endpoint="minio:9000"))
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    job = objects[-1]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    cmd = container["command"]
    gpu_limit = container["resources"]["limits"]["nvidia.com/gpu"]
    # Every shape: /dev/shm in memory, the work dir's disk requested, queued by Kueue as one gang.
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": settings.shm_size}
    assert {"mountPath": "/dev/shm", "name": "dshm"} in container["volumeMounts"]
    assert container["resources"]["requests"]["ephemeral-storage"] == settings.work_dir_size
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    assert all(v.keys() == {"name", "emptyDir"} for v in pod["volumes"])
    if (nodes, gpus) == (1, 1):
        # today's plain Job: the trainer command itself, backoffLimit retries, no Service
        assert cmd == ["python", "-m", "services.trainer"]
        assert (
            "completionMode" not in job["spec"] and job["spec"]["backoffLimit"] == settings.job_backoff_limit
        )
        assert [o["kind"] for o in objects] == ["Job"]
        assert gpu_limit == "8"  # gpu_count, as before shapes
    elif nodes == 1:
        # the trainer starts its 4 workers itself (services/trainer/ranks.py), from the shape's env
        assert cmd == ["python", "-m", "services.trainer"]
        assert {k: v for k, v in _plain_env(container).items() if k.startswith("PET_")} == {
            "PET_NNODES": "1", "PET_NPROC_PER_NODE": "4", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": "29500",
        }  # fmt: skip
        assert "completionMode" not in job["spec"] and [o["kind"] for o in objects] == ["Job"]
        assert gpu_limit == "4"
    else:
        name = job_name(FT)
        assert [o["kind"] for o in objects] == ["Service", "NetworkPolicy", "Job"]
        s = job["spec"]
        assert (s["completionMode"], s["completions"], s["parallelism"]) == ("Indexed", 4, 4)
        assert (s["backoffLimitPerIndex"], s["maxFailedIndexes"]) == (0, 0) and "backoffLimit" not in s
        assert pod["subdomain"] == name == objects[0]["metadata"]["name"]
        assert cmd == ["python", "-m", "services.trainer"]
        assert {k: v for k, v in _plain_env(container).items() if k.startswith("PET_")} == {
            "PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_MASTER_ADDR": f"{name}-0.{name}",
            "PET_MASTER_PORT": "29500",
        }  # fmt: skip
        # the node rank: the completion index, from the container's own env
        assert _env(container)["JOB_COMPLETION_INDEX"]["fieldRef"]["fieldPath"].endswith(
            "['batch.kubernetes.io/job-completion-index']"
        )
        assert gpu_limit == "8"
        # the exit codes map as for the plain Job
        rules = s["podFailurePolicy"]["rules"]
        assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2]
        svc = objects[0]["spec"]
        assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
        assert svc["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_the_peer_policy_admits_only_the_same_fine_tune_and_attempt(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    policy = build_network_policy(_spec(4, 8), settings)
    mine = build_job(_spec(4, 8), settings, StoreSettings())["spec"]["template"]["metadata"]["labels"]
    other = build_job(JobSpec("ft-other", nodes=4, gpus_per_node=8), settings, StoreSettings())
    retry = build_job(_spec(4, 8, attempt=2), settings, StoreSettings())
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= mine.items()
    for stranger in (other, retry):
        assert not selector.items() <= stranger["spec"]["template"]["metadata"]["labels"].items()
    for rule in policy["spec"]["ingress"]:
        assert rule["from"] == [{"podSelector": policy["spec"]["podSelector"]}]
    for rule in policy["spec"]["egress"]:
        assert rule["to"] == [{"podSelector": policy["spec"]["podSelector"]}]
    assert build_service(_spec(4, 8, attempt=2), settings)["metadata"]["name"] == job_name(FT, 2)


@pytest.mark.parametrize(("nodes", "gpus"), SHAPES)
def test_the_trainjob_of_each_shape_is_valid_for_the_trainer_models(
    tmp_path: Path, nodes: int, gpus: int
) -> None:
    settings = _settings(tmp_path)
    tj = build_trainjob(_spec(nodes, gpus), settings, StoreSettings(backend="s3"))
    validate_trainjob(tj)
    assert tj["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and tj["kind"] == "TrainJob"
    spec = tj["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, gpus)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == str(8 if nodes * gpus == 1 else gpus)
    assert trainer["command"] == ["python", "-m", "services.trainer"]  # it reads the runtime's PET_* env
    assert trainer["image"] == settings.trainer_image
    secret = {e["name"]: e for e in trainer["env"]}["HUVIDPO_STORE_SECRET_KEY"]
    assert secret["valueFrom"]["secretKeyRef"]["name"] == settings.store_secret
    assert spec["suspend"] is True and tj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert tj["metadata"]["labels"]["huvidpo.dev/finetune-id"] == FT
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    volumes = {v["name"]: v for v in pod["template"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    # each pod-level piece that is a core/v1 object is valid as one
    pod_spec = pod["template"]["spec"]["template"]["spec"]
    kubernetes_validate.validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "x"},
            "spec": {
                "containers": [
                    {
                        "name": "node",
                        "image": "i",
                        "env": trainer["env"],
                        "resources": trainer["resourcesPerNode"],
                        "volumeMounts": pod_spec["containers"][0]["volumeMounts"],
                    }
                ],
                "volumes": pod_spec["volumes"],
                "securityContext": pod_spec["securityContext"],
            },
        },
        K8S_VERSION,
        strict=True,
    )


def test_a_misspelt_trainjob_field_is_refused(tmp_path: Path) -> None:
    tj = build_trainjob(_spec(2, 8), _settings(tmp_path), StoreSettings())
    tj["spec"]["trainer"]["numNode"] = tj["spec"]["trainer"].pop("numNodes")
    with pytest.raises(ValueError, match="numNode"):
        validate_trainjob(tj)


def test_trainjob_conditions_map_onto_the_executor_status() -> None:
    base = {"metadata": {"name": "t", "namespace": NS, "labels": {"huvidpo.dev/attempt": "2"}}}
    assert trainjob_status(base).phase == "pending"
    running = trainjob_status({**base, "status": {"jobsStatus": [{"name": "node", "active": 4}]}})
    assert running.phase == "running" and running.attempt == 2
    done = {**base, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert trainjob_status(done).phase == "succeeded"
    failed = trainjob_status(
        {**base, "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "JobSetFailed"}]}}
    )
    assert failed.phase == "failed" and failed.retryable and failed.reason == "JobSetFailed"
    deadline = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}
    assert not trainjob_status({**base, "status": {"conditions": [deadline]}}).retryable


# ------------------------------------------------------------------------------------ kmock
@pytest.fixture
def k8s(kmock: Any) -> Any:
    kmock.resources["batch/v1/jobs"].kind = "Job"
    kmock.resources["v1/pods"].kind = "Pod"
    kmock.resources["v1/services"].kind = "Service"
    kmock.resources["networking.k8s.io/v1/networkpolicies"].kind = "NetworkPolicy"
    kmock.resources["trainer.kubeflow.org/v1alpha1/trainjobs"].kind = "TrainJob"
    cfg = client.Configuration()
    cfg.host = str(kmock.url).rstrip("/")
    return client.ApiClient(cfg)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _stored(kmock: Any, resource: str, name: str) -> dict[str, Any] | None:
    key = (kmock.resource(resource), NS, name)
    return dict(_plain(kmock.objects[key])) if key in kmock.objects else None


@pytest.mark.asyncio
async def test_a_4x8_fine_tune_runs_as_an_indexed_job_with_its_service_and_policy(
    k8s: Any, kmock: Any, tmp_path: Path
) -> None:
    ex = KubernetesExecutor(k8s, _settings(tmp_path), StoreSettings(backend="s3"))
    ref = await asyncio.to_thread(ex.submit, _spec(4, 8))
    name = job_name(FT)
    assert ref["name"] == name
    await asyncio.to_thread(ex.submit, _spec(4, 8))  # a retried submit: 409s, nothing new
    for resource in ("batch/v1/jobs", "v1/services", "networking.k8s.io/v1/networkpolicies"):
        stored = _stored(kmock, resource, name)
        assert stored is not None, resource
        kubernetes_validate.validate(stored, K8S_VERSION, strict=True)
    batch = client.BatchV1Api(k8s)
    assert (await asyncio.to_thread(ex.status, FT)).phase == "pending"
    await asyncio.to_thread(batch.patch_namespaced_job_status, name, NS, {"status": {"active": 4}})
    assert (await asyncio.to_thread(ex.status, FT)).phase == "running"
    # one index fails: the whole Job fails, a retryable group failure of attempt 1
    failed = {"type": "Failed", "status": "True", "reason": "FailedIndexes", "message": "index 2 failed"}
    await asyncio.to_thread(
        batch.patch_namespaced_job_status,
        name,
        NS,
        {"status": {"active": 0, "failed": 1, "conditions": [failed]}},
    )
    st = await asyncio.to_thread(ex.status, FT)
    assert (st.phase, st.reason, st.attempt, st.retryable) == ("failed", "FailedIndexes", 1, True)
    # the control plane's next attempt: a new Job (and Service, policy) beside the failed one
    await asyncio.to_thread(ex.submit, _spec(4, 8, attempt=2))
    st = await asyncio.to_thread(ex.status, FT)
    assert (st.phase, st.attempt, st.job["name"]) == ("pending", 2, job_name(FT, 2))
    # logs: the newest attempt's pod
    pod = f"{job_name(FT, 2)}-0-abcde"
    kmock.objects[kmock.resource("v1/pods"), NS, pod] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "namespace": NS, "labels": {"job-name": job_name(FT, 2)}},
        "status": {"phase": "Running"},
    }
    kmock[f"get /api/v1/namespaces/{NS}/pods/{pod}/log"] << b"rank 0 says hi\n"
    assert b"".join(await asyncio.to_thread(lambda: list(ex.logs(FT)))) == b"rank 0 says hi\n"
    # cancel removes every attempt's objects
    await asyncio.to_thread(ex.cancel, FT)
    for attempt in (1, 2):
        for resource in ("batch/v1/jobs", "v1/services", "networking.k8s.io/v1/networkpolicies"):
            assert not _stored(kmock, resource, job_name(FT, attempt)), (resource, attempt)
    assert (await asyncio.to_thread(ex.status, FT)).phase == "missing"


@pytest.mark.asyncio
async def test_the_trainjob_executor_creates_reads_cancels_and_reads_logs(
    k8s: Any, kmock: Any, tmp_path: Path
) -> None:
    ex = TrainJobExecutor(k8s, _settings(tmp_path, executor="trainjob"), StoreSettings(backend="s3"))
    assert await asyncio.to_thread(ex.ready)
    ref = await asyncio.to_thread(ex.submit, _spec(4, 8))
    name = job_name(FT)
    assert ref == {"kind": "trainjob", "name": name, "namespace": NS}
    await asyncio.to_thread(ex.submit, _spec(4, 8))  # retried: one TrainJob
    stored = _stored(kmock, "trainer.kubeflow.org/v1alpha1/trainjobs", name)
    assert stored is not None
    validate_trainjob({k: v for k, v in stored.items() if k != "status"})
    assert (await asyncio.to_thread(ex.status, FT)).phase == "pending"
    custom = client.CustomObjectsApi(k8s)
    await asyncio.to_thread(
        custom.patch_namespaced_custom_object_status,
        "trainer.kubeflow.org",
        "v1alpha1",
        NS,
        "trainjobs",
        name,
        {
            "status": {
                "jobsStatus": [
                    {"name": "node", "active": 4, "ready": 4, "failed": 0, "succeeded": 0, "suspended": 0}
                ]
            }
        },
    )
    assert (await asyncio.to_thread(ex.status, FT)).phase == "running"
    pod = f"{name}-node-0-0-xyz"
    kmock.objects[kmock.resource("v1/pods"), NS, pod] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "namespace": NS, "labels": {"jobset.sigs.k8s.io/jobset-name": name}},
        "status": {"phase": "Running"},
    }
    kmock[f"get /api/v1/namespaces/{NS}/pods/{pod}/log"] << b"step 1\n"
    assert b"".join(await asyncio.to_thread(lambda: list(ex.logs(FT)))) == b"step 1\n"
    await asyncio.to_thread(ex.cancel, FT)
    assert not _stored(kmock, "trainer.kubeflow.org/v1alpha1/trainjobs", name)
    assert (await asyncio.to_thread(ex.status, FT)).phase == "missing"


# ------------------------------------------------------------------------- through the REST API
@pytest.fixture
def world(tmp_path: Path, tiny_model_dir: Path) -> dict[str, Any]:
    from huvidpo.data import make_synthetic_dataset
    from services.common.publish import publish_dir
    from services.common.store import LocalStore

    store = LocalStore(tmp_path / "store")
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    ds = make_synthetic_dataset(tmp_path / "ds", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    return {"store": store, "dataset_dir": ds, "tmp": tmp_path}


def _upload_and_create(c: Any, ds: Path, **shape: int) -> dict[str, Any]:
    assert c.post("/v1/datasets", json={"name": "cats"}).status_code == 201
    files = [
        ("files", (p.relative_to(ds).as_posix(), p.read_bytes(), "video/mp4"))
        for p in sorted(ds.rglob("*"))
        if p.is_file()
    ]
    r = c.post("/v1/datasets/cats/versions", files=files)
    assert r.status_code == 201, r.text
    body = {
        "dataset": "cats",
        "version": r.json()["id"],
        "base_model": "tiny",
        "hyperparameters": {"max_steps": 2, "num_frames": 4, "height": 32, "width": 32},
        **shape,
    }
    r = c.post("/v1/fine-tunes", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


@pytest.mark.asyncio
async def test_a_failed_2_node_attempt_is_followed_by_the_next_attempt_the_control_plane_starts(
    k8s: Any, kmock: Any, world: dict[str, Any]
) -> None:
    from fastapi.testclient import TestClient

    from services.controlplane.app import create_app

    settings = _settings(world["tmp"], gpu_count=0, queue_name="", shapes="1x1,2x1", max_attempts=2)
    app = create_app(
        settings,
        world["store"],
        KubernetesExecutor(k8s, settings, StoreSettings(backend="s3")),
        background=False,
    )
    c = TestClient(app)
    ft = await asyncio.to_thread(_upload_and_create, c, world["dataset_dir"], nodes=2, gpus_per_node=1)
    assert (ft["nodes"], ft["world_size"], ft["attempt"]) == (2, 2, 1)
    first = job_name(ft["id"])
    job = _stored(kmock, "batch/v1/jobs", first)
    assert job is not None and job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert _stored(kmock, "v1/services", first) and _stored(
        kmock, "networking.k8s.io/v1/networkpolicies", first
    )
    batch = client.BatchV1Api(k8s)
    failed = {"type": "Failed", "status": "True", "reason": "FailedIndexes", "message": "index 1 failed"}
    await asyncio.to_thread(
        batch.patch_namespaced_job_status, first, NS, {"status": {"failed": 1, "conditions": [failed]}}
    )
    got = (await asyncio.to_thread(c.get, f"/v1/fine-tunes/{ft['id']}")).json()
    second = job_name(ft["id"], 2)
    assert (got["state"], got["attempt"], got["job"]["name"]) == ("queued", 2, second)
    job2 = _stored(kmock, "batch/v1/jobs", second)
    assert job2 is not None and job2["metadata"]["labels"]["huvidpo.dev/attempt"] == "2"
    kubernetes_validate.validate(job2, K8S_VERSION, strict=True)
    # the second attempt fails as well: the budget (2 attempts) is spent
    await asyncio.to_thread(
        batch.patch_namespaced_job_status, second, NS, {"status": {"failed": 1, "conditions": [failed]}}
    )
    got = (await asyncio.to_thread(c.get, f"/v1/fine-tunes/{ft['id']}")).json()
    assert (got["state"], got["attempt"], got["reason"]) == ("failed", 2, "FailedIndexes")
    assert not _stored(kmock, "batch/v1/jobs", job_name(ft["id"], 3))


@pytest.mark.asyncio
async def test_the_trainjob_watch_moves_the_fine_tune_and_cancel_deletes_the_trainjob(
    k8s: Any, kmock: Any, world: dict[str, Any]
) -> None:
    from fastapi.testclient import TestClient

    from services.controlplane.app import create_app

    settings = _settings(world["tmp"], executor="trainjob", gpu_count=8, queue_name="", shapes="1x1,2x8")
    executor = TrainJobExecutor(k8s, settings, StoreSettings(backend="s3"))
    custom = client.CustomObjectsApi(k8s)
    with TestClient(create_app(settings, world["store"], executor, background=True)) as c:
        ft = await asyncio.to_thread(_upload_and_create, c, world["dataset_dir"], nodes=2, gpus_per_node=8)
        name = job_name(ft["id"])
        assert ft["job"] == {"kind": "trainjob", "name": name, "namespace": NS}
        done = {"type": "Complete", "status": "True", "reason": "JobsCompleted"}
        await asyncio.to_thread(
            custom.patch_namespaced_custom_object_status,
            "trainer.kubeflow.org",
            "v1alpha1",
            NS,
            "trainjobs",
            name,
            {"status": {"conditions": [done]}},
        )
        # the watch (no GET) records the end in the store
        from services.common.records.finetune import read_status

        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:
            status = read_status(world["store"], ft["id"])
            if status is not None and status.state == "succeeded":
                break
            await asyncio.sleep(0.1)
        assert status is not None and status.state == "succeeded"
        # a second fine-tune is cancelled: its TrainJob is deleted
        ft2 = (
            await asyncio.to_thread(
                c.post,
                "/v1/fine-tunes",
                json={
                    "dataset": "cats",
                    "version": ft["version"],
                    "base_model": "tiny",
                    "hyperparameters": {"max_steps": 3, "num_frames": 4, "height": 32, "width": 32},
                },
            )
        ).json()
        assert ft2["job"]["kind"] == "trainjob"
        r = await asyncio.to_thread(c.post, f"/v1/fine-tunes/{ft2['id']}/cancel")
        assert r.json()["state"] == "cancelled"
        assert not _stored(kmock, "trainer.kubeflow.org/v1alpha1/trainjobs", job_name(ft2["id"]))


def test_an_evaluation_trainjob_runs_the_evaluator(tmp_path: Path) -> None:
    spec = JobSpec("ev-0123456789abcdef0123", {"checkpoint_id": "ckpt-ft-a-1"}, role="evaluator")
    tj = build_trainjob(spec, _settings(tmp_path), StoreSettings(backend="s3"))
    validate_trainjob(tj)
    trainer = tj["spec"]["trainer"]
    assert trainer["command"] == ["python", "-m", "services.evaluator"]
    assert trainer["numNodes"] == 1 and trainer["numProcPerNode"] == 1
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["HUVIDPO_EVALUATOR_EVALUATION_ID"] == "ev-0123456789abcdef0123"
