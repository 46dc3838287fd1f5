"""Faults and bad inputs while serving, through the running processes (REST control plane, gRPC
inference service following the rollout record in the store):

- a rollout under concurrent generation load fails no request;
- a corrupt checkpoint rolled out is refused by the service and the old one keeps serving;
- bad inputs through REST and gRPC each get a clear error, never a 5xx, and crash nothing.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from demo.loop import publish_base_model
from demo.stack import Stack, local_store_env
from huvidpo.client._grpc import channel, run_generate, stub
from services.inference.gen import inference_pb2 as pb
from services.inference.testing import image_bytes, make_adapter, publish_checkpoint
from tests.e2e.harness import Running, store_from_env

pytestmark = pytest.mark.slow

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Two valid LoRA checkpoints (directories holding adapter/) of the tiny model."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        make_adapter(tiny_model_dir, root / name, seed=seed)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, adapters: dict[str, Path]) -> Any:
    """One stack for the module: control plane + inference, checkpoints A and B published, A rolled out."""

    work = tmp_path_factory.mktemp("serving")
    env = local_store_env(work / "store")
    store = store_from_env(env)
    digest = publish_base_model(store, tiny_model_dir, "tiny")
    lineage = {"dataset_digest": "d" * 64, "base_model_digest": digest, "finetune_id": "ft-e2e", "config": {}}
    for step, name in ((1, "a"), (2, "b")):
        publish_checkpoint(store, f"ckpt-ft-e2e-{step}", adapters[name], lineage)
    stack = Stack(work, env, {}, poll_seconds=0.5)
    running = Running(stack, store, digest)
    try:
        stack.start_controlplane()
        stack.start_inference(
            {
                "default_frames": "4",
                "default_height": "32",
                "default_width": "32",
                "default_steps": "2",
                "max_queue": "64",
            }
        )
        rollout = running.cp.rollouts.set("default", "ckpt-ft-e2e-1", create=True)
        running.cp.rollouts.wait("default", rollout["revision"], timeout=120)
        yield running
    finally:
        running.close()


def _generate(s: Any, request: pb.GenerateRequest, timeout: float) -> pb.GenerationResult:
    """One streamed Generate (the SDK's call, without its retries): raises ``grpc.RpcError``."""
    return run_generate(s, request, None, timeout)


def _request(seed: int = 0, **kw: Any) -> pb.GenerateRequest:
    fields: dict[str, Any] = dict(
        prompt="a square slides",
        first_frame_image=image_bytes(32, 32),
        frames=4,
        height=32,
        width=32,
        steps=2,
        seed=seed,
    )
    fields.update(kw)
    return pb.GenerateRequest(**fields)


def test_rollout_under_concurrent_generation_load_fails_no_request(serving: Any) -> None:
    stack = serving.stack
    served: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with channel(stack.grpc_address, stack.token) as ch:
            s = stub(ch)
            n = 0
            while not stop.is_set():
                try:
                    served.append(_generate(s, _request(seed=i * 1000 + n), timeout=120).checkpoint_id)
                except BaseException as exc:
                    errors.append(exc)
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while served.count("ckpt-ft-e2e-1") < 3 and not errors and time.monotonic() < deadline:
            time.sleep(0.1)
        rollout = serving.cp.rollouts.set("default", "ckpt-ft-e2e-2")
        # The rollout's status, from the replicas' heartbeats, says when every replica serves it.
        view = serving.cp.rollouts.wait("default", rollout["revision"], timeout=120)
        assert [(r["current"], r["up_to_date"]) for r in view["status"]["replicas"]] == [
            ("ckpt-ft-e2e-2", True)
        ]
        mark = len(served)
        while len(served) < mark + 3 and not errors and time.monotonic() < deadline + 120:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    assert not errors, errors[:3]
    assert served.count("ckpt-ft-e2e-1") >= 3
    assert served[-1] == "ckpt-ft-e2e-2"
    # no request was answered by anything but the two rolled-out checkpoints, and A stopped after B
    assert set(served) <= {"ckpt-ft-e2e-1", "ckpt-ft-e2e-2"}
    last_a = max(i for i, c in enumerate(served) if c == "ckpt-ft-e2e-1")
    assert all(c == "ckpt-ft-e2e-2" for c in served[last_a + 1 :])
    # restore A for the next tests
    rollout = serving.cp.rollouts.set("default", "ckpt-ft-e2e-1")
    serving.cp.rollouts.wait("default", rollout["revision"], timeout=120)


def _refused_count(metrics_url: str) -> float:
    total = 0.0
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("huvidpo_inference_rollout_outcomes_total{") and 'outcome="refused"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_corrupt_checkpoint_is_refused_and_the_old_one_keeps_serving(
    serving: Any, adapters: dict[str, Path]
) -> None:
    stack, store = serving.stack, serving.store
    lineage = {"dataset_digest": "d" * 64, "base_model_digest": serving.model_digest, "finetune_id": "ft-e2e"}
    publish_checkpoint(store, "ckpt-ft-e2e-9", adapters["b"], lineage)
    # flip bytes of the published weights: the manifest's sha256 no longer matches
    key = "checkpoints/ckpt-ft-e2e-9/adapter/adapter_model.safetensors"
    blob = bytearray(store.get_bytes(key))
    blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)
    store.put_bytes(key, bytes(blob))
    before = _refused_count(stack.inference_metrics_url)

    rollout = serving.cp.rollouts.set("default", "ckpt-ft-e2e-9")  # the record names it...
    assert rollout["current"] == "ckpt-ft-e2e-9"
    deadline = time.monotonic() + 60
    while _refused_count(stack.inference_metrics_url) <= before:  # ...the service refuses it
        assert time.monotonic() < deadline, "the corrupt checkpoint was not refused"
        time.sleep(0.3)
    # The rollout status shows it: the replica serves the old checkpoint, the rollout is not ready.
    view = serving.cp.rollouts.get("default")
    (replica,) = view["status"]["replicas"]
    assert replica["current"] == "ckpt-ft-e2e-1" and not replica["up_to_date"]
    (ready,) = view["status"]["conditions"]
    assert ready["status"] == "False" and ready["reason"] == "ReplicasNotUpToDate"
    with channel(stack.grpc_address, stack.token) as ch:
        s = stub(ch)
        models = s.ListModels(pb.ListModelsRequest(), timeout=10)
        assert "ckpt-ft-e2e-9" not in {m.id for m in models.models}
        current = [m.id for m in models.models if m.role == pb.MODEL_ROLE_CURRENT]
        assert current == ["ckpt-ft-e2e-1"]
        # the old checkpoint keeps serving requests
        for seed in range(2):
            assert _generate(s, _request(seed=seed), timeout=120).checkpoint_id == "ckpt-ft-e2e-1"
    assert stack.inference is not None and stack.inference.alive()
    serving.cp.rollouts.set("default", "ckpt-ft-e2e-1")


def test_bad_rest_inputs_get_clear_problems_and_no_5xx(serving: Any) -> None:
    cp = serving.cp.http.client  # raw httpx (with the token): the problems themselves are checked
    url = serving.stack.controlplane_url
    cp.post("/v1/datasets", json={"name": "bad-inputs"})
    cases: list[tuple[str, str, dict[str, Any], int]] = [
        ("POST", "/v1/datasets", {"json": {"name": "Not A Name!"}}, 422),
        (
            "POST",
            "/v1/datasets",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
        ),
        (
            "POST",
            "/v1/datasets",
            {"content": b'{"name": "x"}', "headers": {"content-type": "text/plain"}},
            415,
        ),
        ("GET", "/v1/datasets/does-not-exist", {}, 404),
        (
            "POST",
            "/v1/datasets/bad-inputs/versions",
            {"content": b"plain", "headers": {"content-type": "text/plain"}},
            415,
        ),
        (
            "POST",
            "/v1/datasets/bad-inputs/versions",
            {"files": [("files", ("run.sh", b"rm -rf /", "text/x-sh"))]},
            415,
        ),
        (
            "POST",
            "/v1/datasets/bad-inputs/versions",
            {"files": [("files", ("../../etc/x.json", b"{}", "application/json"))]},
            422,
        ),
        (
            "POST",
            "/v1/datasets/bad-inputs/versions",
            {"files": [("files", ("manifest.json", b"[{]", "application/json"))]},
            422,
        ),
        ("POST", "/v1/datasets/bad-inputs/versions/" + "0" * 64 + "/pairs", {"json": {}}, 404),
        (
            "POST",
            "/v1/fine-tunes",
            {"json": {"dataset": "bad-inputs", "version": "0" * 64, "base_model": "tiny"}},
            422,
        ),
        (
            "POST",
            "/v1/fine-tunes",
            {"json": {"dataset": "bad-inputs", "version": "zz", "base_model": "tiny"}},
            422,
        ),
        (
            "POST",
            "/v1/fine-tunes",
            {
                "json": {
                    "dataset": "bad-inputs",
                    "version": "0" * 64,
                    "base_model": "tiny",
                    "hyperparameters": {"lr": -1},
                }
            },
            422,
        ),
        ("GET", "/v1/fine-tunes/ft-nope", {}, 404),
        ("GET", "/v1/fine-tunes?page_size=100000", {}, 422),
        ("PUT", "/v1/rollouts/default", {"json": {"checkpoint": "ckpt-none-1"}}, 422),
        ("PUT", "/v1/rollouts/default", {"json": {}}, 422),
        (
            "POST",
            "/v1/rollouts/default/canary",
            {"json": {"checkpoint": "ckpt-ft-e2e-2", "percent": 500}},
            422,
        ),
        ("GET", "/v1/checkpoints/ckpt-none-1", {}, 404),
    ]
    for method, path, kwargs, status in cases:
        r = cp.request(method, path, **kwargs)
        assert r.status_code == status, (method, path, r.status_code, r.text[:300])
        assert r.headers["content-type"].startswith(PROBLEM), (method, path, r.headers["content-type"])
        body = r.json()
        assert body["status"] == status and body["type"] and body["detail"], body
    # no token, wrong token
    assert httpx.get(url + "/v1/datasets", timeout=10).status_code == 401
    wrong = httpx.get(url + "/v1/datasets", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.headers["content-type"].startswith(PROBLEM)
    # nothing answered 5xx, the process lives and still serves
    metrics = httpx.get(url + "/metrics", timeout=10).text
    fivexx = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith("huvidpo_controlplane_requests_total") and 'status="5' in ln
    ]
    assert fivexx == []
    assert serving.stack.controlplane.alive()
    assert httpx.get(url + "/readyz", timeout=10).status_code == 200


def test_bad_grpc_inputs_get_clear_status_codes_and_crash_nothing(serving: Any) -> None:
    cases: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
        ({"frames": 1}, grpc.StatusCode.INVALID_ARGUMENT, "frames"),
        ({"frames": 10_000}, grpc.StatusCode.INVALID_ARGUMENT, "frames"),
        ({"height": 30}, grpc.StatusCode.INVALID_ARGUMENT, "height"),
        ({"width": 100_000}, grpc.StatusCode.INVALID_ARGUMENT, "width"),
        ({"steps": 100_000}, grpc.StatusCode.INVALID_ARGUMENT, "steps"),
        ({"guidance_scale": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "guidance"),
        ({"first_frame_image": b"not an image"}, grpc.StatusCode.INVALID_ARGUMENT, "first_frame"),
        ({"prompt": "word " * 500}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"checkpoint_id": "ckpt-does-not-exist-1"}, grpc.StatusCode.NOT_FOUND, "ckpt-does-not-exist-1"),
        ({"first_frame_uri": "s3://elsewhere/x.png"}, grpc.StatusCode.INVALID_ARGUMENT, "first_frame_uri"),
    ]
    with channel(serving.stack.grpc_address, serving.stack.token) as ch:
        s = stub(ch)
        for kw, code, mention in cases:
            with pytest.raises(grpc.RpcError) as info:
                _generate(s, _request(**kw), timeout=60)
            err = info.value
            assert err.code() == code, (kw.keys(), err.code(), err.details())
            assert mention.split("_")[0] in (err.details() or "").lower() or mention in (
                err.details() or ""
            ), (
                kw.keys(),
                err.details(),
            )
        with pytest.raises(grpc.RpcError) as info:
            s.GetModel(pb.GetModelRequest(id="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # still alive and serving a good request
        assert _generate(s, _request(), timeout=120).checkpoint_id == "ckpt-ft-e2e-1"
    assert serving.stack.inference.alive()
    metrics = httpx.get(serving.stack.inference_metrics_url, timeout=10).text
    internal = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith("huvidpo_inference_requests_total") and ("INTERNAL" in ln or "UNKNOWN" in ln)
    ]
    assert internal == [] or all(ln.endswith(" 0.0") for ln in internal)
