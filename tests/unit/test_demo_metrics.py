"""The demo reads a fine-tune's training metrics through ``GET /v1/fine-tunes/{id}/metrics`` (the SDK's
``Client.fine_tunes.metrics``) and draws one row per step from them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from demo.metrics import metric_rows
from huvidpo.client import Client, NotFound


def _client(handler: Any) -> Client:
    return Client("http://cp.test", "t", transport=httpx.MockTransport(handler), retries=0)


def test_the_plot_rows_come_from_the_rest_metrics_route() -> None:
    body = {
        "finetune_id": "ft-a",
        "steps": [1, 2],
        "metrics": {"loss": [0.7, 0.5], "implicit_acc": [0.5, None]},
    }
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json=body)

    with _client(handler) as c:
        got = c.fine_tunes.metrics("ft-a")
    assert (got, seen) == (body, ["/v1/fine-tunes/ft-a/metrics"])
    assert metric_rows(got) == [{"step": 1, "loss": 0.7, "implicit_acc": 0.5}, {"step": 2, "loss": 0.5}]


def test_a_missing_fine_tune_is_an_error_not_an_empty_plot() -> None:
    problem = {"type": "https://huvidpo.dev/problems/not-found", "title": "Not Found", "status": 404}
    with _client(lambda request: httpx.Response(404, json=problem)) as c, pytest.raises(NotFound):
        c.fine_tunes.metrics("ft-a")
