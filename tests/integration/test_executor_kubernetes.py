"""KubernetesExecutor with the official client against kmock (an in-memory Kubernetes API server).

kmock runs no controllers, so the test plays the Job controller by patching Job status. Every Job
the executor builds is validated with kubernetes-validate (strict) against current schemas.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from fastapi.testclient import TestClient
from kmock import method as kmock_method
from kubernetes import client

from services.common.publish import publish_dir
from services.common.settings import ControlPlaneSettings, StoreSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.domain.errors import Unavailable
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
        "dev_mode": True,
    }
    base.update(kw)
    return ControlPlaneSettings(**base)


@pytest.fixture
def k8s(kmock: Any) -> Any:
    kmock.resources["batch/v1/jobs"].kind = "Job"
    kmock.resources["v1/pods"].kind = "Pod"
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
        # The trainer outlives its last step by two scrape intervals of the shipped Prometheus
        # configs, so a short run's final metrics are scraped.
        plain = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        linger = float(plain["HUVIDPO_TRAINER_METRICS_LINGER_SECONDS"])
        assert linger >= 2 * _scrape_interval_seconds()
        assert int(plain["HUVIDPO_TRAINER_METRICS_PORT"]) == container["ports"][0]["containerPort"]


def _scrape_interval_seconds() -> float:
    repo = Path(__file__).resolve().parents[2]
    texts = [
        (repo / "deploy/monitoring/prometheus.yml").read_text(),
        (repo / "deploy/components/prometheus-operator/monitors.yaml").read_text(),
    ]
    found = [float(v) for t in texts for v in re.findall(r"(?:scrape_)?interval:\s*(\d+)s", t)]
    assert found, "no scrape interval in the shipped Prometheus configs"
    return max(found)


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


# Clips the dataset's 4-frame 32x32 videos can give (the control plane refuses others at submit).
CLIPS = {"num_frames": 4, "height": 32, "width": 32}


def _ft_body(version: str) -> dict[str, Any]:
    return {
        "dataset": "cats",
        "version": version,
        "base_model": "tiny",
        "hyperparameters": {"max_steps": 2, **CLIPS},
    }


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
    assert [j.metadata.name for j in jobs.items if j.metadata] == [job_name(first.json()["id"])]
    assert len(jobs.items) == 1
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
            record = store.get_json(f"finetunes/{ft['id']}/status.json")
            if record["state"] != "running":
                break
            await asyncio.sleep(0.1)
        assert (record["state"], record["reason"]) == ("failed", "PodFailurePolicy")

        # a second fine-tune is cancelled: its Job is deleted
        ft2 = (
            await asyncio.to_thread(
                c.post,
                "/v1/fine-tunes",
                json={**_ft_body(version), "hyperparameters": {"max_steps": 3, **CLIPS}},
            )
        ).json()
        cancelled = await asyncio.to_thread(c.post, f"/v1/fine-tunes/{ft2['id']}/cancel")
        assert cancelled.json()["state"] == "cancelled"
        with pytest.raises(client.exceptions.ApiException) as err:
            await asyncio.to_thread(batch.read_namespaced_job, job_name(ft2["id"]), NS)
        assert err.value.status == 404


# ------------------------------------------------------------------------------------------ logs
# kmock stores pods like any object but does not serve their logs: each test serves
# /api/v1/namespaces/{ns}/pods/{pod}/log itself (a stream of chunks, or an error), and checks from
# kmock's record of requests which pods were listed and read, with which query parameters.


def _serve_log(kmock: Any, pod: str, *payload: Any) -> None:
    """Serve ``pod``'s log: chunks of a stream, or a status code and a body."""
    reaction = kmock[f"get /api/v1/namespaces/{NS}/pods/{pod}/log"]
    for item in payload:
        reaction = reaction << item


def _gets(kmock: Any, path: str) -> list[Any]:
    """The GET requests kmock has had for ``path``, in order (with their query parameters)."""
    return [r for r in list(kmock) if r.method == kmock_method.GET and r.url.path == path]


def _log_reads(kmock: Any, pod: str) -> list[dict[str, str]]:
    return [dict(r.params) for r in _gets(kmock, f"/api/v1/namespaces/{NS}/pods/{pod}/log")]


def _pod_lists(kmock: Any) -> list[dict[str, str]]:
    return [dict(r.params) for r in _gets(kmock, f"/api/v1/namespaces/{NS}/pods")]


def _status_body(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}


async def _add_pod(core: Any, name: str, job: str, created: str, phase: str | None = "Running") -> None:
    """Play the Job controller: a pod of ``job`` (its labels), then the kubelet's phase."""
    labels = {"job-name": job, "batch.kubernetes.io/job-name": job, "huvidpo.dev/finetune-id": job[8:]}
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels, "creationTimestamp": created},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": "trainer:1"}]},
    }
    await asyncio.to_thread(core.create_namespaced_pod, NS, body)
    if phase is not None:
        await asyncio.to_thread(core.patch_namespaced_pod_status, name, NS, {"status": {"phase": phase}})


def _read_logs(
    executor: KubernetesExecutor,
    finetune_id: str,
    follow: bool = False,
    on_chunk: Callable[[bytes], None] | None = None,
) -> list[bytes]:
    """Every chunk ``logs`` yields (call it in a thread: kmock serves on the test's event loop)."""
    out: list[bytes] = []
    for chunk in executor.logs(finetune_id, follow=follow):
        out.append(chunk)
        if on_chunk is not None:
            on_chunk(chunk)
    return out


@pytest.fixture
def executor(k8s: Any, tmp_path: Path) -> KubernetesExecutor:
    ex = KubernetesExecutor(k8s, _settings(tmp_path), StoreSettings(backend="s3"))
    ex.log_poll_seconds = 0.05
    return ex


@pytest.mark.asyncio
async def test_follow_streams_the_retry_pods_log_chunk_by_chunk(
    k8s: Any, kmock: Any, executor: KubernetesExecutor
) -> None:
    core = client.CoreV1Api(k8s)
    ft = "ft-logs-follow"
    job = job_name(ft)
    await asyncio.to_thread(executor.submit, JobSpec(ft))
    # the first attempt exited 75 (transient) and the Job controller made a second pod
    await _add_pod(core, f"{job}-aaaaa", job, "2026-11-25T10:00:00Z", "Failed")
    await _add_pod(core, f"{job}-bbbbb", job, "2026-11-25T10:03:00Z", "Running")
    # a newer pod of another Job in the namespace (kmock ignores label selectors; the executor must not)
    await _add_pod(core, "huvidpo-ft-other-ccccc", "huvidpo-ft-other", "2026-11-25T10:09:00Z")

    first_seen = threading.Event()
    waited: list[bool] = []

    async def trainer_output() -> AsyncIterator[bytes]:
        yield b"step 1/3 loss=0.693\n"
        # the next line only once the caller holds the first one: nothing may be buffered to the end
        for _ in range(500):
            if first_seen.is_set():
                break
            await asyncio.sleep(0.01)
        waited.append(first_seen.is_set())
        yield b"step 2/3 loss=0.512\n"
        await asyncio.sleep(0.05)
        yield b"step 3/3 loss=0.401\ndone\n"

    _serve_log(kmock, f"{job}-aaaaa", b"step 1/3 loss=0.693\nexit 75\n")
    _serve_log(kmock, "huvidpo-ft-other-ccccc", b"someone else's trainer\n")
    _serve_log(kmock, f"{job}-bbbbb", lambda: trainer_output())

    chunks = await asyncio.to_thread(
        _read_logs, executor, ft, True, lambda c: first_seen.set() if c else None
    )

    data = [c for c in chunks if c]
    assert data[0] == b"step 1/3 loss=0.693\n"
    assert b"".join(data) == b"step 1/3 loss=0.693\nstep 2/3 loss=0.512\nstep 3/3 loss=0.401\ndone\n"
    assert waited == [True]
    assert _log_reads(kmock, f"{job}-aaaaa") == _log_reads(kmock, "huvidpo-ft-other-ccccc") == []
    assert _log_reads(kmock, f"{job}-bbbbb") == [{"container": "trainer", "follow": "true"}]
    assert _pod_lists(kmock) == [{"labelSelector": f"job-name={job}"}]


@pytest.mark.asyncio
async def test_without_follow_the_log_so_far_of_the_live_pod_is_returned(
    k8s: Any, kmock: Any, executor: KubernetesExecutor
) -> None:
    core = client.CoreV1Api(k8s)
    ft = "ft-logs-now"
    job = job_name(ft)
    # the retry's pod was made within the same second as the failed one (timestamps have 1 s
    # resolution); an API server lists pods by name, not age (kmock: in the order they were added),
    # so the failed one comes last: the live pod is still the one to read
    await _add_pod(core, f"{job}-aaaaa", job, "2026-11-25T10:00:00Z", "Running")
    await _add_pod(core, f"{job}-zzzzz", job, "2026-11-25T10:00:00Z", "Failed")
    _serve_log(kmock, f"{job}-zzzzz", b"first attempt\n")
    _serve_log(kmock, f"{job}-aaaaa", (b"loading base model\n", b"step 1/2\n"))

    chunks = await asyncio.to_thread(_read_logs, executor, ft)

    assert b"".join(chunks) == b"loading base model\nstep 1/2\n"
    assert _log_reads(kmock, f"{job}-zzzzz") == []
    assert _log_reads(kmock, f"{job}-aaaaa") == [{"container": "trainer", "follow": "false"}]


@pytest.mark.asyncio
async def test_no_pod_or_a_pending_pod_has_an_empty_log_and_follow_waits_for_it_to_run(
    k8s: Any, kmock: Any, executor: KubernetesExecutor
) -> None:
    core = client.CoreV1Api(k8s)
    ft = "ft-logs-wait"
    job = job_name(ft)
    await asyncio.to_thread(executor.submit, JobSpec(ft))
    pod = f"{job}-qwert"
    _serve_log(kmock, pod, b"started\n", b"step 1/1\n")

    # queued: the Job has no pod yet
    assert await asyncio.to_thread(_read_logs, executor, ft) == []
    # scheduled, image still pulling: no container to read yet, and no log request is made
    await _add_pod(core, pod, job, "2026-11-25T10:00:00Z", "Pending")
    assert await asyncio.to_thread(_read_logs, executor, ft) == []
    assert _log_reads(kmock, pod) == []

    # follow waits (heartbeats only) while the pod is Pending, then streams once it runs
    lists_before = len(_pod_lists(kmock))
    follower = asyncio.create_task(asyncio.to_thread(_read_logs, executor, ft, True))
    for _ in range(200):
        if len(_pod_lists(kmock)) >= lists_before + 3:
            break
        await asyncio.sleep(0.02)
    assert len(_pod_lists(kmock)) >= lists_before + 3  # it looked again, and again
    assert not follower.done() and _log_reads(kmock, pod) == []
    await asyncio.to_thread(core.patch_namespaced_pod_status, pod, NS, {"status": {"phase": "Running"}})
    chunks = await asyncio.wait_for(follower, timeout=10)

    assert b"".join(chunks) == b"started\nstep 1/1\n"
    assert set(chunks[:-2]) <= {b""}  # only heartbeats before the pod ran
    assert _log_reads(kmock, pod) == [{"container": "trainer", "follow": "true"}]


@pytest.mark.asyncio
async def test_follow_ends_when_the_job_finished_without_a_pod_that_ran(
    k8s: Any, executor: KubernetesExecutor
) -> None:
    batch = client.BatchV1Api(k8s)
    # no Job at all (deleted by its TTL, or never made): nothing to wait for
    assert await asyncio.wait_for(asyncio.to_thread(_read_logs, executor, "ft-gone", True), 10) == []
    # the Job failed before any pod ran (e.g. activeDeadlineSeconds while unschedulable)
    await asyncio.to_thread(executor.submit, JobSpec("ft-never-ran"))
    failed = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "too long"}
    await asyncio.to_thread(
        batch.patch_namespaced_job_status, job_name("ft-never-ran"), NS, {"status": {"conditions": [failed]}}
    )
    chunks = await asyncio.wait_for(asyncio.to_thread(_read_logs, executor, "ft-never-ran", True), 10)
    assert b"".join(chunks) == b""


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("code", "message"),
    [
        (400, 'container "trainer" in pod "{pod}" is waiting to start: ContainerCreating'),
        (404, 'pods "{pod}" not found'),
    ],
)
async def test_a_pod_without_a_log_to_read_gives_an_empty_log(
    k8s: Any, kmock: Any, executor: KubernetesExecutor, code: int, message: str
) -> None:
    """The pod list said Running, but by the read the API answers 400 (not started) or 404 (gone)."""
    core = client.CoreV1Api(k8s)
    job = job_name("ft-logs-race")
    pod = f"{job}-abcde"
    await _add_pod(core, pod, job, "2026-11-25T10:00:00Z", "Running")
    _serve_log(kmock, pod, code, _status_body(code, message.format(pod=pod)))

    assert await asyncio.to_thread(_read_logs, executor, "ft-logs-race") == []
    assert len(_log_reads(kmock, pod)) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("failing", ["list", "read"])
async def test_a_failing_kubernetes_api_is_unavailable_before_any_byte(
    k8s: Any, kmock: Any, executor: KubernetesExecutor, failing: str
) -> None:
    core = client.CoreV1Api(k8s)
    job = job_name("ft-logs-500")
    pod = f"{job}-abcde"
    await _add_pod(core, pod, job, "2026-11-25T10:00:00Z", "Running")
    if failing == "list":
        kmock[f"get /api/v1/namespaces/{NS}/pods"] << 403 << _status_body(403, "pods is forbidden")
    else:
        _serve_log(kmock, pod, 500, _status_body(500, "etcdserver: request timed out"))
    for follow in (False, True):
        with pytest.raises(Unavailable, match=r"Kubernetes API failed: (403|500)"):
            # raised by the call itself, before any chunk: the REST route answers 503, not a cut 200
            await asyncio.to_thread(executor.logs, "ft-logs-500", follow)


@pytest.mark.asyncio
async def test_the_logs_route_serves_the_trainer_output_from_kubernetes(
    k8s: Any, kmock: Any, world: dict[str, Any]
) -> None:
    settings = _settings(world["tmp"])
    executor = KubernetesExecutor(k8s, settings, StoreSettings(backend="s3"))
    executor.log_poll_seconds = 0.05
    c = TestClient(create_app(settings, world["store"], executor, background=False))
    version = await asyncio.to_thread(_upload, c, world["dataset_dir"])
    ft = (await asyncio.to_thread(c.post, "/v1/fine-tunes", json=_ft_body(version))).json()
    url = f"/v1/fine-tunes/{ft['id']}/logs"

    # queued, the Job has no pod yet: an empty log, not an error
    r = await asyncio.to_thread(c.get, url)
    assert (r.status_code, r.content) == (200, b"")
    assert r.headers["content-type"].startswith("text/plain")

    job = job_name(ft["id"])
    pod = f"{job}-x1y2z"
    await _add_pod(client.CoreV1Api(k8s), pod, job, "2026-11-25T10:00:00Z", "Running")
    _serve_log(kmock, pod, b"loading tiny\n", b"step 1/2 loss=0.69\n", b"step 2/2 loss=0.55\n")
    expected = b"loading tiny\nstep 1/2 loss=0.69\nstep 2/2 loss=0.55\n"
    for query in ("", "?follow=true"):
        r = await asyncio.to_thread(c.get, url + query)
        assert (r.status_code, r.content) == (200, expected)
    assert [p["follow"] for p in _log_reads(kmock, pod)] == ["false", "true"]

    r = await asyncio.to_thread(c.get, "/v1/fine-tunes/ft-00000000000000000000/logs")
    assert r.status_code == 404

    # the Kubernetes API fails: a 503 problem the client can retry, not a 500 or a cut 200
    kmock[f"get /api/v1/namespaces/{NS}/pods"] << 503 << _status_body(503, "apiserver is shutting down")
    r = await asyncio.to_thread(c.get, url)
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"].endswith("/service-unavailable")


def test_an_evaluation_job_runs_the_evaluator_in_the_trainer_image_with_its_id(tmp_path: Path) -> None:
    settings = _settings(tmp_path, gpu_count=1)
    spec = JobSpec(
        "ev-0123456789abcdef0123", {"checkpoint_id": "ckpt-ft-a-1", "base_model": "tiny"}, role="evaluator"
    )
    job = build_job(spec, settings, StoreSettings(backend="s3", endpoint="minio:9000"))
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == settings.trainer_image
    assert container["command"] == ["python", "-m", "services.evaluator"]
    plain = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert plain["HUVIDPO_EVALUATOR_EVALUATION_ID"] == "ev-0123456789abcdef0123"
    assert plain["HUVIDPO_EVALUATOR_DEVICE"] == "cuda" and "HUVIDPO_TRAINER_FINETUNE_ID" not in plain
    assert job["metadata"]["name"] == "huvidpo-ev-0123456789abcdef0123"
    # The trainer's pod policies select it (same component); the role label tells the two apart.
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"
    assert pod["metadata"]["labels"]["huvidpo.dev/role"] == "evaluator"
    assert "prometheus.io/scrape" not in pod["metadata"]["annotations"]  # it serves no metrics
    # exit 2 (bad input) fails the Job at once, as for the trainer
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
