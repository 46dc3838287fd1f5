"""``GET /v1/fine-tunes/{id}/events`` (pages, and a followed NDJSON stream that ends with the
fine-tune) and ``/metrics`` (the step metrics as aligned series), read from the ``progress.jsonl``
the test writes as the trainer would."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from services.common.publish import publish_dir
from services.common.records.progress import CheckpointEvent, EndEvent, StartEvent, StepEvent
from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.domain.ports import ExecStatus
from tests.unit.test_controlplane_api import AUTH, TOKEN, FakeExecutor, assert_problem, upload_files

STEPS = [
    StartEvent(time="t0", total_steps=3, attempt=1),
    StepEvent(time="t1", step=1, total_steps=3, loss=0.69, implicit_acc=0.5, reward_margin=0.0, lr=1e-4),
    StepEvent(time="t2", step=2, total_steps=3, loss=0.6, implicit_acc=0.75, reward_margin=0.1, lr=1e-4),
]
REST = [
    CheckpointEvent(time="t3", step=2, checkpoint_id="ckpt-x-2"),
    StepEvent(time="t4", step=3, total_steps=3, loss=0.5, implicit_acc=1.0, reward_margin=0.3),
    EndEvent(time="t5", state="succeeded", exit_code=0),
]


def write_progress(store: LocalStore, finetune_id: str, events: list[Any], torn: str = "") -> None:
    text = "".join(ev.to_line() + "\n" for ev in events) + torn
    store.put_bytes(f"finetunes/{finetune_id}/progress.jsonl", text.encode())


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from huvidpo.data import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("ds") / "d", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live(tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path) -> Iterator[dict[str, Any]]:
    """A control plane on 127.0.0.1 (a real server: the follower's lines arrive as they are sent)
    with one queued fine-tune whose Job phase the test sets."""
    store = LocalStore(tmp_path / "store")
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(TOKEN.encode()).hexdigest()],
        work_dir=tmp_path / "work",
        max_streams_per_token=1,
    )
    executor = FakeExecutor()
    app = create_app(settings, store, executor, background=False)
    client = TestClient(app)
    assert client.post("/v1/datasets", json={"name": "cats"}, headers=AUTH).status_code == 201
    v = client.post("/v1/datasets/cats/versions", files=upload_files(synthetic_dir), headers=AUTH).json()
    ft = client.post(
        "/v1/fine-tunes",
        json={
            "dataset": "cats",
            "version": v["id"],
            "base_model": "tiny",
            "hyperparameters": {"max_steps": 3, "num_frames": 4, "height": 32, "width": 32},
        },
        headers=AUTH,
    ).json()
    executor.phases[ft["id"]] = ExecStatus("running")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield {
            "url": f"http://127.0.0.1:{port}",
            "id": ft["id"],
            "store": store,
            "executor": executor,
            "client": client,
        }
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_events_are_paginated_by_seq_and_a_torn_last_line_is_not_an_event(live: dict[str, Any]) -> None:
    client, fid = live["client"], live["id"]
    assert client.get(f"/v1/fine-tunes/{fid}/events", headers=AUTH).json() == {
        "items": [],
        "next_after": None,
    }
    write_progress(live["store"], fid, STEPS + REST, torn='{"time": "t6", "event": "st')
    first = client.get(f"/v1/fine-tunes/{fid}/events", params={"limit": 2}, headers=AUTH).json()
    assert [e["seq"] for e in first["items"]] == [0, 1] and first["next_after"] == 1
    assert first["items"][0] == {"seq": 0, "time": "t0", "event": "start", "total_steps": 3, "attempt": 1}
    assert first["items"][1]["loss"] == 0.69 and first["items"][1]["event"] == "step"
    rest = client.get(f"/v1/fine-tunes/{fid}/events", params={"after": 1}, headers=AUTH).json()
    assert [e["event"] for e in rest["items"]] == ["step", "checkpoint", "step", "end"]
    assert rest["items"][1]["checkpoint_id"] == "ckpt-x-2" and rest["next_after"] == 5
    done = client.get(f"/v1/fine-tunes/{fid}/events", params={"after": 5}, headers=AUTH).json()
    assert done == {"items": [], "next_after": None}
    for bad in ({"limit": 0}, {"limit": 1001}, {"after": -2}):
        assert_problem(
            client.get(f"/v1/fine-tunes/{fid}/events", params=bad, headers=AUTH), 422, "validation-error"
        )
    assert_problem(client.get("/v1/fine-tunes/ft-nope/events", headers=AUTH), 404, "not-found")
    assert_problem(client.get(f"/v1/fine-tunes/{fid}/events"), 401, "unauthorized")


def test_metrics_are_series_aligned_with_steps(live: dict[str, Any]) -> None:
    client, fid = live["client"], live["id"]
    empty = client.get(f"/v1/fine-tunes/{fid}/metrics", headers=AUTH).json()
    assert empty["finetune_id"] == fid and empty["steps"] == [] and empty["metrics"]["loss"] == []
    # a second attempt resumed from step 2 redoes step 3: its latest values count
    retried = [*STEPS, *REST[:2], StartEvent(time="t6", resumed_from_step=2, attempt=2)]
    retried.append(StepEvent(time="t7", step=3, total_steps=3, loss=0.4, implicit_acc=1.0, reward_margin=0.5))
    write_progress(live["store"], fid, retried)
    m = client.get(f"/v1/fine-tunes/{fid}/metrics", headers=AUTH).json()
    assert m["steps"] == [1, 2, 3]
    assert m["metrics"]["loss"] == [0.69, 0.6, 0.4]
    assert m["metrics"]["implicit_acc"] == [0.5, 0.75, 1.0]
    assert m["metrics"]["reward_margin"] == [0.0, 0.1, 0.5]
    assert m["metrics"]["lr"] == [1e-4, 1e-4, None]
    assert m["metrics"]["total_steps"] == [3, 3, 3]
    assert {"step_seconds", "samples_per_second", "epoch"} <= set(m["metrics"])
    assert_problem(client.get("/v1/fine-tunes/ft-nope/metrics", headers=AUTH), 404, "not-found")


def test_a_followed_stream_sends_events_as_they_come_and_ends_with_the_finetune(live: dict[str, Any]) -> None:
    fid, store = live["id"], live["store"]
    write_progress(store, fid, STEPS)
    lines: list[dict[str, Any]] = []
    ended = threading.Event()

    def follow() -> None:
        with (
            httpx.Client(base_url=live["url"], timeout=30) as c,
            c.stream(
                "GET", f"/v1/fine-tunes/{fid}/events", params={"follow": "true", "after": 0}, headers=AUTH
            ) as r,
        ):
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/x-ndjson")
            for line in r.iter_lines():
                lines.append(json.loads(line))
        ended.set()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    deadline = time.monotonic() + 15
    while len(lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["seq"] for e in lines] == [1, 2]  # after=0: the start event was seen already
    # a token holds at most max_streams_per_token (1 here) followers
    second = httpx.get(f"{live['url']}/v1/fine-tunes/{fid}/events?follow=true", headers=AUTH, timeout=10)
    assert_problem(second, 429, "too-many-requests")
    time.sleep(1.5)
    assert not ended.is_set()  # still running: the stream waits for more
    write_progress(store, fid, STEPS + REST)
    live["executor"].phases[fid] = ExecStatus("succeeded")
    assert ended.wait(15), "the stream did not end with the fine-tune"
    assert [e["seq"] for e in lines] == [1, 2, 3, 4, 5]
    assert lines[-1] == {"seq": 5, "time": "t5", "event": "end", "state": "succeeded", "exit_code": 0}
    # the slot was given back: a new follower of the finished fine-tune gets everything and ends at once
    r = httpx.get(f"{live['url']}/v1/fine-tunes/{fid}/events?follow=true", headers=AUTH, timeout=10)
    assert [json.loads(x)["seq"] for x in r.text.splitlines()] == [0, 1, 2, 3, 4, 5]


def test_a_followed_stream_ends_when_the_finetune_is_deleted_meanwhile(live: dict[str, Any]) -> None:
    from services.controlplane.domain.errors import NotFound

    fid, client = live["id"], live["client"]
    write_progress(live["store"], fid, STEPS)
    lines: list[str] = []
    ended = threading.Event()

    def follow() -> None:
        with httpx.stream(
            "GET", f"{live['url']}/v1/fine-tunes/{fid}/events?follow=true", headers=AUTH, timeout=30
        ) as r:
            lines.extend(r.iter_lines())
        ended.set()

    threading.Thread(target=follow, daemon=True).start()
    deadline = time.monotonic() + 15
    while len(lines) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lines) == 3 and not ended.is_set()

    def gone(finetune_id: str) -> Any:
        raise NotFound(f"fine-tune {finetune_id!r} not found")

    client.app.state.ctx.finetunes.get = gone  # deleted by another replica, say
    assert ended.wait(15), "the stream outlived its fine-tune"
