"""Per-request shapes (nodes x gpus_per_node) through the REST API, and attempts of a group that
failed whole started by the control plane (the attempt count lives in the fine-tune's status)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.publish import publish_dir
from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.domain.ports import ExecStatus, JobSpec
from services.controlplane.executors.local import LocalExecutor
from services.controlplane.problems import PROBLEM_BASE

TOKEN = "shape-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class GroupExecutor:
    """Records every JobSpec; the test sets the newest attempt's status like a Job controller."""

    kind = "fake"

    def __init__(self) -> None:
        self.specs: list[JobSpec] = []
        self.phase: dict[str, ExecStatus] = {}

    def submit(self, spec: JobSpec) -> dict[str, str]:
        if not any(s.finetune_id == spec.finetune_id and s.attempt == spec.attempt for s in self.specs):
            self.specs.append(spec)
            self.phase[spec.finetune_id] = ExecStatus("pending", attempt=spec.attempt)
        return {"kind": "fake", "name": f"job-{spec.finetune_id}-{spec.attempt}"}

    def status(self, finetune_id: str) -> ExecStatus:
        return self.phase.get(finetune_id, ExecStatus("missing"))

    def cancel(self, finetune_id: str) -> None:
        self.phase.pop(finetune_id, None)

    def logs(self, finetune_id: str, follow: bool = False) -> Iterator[bytes]:
        return iter(())

    def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from huvidpo.data import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("ds") / "d", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32
    )


def _client(tmp: Path, tiny_model_dir: Path, executor: Any, **settings: Any) -> TestClient:
    store = LocalStore(tmp / "store")
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    cp = ControlPlaneSettings(
        tokens=[hashlib.sha256(TOKEN.encode()).hexdigest()], work_dir=tmp / "work", **settings
    )
    return TestClient(create_app(cp, store, executor, background=False))


def _version(client: TestClient, d: Path) -> str:
    assert client.post("/v1/datasets", json={"name": "cats"}, headers=AUTH).status_code == 201
    files = [
        ("files", (p.relative_to(d).as_posix(), p.read_bytes(), "application/octet-stream"))
        for p in sorted(d.rglob("*"))
        if p.is_file()
    ]
    r = client.post("/v1/datasets/cats/versions", files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _create(client: TestClient, version: str, **shape: Any) -> Any:
    body = {
        "dataset": "cats",
        "version": version,
        "base_model": "tiny",
        "hyperparameters": {"max_steps": 3, "num_frames": 4, "height": 32, "width": 32},
        **shape,
    }
    return client.post("/v1/fine-tunes", json=body, headers=AUTH)


def test_an_allowed_shape_is_recorded_and_shown_with_its_world_size(
    tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path
) -> None:
    executor = GroupExecutor()
    client = _client(tmp_path, tiny_model_dir, executor, shapes="1x1,1x4,2x8")
    version = _version(client, synthetic_dir)
    r = _create(client, version, nodes=2, gpus_per_node=8)
    assert r.status_code == 201, r.text
    ft = r.json()
    assert (ft["nodes"], ft["gpus_per_node"], ft["world_size"], ft["attempt"]) == (2, 8, 16, 1)
    assert (executor.specs[-1].nodes, executor.specs[-1].gpus_per_node) == (2, 8)
    got = client.get(f"/v1/fine-tunes/{ft['id']}", headers=AUTH).json()
    assert (got["nodes"], got["gpus_per_node"], got["world_size"]) == (2, 8, 16)
    # no shape asked for: the default shape (the first allowed one)
    plain = _create(client, version).json()
    assert (plain["nodes"], plain["gpus_per_node"], plain["world_size"]) == (1, 1, 1)


def test_a_shape_outside_the_allow_list_is_422_naming_the_allowed_shapes(
    tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path
) -> None:
    executor = GroupExecutor()
    client = _client(tmp_path, tiny_model_dir, executor, shapes="1x1,1x2,1x4,2x8")
    version = _version(client, synthetic_dir)
    r = _create(client, version, nodes=4, gpus_per_node=8)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"] == PROBLEM_BASE + "validation-error"
    assert "1x1, 1x2, 1x4, 2x8" in body["detail"] and "4x8" in body["detail"]
    assert _create(client, version, gpus_per_node=3).status_code == 422
    assert _create(client, version, nodes=0).status_code == 422  # schema bound
    assert executor.specs == []


def test_the_local_executor_refuses_more_than_one_process(
    tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path
) -> None:
    executor = LocalExecutor(tmp_path / "local", {})
    client = _client(tmp_path, tiny_model_dir, executor, shapes="1x1,1x2")
    version = _version(client, synthetic_dir)
    r = _create(client, version, gpus_per_node=2)
    assert r.status_code == 422, r.text
    assert "local executor" in r.json()["detail"] and "1x2" in r.json()["detail"]


def test_a_group_that_failed_whole_is_restarted_as_the_next_attempt_until_the_budget_is_spent(
    tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path
) -> None:
    executor = GroupExecutor()
    client = _client(tmp_path, tiny_model_dir, executor, shapes="1x1,2x8", max_attempts=2)
    version = _version(client, synthetic_dir)
    ft = _create(client, version, nodes=2, gpus_per_node=8).json()
    executor.phase[ft["id"]] = ExecStatus(
        "failed", "FailedIndexes", "index 1 failed", attempt=1, retryable=True
    )
    got = client.get(f"/v1/fine-tunes/{ft['id']}", headers=AUTH).json()
    assert got["state"] == "queued" and got["attempt"] == 2
    assert [s.attempt for s in executor.specs] == [1, 2]
    assert got["job"]["name"] == f"job-{ft['id']}-2"
    # a late event of the first attempt changes nothing
    executor.phase[ft["id"]] = ExecStatus("failed", "FailedIndexes", "old", attempt=1, retryable=True)
    assert client.get(f"/v1/fine-tunes/{ft['id']}", headers=AUTH).json()["state"] == "queued"
    # the second attempt fails too: the budget (2) is spent, the fine-tune fails
    executor.phase[ft["id"]] = ExecStatus(
        "failed", "FailedIndexes", "index 0 failed", attempt=2, retryable=True
    )
    got = client.get(f"/v1/fine-tunes/{ft['id']}", headers=AUTH).json()
    assert got["state"] == "failed" and got["attempt"] == 2
    assert len(executor.specs) == 2


def test_a_failure_the_executor_does_not_call_retryable_is_final(
    tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path
) -> None:
    executor = GroupExecutor()
    client = _client(tmp_path, tiny_model_dir, executor, shapes="1x1,2x8", max_attempts=3)
    version = _version(client, synthetic_dir)
    ft = _create(client, version, nodes=2, gpus_per_node=8).json()
    executor.phase[ft["id"]] = ExecStatus("failed", "PodFailurePolicy", "exit 2", attempt=1)
    got = client.get(f"/v1/fine-tunes/{ft['id']}", headers=AUTH).json()
    assert got["state"] == "failed" and got["attempt"] == 1
    assert len(executor.specs) == 1


def test_a_refused_shape_is_named_before_the_store_is_read(tmp_path: Path) -> None:
    """Checks of the request's own fields come first: a wrong shape for a dataset that does not
    exist is told about the shape."""
    from services.common.store import LocalStore
    from services.controlplane.domain.datasets import DatasetService
    from services.controlplane.domain.errors import InvalidRequest
    from services.controlplane.domain.finetunes import FineTuneRequest, FineTuneService
    from tests.doubles import IdleExecutor

    store = LocalStore(tmp_path / "s")
    svc = FineTuneService(
        store, IdleExecutor(), DatasetService(store, tmp_path / "c"), shapes=[(1, 1), (1, 2)]
    )
    with pytest.raises(InvalidRequest) as err:
        svc.validate(FineTuneRequest("cats", "0" * 64, "tiny", "dpo", {}, 4, 8))
    assert err.value.field == "nodes" and "allowed shapes: 1x1, 1x2" in str(err.value)
