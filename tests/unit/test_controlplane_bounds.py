"""Bounds of the control plane's REST API (issue 16's exhaustion probes) over a LocalStore.

Body limits per route (413 naming the limit; a token before any body), the rating session's pages and
sampled pairs, presigned upload URLs that die at commit, and a non-UTF-8 manifest as a 4xx. The
live-server halves (a 400 MiB body without a token, log followers) are in
``tests/integration/test_controlplane_bounds_live.py``.
"""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.problems import PROBLEM_BASE
from tests.doubles import IdleExecutor

TOKEN = "bounds-write"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MIB = 1024 * 1024


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    store = LocalStore(tmp_path / "store")
    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(TOKEN.encode()).hexdigest()],
        work_dir=tmp_path / "work",
        max_upload_bytes=100_000,
        max_request_bytes=10_000,
    )
    client = TestClient(create_app(settings, store, IdleExecutor(), background=False))
    return {"c": client, "store": store}


def assert_problem(r: Any, status: int, kind: str, *needles: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["type"] == PROBLEM_BASE + kind
    for n in needles:
        assert n in body["detail"], body["detail"]
    return body


# ----------------------------------------------------------------------------------- body limits
def test_a_json_body_over_its_limit_is_413_naming_the_limit(env: dict[str, Any]) -> None:
    c = env["c"]
    big = {"name": "d", "description": "x" * 20_000}
    assert_problem(
        c.post("/v1/datasets", json=big, headers=AUTH), 413, "payload-too-large", "limit is 10000 bytes"
    )

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while it arrives
        yield b'{"name": "d", "description": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    r = c.post("/v1/datasets", content=chunked(), headers={**AUTH, "Content-Type": "application/json"})
    assert_problem(r, 413, "payload-too-large", "limit of 10000 bytes")
    assert c.get("/v1/datasets", headers=AUTH).json()["items"] == []


def test_an_upload_route_takes_the_upload_limit_counted_while_streaming(env: dict[str, Any]) -> None:
    c = env["c"]
    c.post("/v1/datasets", json={"name": "d"}, headers=AUTH)
    up = c.post("/v1/datasets/d/uploads", headers=AUTH).json()
    boundary = "b0und"

    def body(size: int) -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="v.mp4"\r\n\r\n'
        ).encode()
        for _ in range(size // 1000):
            yield b"x" * 1000
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    ok = c.post(f"/v1/datasets/d/uploads/{up['id']}/files", content=body(50_000), headers=headers)
    assert ok.status_code == 200, ok.text  # over the JSON limit, under the upload limit
    r = c.post(f"/v1/datasets/d/uploads/{up['id']}/files", content=body(200_000), headers=headers)
    assert_problem(r, 413, "payload-too-large", "100000 bytes")


def test_a_body_without_a_valid_token_is_401_before_it_is_read(env: dict[str, Any]) -> None:
    c = env["c"]

    def body() -> Iterator[bytes]:
        for _ in range(100):
            yield b"x" * 1000

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = c.post("/v1/datasets", content=body(), headers={**headers, "Content-Type": "application/json"})
        assert_problem(r, 401, "unauthorized", "bearer token")
        assert r.headers["connection"] == "close"
    # a body-less request still gets the route's own 401 (auth.require_auth)
    assert_problem(c.get("/v1/datasets"), 401, "unauthorized")


# ------------------------------------------------------------------------------- rating session
def _one_prompt_version(env: dict[str, Any], n: int) -> str:
    """A version with ``n`` videos of one prompt; every record names one small file (the session reads
    the manifest, never the videos)."""
    c = env["c"]
    c.post("/v1/datasets", json={"name": "many"}, headers=AUTH)
    manifest = "".join(
        json.dumps({"id": f"v{i:04d}", "file": "v.mp4", "prompt": "p"}) + "\n" for i in range(n)
    )
    files = [("files", ("manifest.jsonl", manifest.encode())), ("files", ("v.mp4", b"not decoded here"))]
    # the manifest is larger than the JSON limit of this fixture, but this is an upload route
    r = c.post("/v1/datasets/many/versions", files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_the_rating_session_pages_and_samples_pairs_of_a_large_prompt(env: dict[str, Any]) -> None:
    """2000 videos of one prompt: 1,999,000 pairs before; now each video meets 16 others (16000
    pairs), served in pages, deterministically."""
    c, n = env["c"], 2000
    version = _one_prompt_version(env, n)
    url = "/v1/datasets/many/rating-session"
    tracemalloc.start()
    try:
        first = c.get(url, params={"version": version}, headers=AUTH)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first.status_code == 200, first.text
    assert len(first.content) < MIB and peak < 64 * MIB, (len(first.content), peak)
    page = first.json()
    assert page["progress"]["ab"] == {"done": 0, "total": n * 8}
    assert len(page["pairs"]) == 500 and page["pairs_offset"] == 0
    pairs = list(page["pairs"])
    while page["next_page_token"]:
        params = {
            "version": version,
            "page_token": page["next_page_token"],
            "page_size": 2000,
        }
        page = c.get(url, params=params, headers=AUTH).json()
        pairs += page["pairs"]
    assert len(pairs) == n * 8 == len({p["key"] for p in pairs})  # each pair once
    meets = Counter(side for p in pairs for side in (p["left"]["id"], p["right"]["id"]))
    assert set(meets.values()) == {16} and len(meets) == n
    again = c.get(url, params={"version": version}, headers=AUTH).json()
    assert again["pairs"] == first.json()["pairs"]  # the same sample every time
    r = c.get(url, params={"page_size": 5000}, headers=AUTH)
    assert_problem(r, 422, "validation-error")
    assert_problem(c.get(url, params={"page_token": "x"}, headers=AUTH), 422, "validation-error")


def test_a_small_prompt_group_still_meets_every_pair(env: dict[str, Any]) -> None:
    version = _one_prompt_version(env, 17)  # 2 * PAIRS_PER_VIDEO + 1: the largest full group
    page = env["c"].get("/v1/datasets/many/rating-session", params={"version": version}, headers=AUTH).json()
    assert len(page["pairs"]) == 17 * 16 // 2 and page["next_page_token"] is None


# --------------------------------------------------------------------------- presigned URLs at commit
def test_a_presigned_put_after_commit_does_not_write_into_the_version(env: dict[str, Any]) -> None:
    c, store = env["c"], env["store"]
    c.post("/v1/datasets", json={"name": "pre"}, headers=AUTH)
    up = c.post("/v1/datasets/pre/uploads", headers=AUTH).json()
    manifest = json.dumps({"id": "a", "file": "a.mp4", "prompt": "p"}) + "\n"
    urls = c.post(
        f"/v1/datasets/pre/uploads/{up['id']}/presign",
        json={"files": ["manifest.jsonl", "a.mp4"]},
        headers=AUTH,
    ).json()["urls"]
    assert c.put(urls["manifest.jsonl"], content=manifest.encode()).status_code == 200
    assert c.put(urls["a.mp4"], content=b"the video").status_code == 200
    v = c.post(f"/v1/datasets/pre/uploads/{up['id']}/commit", json={}, headers=AUTH)
    assert v.status_code == 201, v.text
    key = store.get_json(f"datasets/pre/{v.json()['id']}/manifest.json")["files"]["data/a.mp4"]["key"]
    assert key == f"datasets/pre/uploads/{up['id']}/files/a.mp4"  # no presigned URL names this key
    # the URL is dead: the local store's presign route refuses it, and the version's bytes stay
    r = c.put(urls["a.mp4"], content=b"other bytes")
    assert_problem(r, 403, "forbidden", "committed")
    assert store.get_bytes(key) == b"the video"
    assert store.list(f"datasets/pre/uploads/{up['id']}/presigned/") == []


# ---------------------------------------------------------------------------------- non-UTF-8 text
def test_a_non_utf8_manifest_with_include_ratings_is_a_4xx_naming_the_file(env: dict[str, Any]) -> None:
    c = env["c"]
    c.post("/v1/datasets", json={"name": "u"}, headers=AUTH)
    good = json.dumps({"id": "a", "file": "a.mp4", "prompt": "p"}) + "\n"
    r = c.post(
        "/v1/datasets/u/versions",
        files=[("files", ("manifest.jsonl", good.encode())), ("files", ("a.mp4", b"x"))],
        headers=AUTH,
    )
    assert r.status_code == 201, r.text
    rating = {"type": "rating", "video_id": "a", "rater_id": "z", "score": 3}
    assert c.post("/v1/datasets/u/ratings", json={"records": [rating]}, headers=AUTH).status_code == 201
    bad = b'{"id": "a", "file": "a.mp4", "prompt": "caf\xe9"}\n'  # Latin-1, not UTF-8
    files = [("files", ("manifest.jsonl", bad)), ("files", ("a.mp4", b"x"))]
    r = c.post("/v1/datasets/u/versions", params={"include_ratings": "true"}, files=files, headers=AUTH)
    body = assert_problem(r, 422, "validation-error", "manifest.jsonl", "not UTF-8")
    assert body["field"] == "files"
    up = c.post("/v1/datasets/u/uploads", headers=AUTH).json()
    c.post(f"/v1/datasets/u/uploads/{up['id']}/files", files=files, headers=AUTH)
    r = c.post(f"/v1/datasets/u/uploads/{up['id']}/commit", json={"include_ratings": True}, headers=AUTH)
    assert_problem(r, 422, "validation-error", "manifest.jsonl", "not UTF-8")
