"""Human win rates of A/B rounds (``GET /v1/checkpoints/{id}/preference`` and the round view the
rating page shows): counts, Wilson intervals and the Bradley-Terry ranking checked against direct
computations written here, and no summary while a round is in progress."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from tests.abrounds import PROMPTS, judge, publish_checkpoints, upload, write_round
from tests.doubles import IdleExecutor

CKPTS = ["ckpt-x-10", "ckpt-x-20", "ckpt-x-30"]


@pytest.fixture
def env(tmp_path: Path) -> tuple[TestClient, LocalStore, Path]:
    store = LocalStore(tmp_path / "store")
    publish_checkpoints(store, tmp_path / "ckpts", CKPTS)
    settings = ControlPlaneSettings(dev_mode=True, host="127.0.0.1", work_dir=tmp_path / "w")
    return TestClient(create_app(settings, store, IdleExecutor(), background=False)), store, tmp_path


def wilson_direct(wins: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson interval as the roots in p of (p_hat - p)^2 = z^2 p (1 - p) / n."""
    ph = wins / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    lo, hi = sorted(np.roots([a, b, c]).real)
    return float(lo), float(hi)


def bt_direct(names: list[str], wins: dict[tuple[str, str], float]) -> dict[str, float]:
    """Bradley-Terry by gradient ascent on log-strengths (not MM), with the same prior: one virtual
    tie per compared pair. ``wins[(i, j)]``: i's wins over j, ties counted half."""
    k = len(names)
    w = np.zeros((k, k))
    for (i, j), v in wins.items():
        w[names.index(i), names.index(j)] += v
    compared = (w + w.T) > 0
    w = w + 0.5 * compared
    theta = np.zeros(k)
    for _ in range(20000):
        p = 1 / (1 + np.exp(theta[None, :] - theta[:, None]))  # p[i, j] = P(i beats j)
        grad = (w - (w + w.T) * p).sum(axis=1)
        theta += 0.05 * grad
        theta -= theta.mean()
    s = np.exp(theta)
    return {n: float(s[i] / s.sum()) for i, n in enumerate(names)}


def round_view(c: TestClient, version: str, **params: Any) -> dict[str, Any]:
    r = c.get(f"/v1/datasets/r/versions/{version}/preference", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_three_checkpoint_round_counts_intervals_and_ranking(
    env: tuple[TestClient, LocalStore, Path],
) -> None:
    c, _, tmp = env
    version = upload(c, {}, "r", write_round(tmp / "ds", CKPTS))
    # Per prompt every two of a, b, c meet once (3 pairs x 2 prompts); two raters judge all six.
    # a beats b and c always; b beats c for ann; bob calls b-c a tie on prompt 0 and c wins on prompt 1.
    for rater in ("ann", "bob"):
        for p in range(2):
            for x, y in itertools.combinations(CKPTS, 2):
                a, b = f"{x}-p{p}-s0", f"{y}-p{p}-s0"
                winner: str | None = a
                if (x, y) == ("ckpt-x-20", "ckpt-x-30") and rater == "bob":
                    winner = None if p == 0 else b
                judge(c, "r", version, rater, a, b, winner)
    view = round_view(c, version)
    assert view["complete"] and view["checkpoints"] == CKPTS and view["pairs"] == 6
    assert view["raters"] == ["ann", "bob"] and view["progress"] == {"done": 12, "total": 12}
    comps = {(t["checkpoint"], t["opponent"]): t for t in view["summary"]["comparisons"]}
    expected = {
        ("ckpt-x-10", "ckpt-x-20"): (4, 0, 0),
        ("ckpt-x-10", "ckpt-x-30"): (4, 0, 0),
        ("ckpt-x-20", "ckpt-x-30"): (2, 1, 1),
    }
    for key, (w, t, lo) in expected.items():
        got = comps[key]
        assert (got["wins"], got["ties"], got["losses"], got["n"]) == (w, t, lo, 4)
        rate = (w + t / 2) / 4
        assert got["win_rate"] == pytest.approx(rate)
        low, high = wilson_direct(w + t / 2, 4)
        assert got["wilson_low"] == pytest.approx(low, abs=1e-9)
        assert got["wilson_high"] == pytest.approx(high, abs=1e-9)
    per_prompt = {
        (t["prompt"], t["opponent"]): t
        for t in view["summary"]["per_prompt"]
        if t["checkpoint"] == "ckpt-x-20"
    }
    assert (per_prompt[(PROMPTS[0], "ckpt-x-30")]["wins"], per_prompt[(PROMPTS[0], "ckpt-x-30")]["ties"]) == (
        1,
        1,
    )
    assert (
        per_prompt[(PROMPTS[1], "ckpt-x-30")]["wins"],
        per_prompt[(PROMPTS[1], "ckpt-x-30")]["losses"],
    ) == (
        1,
        1,
    )

    ranking = view["summary"]["ranking"]
    assert [r["checkpoint"] for r in ranking] == ["ckpt-x-10", "ckpt-x-20", "ckpt-x-30"]
    direct = bt_direct(
        CKPTS,
        {
            ("ckpt-x-10", "ckpt-x-20"): 4,
            ("ckpt-x-10", "ckpt-x-30"): 4,
            ("ckpt-x-20", "ckpt-x-30"): 2.5,
            ("ckpt-x-30", "ckpt-x-20"): 1.5,
        },
    )
    for r in ranking:
        assert r["strength"] == pytest.approx(direct[r["checkpoint"]], abs=1e-6)
    assert sum(r["strength"] for r in ranking) == pytest.approx(1.0)

    # The same round from ckpt-x-30's side: its losses are the others' wins.
    r = c.get("/v1/checkpoints/ckpt-x-30/preference")
    assert r.status_code == 200, r.text
    me = r.json()
    (rnd,) = me["rounds"]
    res = rnd["results"]
    assert (res["overall"]["wins"], res["overall"]["ties"], res["overall"]["losses"]) == (1, 1, 6)
    assert res["overall"]["win_rate"] == pytest.approx(1.5 / 8)
    assert res["overall"]["wilson_high"] == pytest.approx(wilson_direct(1.5, 8)[1], abs=1e-9)
    assert [o["opponent"] for o in res["opponents"]] == ["ckpt-x-10", "ckpt-x-20"]
    assert res["ranking"] == ranking


def test_a_round_in_progress_shows_no_summary(env: tuple[TestClient, LocalStore, Path]) -> None:
    c, _, tmp = env
    version = upload(c, {}, "r", write_round(tmp / "ds", CKPTS[:2], samples=2))
    pairs = [(f"ckpt-x-10-p{p}-s{k}", f"ckpt-x-20-p{p}-s{k}") for p in range(2) for k in range(2)]
    for a, b in pairs:
        judge(c, "r", version, "ann", a, b, a)
    judge(c, "r", version, "bob", *pairs[0], pairs[0][1])  # bob has started, and judges on
    view = round_view(c, version)
    assert (view["complete"], view["summary"], view["progress"]) == (False, None, {"done": 5, "total": 8})
    (rnd,) = c.get("/v1/checkpoints/ckpt-x-10/preference").json()["rounds"]
    assert rnd["complete"] is False and rnd["results"] is None
    # ann alone has judged everything, but the round asks for two raters per pair: still no summary.
    for a, b in pairs[1:]:
        judge(c, "r", version, "bob", a, b, None)
    view = round_view(c, version)
    assert view["complete"] and view["summary"]["ranking"] is None  # two checkpoints: no ranking
    (comp,) = view["summary"]["comparisons"]
    assert (comp["wins"], comp["ties"], comp["losses"]) == (4, 3, 1)
    assert round_view(c, version, min_raters=3)["summary"] is None
    rnd = c.get("/v1/checkpoints/ckpt-x-10/preference").json()["rounds"][0]
    assert rnd["results"]["overall"]["win_rate"] == pytest.approx(5.5 / 8)
    low = rnd["results"]["overall"]["wilson_low"]
    assert low == pytest.approx(wilson_direct(5.5, 8)[0], abs=1e-9) and not math.isnan(low)


def test_unknown_checkpoint_and_a_version_that_is_no_round_are_404(
    env: tuple[TestClient, LocalStore, Path],
) -> None:
    c, _, tmp = env
    r = c.get("/v1/checkpoints/ckpt-nope-1/preference")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    assert c.get("/v1/checkpoints/ckpt-x-10/preference").json() == {
        "checkpoint": "ckpt-x-10",
        "ties": "half",
        "rounds": [],
    }
    version = upload(c, {}, "r", write_round(tmp / "ds", ["ckpt-x-10"]))
    r = c.get(f"/v1/datasets/r/versions/{version}/preference")
    assert r.status_code == 404 and "not an A/B round" in r.json()["detail"]
