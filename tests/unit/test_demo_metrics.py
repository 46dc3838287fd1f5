"""The demo reads a fine-tune's training metrics through ``GET /v1/fine-tunes/{id}/metrics``; a control
plane without that route (404) gets the same body built from the trainer's step events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo.client import ApiError, ControlPlaneClient
from demo.metrics import finetune_metrics, metric_rows
from services.common.records.keys import progress_key
from services.common.store import LocalStore


def _client(handler: Any) -> ControlPlaneClient:
    cp = ControlPlaneClient("http://cp.test", "t")
    cp.http = httpx.Client(base_url="http://cp.test", transport=httpx.MockTransport(handler))
    return cp


def test_metrics_come_from_the_rest_route_when_the_control_plane_has_it(tmp_path: Path) -> None:
    body = {
        "finetune_id": "ft-a",
        "steps": [1, 2],
        "metrics": {"loss": [0.7, 0.5], "implicit_acc": [0.5, None]},
    }
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json=body)

    got, source = finetune_metrics(_client(handler), LocalStore(tmp_path / "s"), "ft-a")
    assert (got, source, seen) == (body, "rest", ["/v1/fine-tunes/ft-a/metrics"])
    assert metric_rows(got) == [{"step": 1, "loss": 0.7, "implicit_acc": 0.5}, {"step": 2, "loss": 0.5}]


def test_without_the_route_the_same_body_is_built_from_the_step_events(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    lines = [
        {"event": "start", "total_steps": 2},
        {"event": "step", "step": 1, "loss": 0.9, "implicit_acc": 0.0},
        {"event": "start", "total_steps": 2},  # a retry: its value for step 1 wins
        {"event": "step", "step": 1, "loss": 0.7, "implicit_acc": 0.5, "reward_margin": 0.1},
        {"event": "step", "step": 2, "loss": 0.5, "implicit_acc": 1.0, "reward_margin": 0.3},
        {"event": "end", "state": "succeeded"},
    ]
    store.put_bytes(progress_key("ft-a"), "".join(json.dumps(x) + "\n" for x in lines).encode())
    problem = {"type": "about:blank", "title": "Not Found", "status": 404}
    cp = _client(lambda request: httpx.Response(404, json=problem))
    got, source = finetune_metrics(cp, store, "ft-a")
    assert source == "store" and got["finetune_id"] == "ft-a" and got["steps"] == [1, 2]
    assert got["metrics"]["loss"] == [0.7, 0.5] and got["metrics"]["reward_margin"] == [0.1, 0.3]
    assert "lr" not in got["metrics"]  # a field no step had
    with pytest.raises(ApiError):  # no store to fall back on: the caller sees the 404
        finetune_metrics(cp, None, "ft-a")
    with pytest.raises(ApiError):  # any other error is not a missing route
        finetune_metrics(_client(lambda request: httpx.Response(500, json=problem)), store, "ft-a")
