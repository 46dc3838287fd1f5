"""Ratings of the rating page over a LocalStore (no server, no browser): upserts, ties vs choices,
sessions and resume, A/B pairing (on-policy sets included), compiling with lineage, the video route
and the page's static files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.domain.ratings import (
    Judgment,
    VideoInfo,
    ab_pairs,
    pair_id,
    resolve,
    resume_index,
    score_id,
)

TOKEN = "t0ken"
READ = "read-0nly"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Each rater signs in with a `rate` token named after them: the rater id is the token's name.
RATERS = ["ann", "bob", "cy", "x", "zed", "other", "twin", *(f"r{i}" for i in range(8))]


def rater_auth(rater: str) -> dict[str, str]:
    return {"Authorization": f"Bearer rate-{rater}"}


class NoExecutor:
    kind = "none"

    def submit(self, spec: Any) -> dict[str, str]:
        raise AssertionError("no fine-tune here")

    def status(self, finetune_id: str) -> Any:
        raise AssertionError("no fine-tune here")

    def cancel(self, finetune_id: str) -> None:
        pass

    def logs(self, finetune_id: str, follow: bool = False) -> Iterator[bytes]:
        return iter([])

    def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from huvidpo.data import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("ds") / "d", n_prompts=2, videos_per_prompt=3, num_frames=4, size=32
    )


@pytest.fixture
def env(tmp_path: Path, dataset_dir: Path) -> dict[str, Any]:
    store = LocalStore(tmp_path / "store")
    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(TOKEN.encode()).hexdigest()],
        read_tokens=[hashlib.sha256(READ.encode()).hexdigest()],
        work_dir=tmp_path / "work",
    )
    rate_entries = [f"{r}:rate:{hashlib.sha256(f'rate-{r}'.encode()).hexdigest()}" for r in RATERS]
    settings.tokens.append(";".join(rate_entries))
    client = TestClient(create_app(settings, store, NoExecutor(), background=False))
    assert client.post("/v1/datasets", json={"name": "d"}, headers=AUTH).status_code == 201
    files = [
        ("files", (p.relative_to(dataset_dir).as_posix(), p.read_bytes()))
        for p in sorted(dataset_dir.rglob("*"))
        if p.is_file()
    ]
    r = client.post("/v1/datasets/d/versions", files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    return {"c": client, "v": r.json()["id"], "store": store}


def score(env: dict[str, Any], rater: str, video: str, value: float) -> Any:
    body = {"version": env["v"], "rater_id": rater, "video_id": video, "score": value}
    return env["c"].put("/v1/datasets/d/ratings/score", json=body, headers=rater_auth(rater))


def choice(env: dict[str, Any], rater: str, left: str, right: str, winner: str) -> Any:
    body = {"version": env["v"], "rater_id": rater, "left": left, "right": right, "winner": winner}
    return env["c"].put("/v1/datasets/d/ratings/choice", json=body, headers=rater_auth(rater))


def session(env: dict[str, Any], rater: str) -> dict[str, Any]:
    r = env["c"].get("/v1/datasets/d/rating-session", params={"rater_id": rater}, headers=rater_auth(rater))
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def stored(env: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = env["c"].get("/v1/datasets/d/ratings", headers=AUTH).json()["items"]
    return items


# ----------------------------------------------------------------------------------------- upserts
def test_rerating_a_video_updates_its_record(env: dict[str, Any]) -> None:
    assert score(env, "ann", "p0_v0", 7).status_code == 200
    assert score(env, "ann", "p0_v0", 2.5).status_code == 200
    assert score(env, "bob", "p0_v0", 9).status_code == 200
    records = {(i["record"]["rater_id"], i["record"]["video_id"]): i for i in stored(env)}
    assert len(stored(env)) == 2
    assert records[("ann", "p0_v0")]["record"]["score"] == 2.5
    assert records[("ann", "p0_v0")]["id"] == score_id("ann", "p0_v0")
    assert session(env, "ann")["progress"]["absolute"] == {"done": 1, "total": 6}


def test_bad_scores_and_unknown_videos_are_refused(env: dict[str, Any]) -> None:
    for value in (-1, 10.5):
        assert score(env, "ann", "p0_v0", value).status_code == 422
    r = score(env, "ann", "nope", 3)
    assert r.status_code == 422 and "nope" in r.json()["detail"]
    assert choice(env, "ann", "p0_v0", "p1_v0", "left").status_code == 422  # different prompts
    assert choice(env, "ann", "p0_v0", "p0_v0", "left").status_code == 422
    assert stored(env) == []


def test_tie_and_choice_replace_each_other(env: dict[str, Any]) -> None:
    assert choice(env, "ann", "p0_v0", "p0_v1", "left").json()["record"]["chosen"] == "p0_v0"
    assert choice(env, "ann", "p0_v1", "p0_v0", "tie").status_code == 200  # same pair, other order
    assert stored(env) == []
    [pair] = [p for p in session(env, "ann")["pairs"] if p["key"] == "p0_v0|p0_v1"]
    assert pair["choice"] == "tie"
    r = choice(env, "ann", "p0_v1", "p0_v0", "left")
    assert r.json()["id"] == pair_id("ann", "p0_v0", "p0_v1")
    [rec] = stored(env)
    assert (rec["record"]["chosen"], rec["record"]["rejected"]) == ("p0_v1", "p0_v0")
    [pair] = [p for p in session(env, "ann")["pairs"] if p["key"] == "p0_v0|p0_v1"]
    want = "left" if pair["left"]["id"] == "p0_v1" else "right"
    assert pair["choice"] == want


def test_read_only_tokens_cannot_rate_and_anonymous_get_401(env: dict[str, Any]) -> None:
    c = env["c"]
    body = {"version": env["v"], "rater_id": "x", "video_id": "p0_v0", "score": 1}
    assert c.put("/v1/datasets/d/ratings/score", json=body).status_code == 401
    ro = {"Authorization": f"Bearer {READ}"}
    assert c.put("/v1/datasets/d/ratings/score", json=body, headers=ro).status_code == 403
    # a rating session belongs to a rater: the `rate` scope, not `read`
    assert c.get("/v1/datasets/d/rating-session", headers=ro).status_code == 403
    assert c.get(f"/v1/datasets/d/versions/{env['v']}/files/videos/p0_v0.mp4").status_code == 401


def test_a_rate_token_rates_as_its_name_and_can_do_nothing_else(env: dict[str, Any]) -> None:
    c, v, ann = env["c"], env["v"], rater_auth("ann")
    assert c.get("/v1/whoami", headers=ann).json() == {"name": "ann", "scopes": ["rate"], "anonymous": False}
    # what the rating page needs works, the rater id coming from the token
    assert c.get("/v1/datasets", headers=ann).status_code == 200
    assert c.get("/v1/datasets/d/versions", headers=ann).status_code == 200
    assert c.get(f"/v1/datasets/d/versions/{v}/files/videos/p0_v0.mp4", headers=ann).status_code == 200
    body = {"version": v, "video_id": "p0_v0", "score": 4}
    r = c.put("/v1/datasets/d/ratings/score", json=body, headers=ann)
    assert r.status_code == 200 and r.json()["record"]["rater_id"] == "ann", r.text
    assert c.get("/v1/datasets/d/rating-session", headers=ann).json()["rater_id"] == "ann"
    # someone else's id is refused, not silently replaced
    r = c.put("/v1/datasets/d/ratings/score", json={**body, "rater_id": "bob"}, headers=ann)
    assert r.status_code == 403 and "'ann'" in r.json()["detail"] and "'bob'" in r.json()["detail"]
    assert c.get("/v1/datasets/d/rating-session", params={"rater_id": "bob"}, headers=ann).status_code == 403
    # nothing else: each refusal names the scope it needs
    refused = [
        ("post", "/v1/datasets", {"name": "e"}, "'data'"),
        ("post", "/v1/datasets/d/ratings/compile", {}, "'data'"),
        ("post", "/v1/datasets/d/ratings", {"records": []}, "'data'"),
        ("delete", "/v1/datasets/d", None, "'admin'"),
        ("post", "/v1/fine-tunes", {"dataset": "d", "version": v, "base_model": "tiny"}, "'train'"),
        ("put", "/v1/rollouts/default", {"checkpoint": "base"}, "'rollout'"),
        ("get", "/v1/fine-tunes", None, "'read'"),
        ("get", "/v1/datasets/d/ratings", None, "'read'"),
        ("get", "/v1/checkpoints", None, "'read'"),
    ]
    for method, path, payload, scope in refused:
        kw: dict[str, Any] = {"headers": ann} if payload is None else {"headers": ann, "json": payload}
        r = c.request(method.upper(), path, **kw)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert scope in r.json()["detail"] and "token 'ann'" in r.json()["detail"], r.json()


# ----------------------------------------------------------------------------------------- session
def test_session_resumes_after_the_last_judged_item(env: dict[str, Any]) -> None:
    s = session(env, "ann")
    assert s["resume"] == {"absolute": 0, "ab": 0}
    assert len(s["pairs"]) == 6  # 3 videos per prompt: 3 pairs each
    for vid in ("p0_v0", "p0_v1", "p1_v1"):
        score(env, "ann", vid, 5)
    s = session(env, "ann")
    ids = [v["id"] for v in s["videos"]]
    assert s["resume"]["absolute"] == ids.index("p1_v1") + 1
    assert s["progress"]["absolute"] == {"done": 3, "total": 6}
    assert session(env, "other")["progress"]["absolute"]["done"] == 0


def test_resume_index_wraps_round_and_stays_put_when_all_done() -> None:
    items: list[dict[str, Any]] = [{"score": 1, "time": "b"}, {"score": None}, {"score": 2, "time": "c"}]
    assert resume_index(items, "score") == 1  # after index 2 (latest), wrapping to 1
    items[1] = {"score": 3, "time": "a"}
    assert resume_index(items, "score") == 2
    assert resume_index([], "score") == 0


def test_video_route_serves_only_videos_of_the_version(env: dict[str, Any]) -> None:
    c, v = env["c"], env["v"]
    r = c.get(f"/v1/datasets/d/versions/{v}/files/videos/p0_v0.mp4", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert r.content[4:8] == b"ftyp"
    ranged = c.get(
        f"/v1/datasets/d/versions/{v}/files/videos/p0_v0.mp4", headers={**AUTH, "Range": "bytes=0-9"}
    )
    assert ranged.status_code == 206 and len(ranged.content) == 10
    for bad in ("manifest.jsonl", "videos/missing.mp4", "../../dataset.json", "videos/%2e%2e/x.mp4"):
        assert c.get(f"/v1/datasets/d/versions/{v}/files/{bad}", headers=AUTH).status_code in (404, 422), bad


# ---------------------------------------------------------------------------------------- compiling
def test_compile_makes_a_version_with_lineage_and_pairs(env: dict[str, Any]) -> None:
    c, base, store = env["c"], env["v"], env["store"]
    score(env, "ann", "p0_v0", 1)
    score(env, "ann", "p0_v0", 9)  # supersedes the 1
    score(env, "ann", "p0_v1", 4)
    choice(env, "bob", "p1_v0", "p1_v2", "right")
    choice(env, "bob", "p0_v0", "p0_v2", "tie")
    r = c.post("/v1/datasets/d/ratings/compile", json={}, headers=AUTH)
    assert r.status_code == 201, r.text
    out = r.json()
    version, lineage = out["version"], out["lineage"]
    ids = sorted(i["id"] for i in stored(env))
    assert lineage["base"] == base and lineage["records"] == ids and len(lineage["ties"]) == 1
    assert lineage["raters"] == ["ann", "bob"]
    assert version["source"]["ratings"]["sha256"] == lineage["ratings_sha256"]
    assert version["source"]["ratings"]["base"] == base

    data = Path(store.root) / "datasets" / "d" / version["id"] / "data"
    on_disk = json.loads((data / "ratings-lineage.json").read_text())
    assert on_disk == lineage
    lines = [json.loads(x) for x in (data / "manifest.jsonl").read_text().splitlines()]
    added = [x for x in lines if x.get("type") in ("rating", "choice")]
    assert [(a.get("video_id"), a.get("score")) for a in added if a["type"] == "rating"] == [
        ("p0_v0", 9.0),
        ("p0_v1", 4.0),
    ]
    # bob's choice decides p1_v0 vs p1_v2, against the synthetic scores (p1_v0 scores higher)
    assert out["pairs"]["report"]["pairs_from_choices"] == 1
    pairs = [json.loads(x) for x in store.get_bytes(_pairs_key(store, version["id"])).splitlines()]
    assert {"chosen_id": "p1_v2", "rejected_id": "p1_v0"}.items() <= next(
        p for p in pairs if p["source"] == "choices"
    ).items()

    # Compiling a compiled version again starts from its base: nothing is appended twice.
    again = c.post("/v1/datasets/d/ratings/compile", json={"base": version["id"]}, headers=AUTH).json()
    assert again["version"]["id"] == version["id"]
    # A new judgment gives a new version whose lineage says so.
    score(env, "cy", "p1_v1", 6)
    third = c.post("/v1/datasets/d/ratings/compile", json={}, headers=AUTH).json()
    assert third["version"]["id"] != version["id"] and third["lineage"]["base"] == base
    assert score_id("cy", "p1_v1") in third["lineage"]["records"]


def test_compile_resolves_records_from_the_generic_endpoint_by_time(env: dict[str, Any]) -> None:
    """Records appended through POST /ratings (content ids) count too; the latest time wins."""
    c = env["c"]
    recs = [
        {
            "type": "rating",
            "video_id": "p0_v2",
            "rater_id": "zed",
            "score": 1,
            "time": "2026-01-02T00:00:00Z",
        },
        {
            "type": "rating",
            "video_id": "p0_v2",
            "rater_id": "zed",
            "score": 8,
            "time": "2026-01-03T00:00:00Z",
        },
    ]
    assert c.post("/v1/datasets/d/ratings", json={"records": recs}, headers=AUTH).status_code == 201
    s = session(env, "zed")
    [v] = [v for v in s["videos"] if v["id"] == "p0_v2"]
    assert v["score"] == 8
    out = c.post("/v1/datasets/d/ratings/compile", json={}, headers=AUTH).json()
    assert len(out["lineage"]["records"]) == 1 and len(out["lineage"]["superseded"]) == 1


def _pairs_key(store: LocalStore, version: str) -> str:
    [key] = [o.key for o in store.list(f"datasets/d/compiled/{version}/") if o.key.endswith("pairs.jsonl")]
    return key


# -------------------------------------------------------------------------------------- pure logic
def j(kind: str, rater: str, target: str, time: str, rid: str) -> Judgment:
    return Judgment(rid, kind, rater, target, time, {})  # type: ignore[arg-type]


def test_resolve_keeps_the_latest_per_rater_and_slot() -> None:
    out = resolve(
        [
            j("score", "a", "v1", "2", "x"),
            j("score", "a", "v1", "1", "y"),
            j("score", "b", "v1", "1", "z"),
            j("choice", "a", "v1|v2", "1", "c"),
            j("tie", "a", "v1|v2", "3", "t"),
        ]
    )
    assert sorted(x.id for x in out.effective) == ["t", "x", "z"]
    assert sorted(x.id for x in out.superseded) == ["c", "y"]


def test_ab_pairs_match_checkpoints_by_first_frame_and_sample() -> None:
    vids = [
        VideoInfo(f"{ck}-{ff}-{k}", "p", "f", ck, ff, k)
        for ck in ("new", "old")
        for ff in ("f1", "f2")
        for k in range(2)
    ]
    pairs = ab_pairs(vids)
    assert len(pairs) == 4
    for a, b in pairs:
        assert {a.checkpoint, b.checkpoint} == {"new", "old"}
        assert (a.first_frame, a.sample) == (b.first_frame, b.sample)
    assert {p[0].checkpoint for p in pairs} == {"new", "old"}  # sides are shuffled, not fixed
    plain = ab_pairs([VideoInfo(f"v{i}", "p" if i < 3 else "q", "f") for i in range(5)])
    assert sorted(tuple(sorted((a.id, b.id))) for a, b in plain) == [
        ("v0", "v1"),
        ("v0", "v2"),
        ("v1", "v2"),
        ("v3", "v4"),
    ]


# ------------------------------------------------------------------------------------------- page
def test_page_and_static_files_are_served_with_a_strict_policy(env: dict[str, Any]) -> None:
    c = env["c"]
    page = c.get("/ui/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert c.get("/ui/static/app.js").headers["content-type"].startswith("text/javascript")
    assert c.get("/ui/static/style.css").status_code == 200
    assert c.get("/ui/static/..%2f__init__.py").status_code == 404
    assert c.get("/ui", follow_redirects=False).status_code == 307
    js = c.get("/ui/static/app.js").text
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML(", "document.write(", "eval("):
        assert sink not in js, sink


def test_concurrent_raters_lose_nothing(env: dict[str, Any]) -> None:
    """Eight raters scoring all six videos at once (and one rater racing with herself): one object per
    judgment, so every rater's every score is stored and a rater's race leaves one record."""
    from concurrent.futures import ThreadPoolExecutor

    from services.controlplane.domain.ratings import RatingService

    svc = RatingService(env["c"].app.state.ctx.datasets)
    videos = [f"p{p}_v{k}" for p in range(2) for k in range(3)]
    jobs = [(f"r{r}", v, float((r + i) % 11)) for r in range(8) for i, v in enumerate(videos)]
    jobs += [("twin", "p0_v0", float(s)) for s in range(10)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda a: svc.put_score("d", env["v"], *a), jobs))
    records = [i["record"] for i in stored(env)]
    assert len(records) == 8 * 6 + 1
    got = {(r["rater_id"], r["video_id"]): r["score"] for r in records}
    assert all(got[(rater, v)] == s for rater, v, s in jobs if rater != "twin")
    assert got[("twin", "p0_v0")] in {float(s) for s in range(10)}
    assert session(env, "r3")["progress"]["absolute"] == {"done": 6, "total": 6}
