"""The rollout gate: a canary with a policy is promoted when its evaluation, its error ratio (from the
replicas' heartbeats) and the human A/B rounds say so, rolled back when one of them fails, and each
decision is recorded on the rollout with its reasons and counted in the control plane's metrics."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.publish import RolloutRecord
from services.common.settings import ControlPlaneSettings, InferenceSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.inference.heartbeat import Heartbeat
from services.inference.manager import ModelManager
from services.inference.metrics import InferenceMetrics
from tests.abrounds import judge, publish_checkpoints, upload, write_round
from tests.doubles import IdleExecutor

STABLE, CANARY = "ckpt-x-10", "ckpt-x-20"
POLICY = {"min_heldout_accuracy": 0.6, "min_requests": 50, "max_error_ratio_margin": 0.02}


class Replica:
    """What an inference replica's heartbeat reports: the revision it serves and its traffic."""

    def __init__(self, store: LocalStore, name: str) -> None:
        self.ready = True
        self.view: dict[str, Any] = {}
        self.heartbeat = Heartbeat(
            InferenceSettings(replica_id=name, poll_seconds=60, deployment="web"), store, self
        )

    def rollout_view(self) -> dict[str, Any]:
        return self.view

    def serve(self, rollout: dict[str, Any], canary: tuple[int, int], stable: tuple[int, int]) -> None:
        traffic = [
            {"role": "current", "checkpoint": rollout["current"], "requests": stable[0], "errors": stable[1]},
            {"role": "canary", "checkpoint": rollout["canary"], "requests": canary[0], "errors": canary[1]},
        ]
        self.view = {
            **{k: rollout[k] for k in ("revision", "current", "canary", "canary_percent")},
            "traffic": traffic,
        }
        self.heartbeat.beat()


def make_client(tmp_path: Path, store: LocalStore, **settings: Any) -> TestClient:
    cfg = ControlPlaneSettings(dev_mode=True, host="127.0.0.1", work_dir=tmp_path / "w", **settings)
    return TestClient(create_app(cfg, store, IdleExecutor(), background=settings.pop("background", False)))


@pytest.fixture
def env(tmp_path: Path) -> tuple[TestClient, LocalStore, Path]:
    store = LocalStore(tmp_path / "store")
    publish_checkpoints(store, tmp_path / "ckpts", [STABLE, CANARY])
    return make_client(tmp_path, store), store, tmp_path


def start_canary(c: TestClient, policy: dict[str, Any] = POLICY) -> dict[str, Any]:
    assert c.put("/v1/rollouts/web?create=true", json={"checkpoint": STABLE}).status_code == 200
    r = c.post("/v1/rollouts/web/canary", json={"checkpoint": CANARY, "percent": 10, "policy": policy})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert out["policy"]["min_requests"] == 50 and out["canary_percent"] == 10
    return out


def write_evaluation(store: LocalStore, eid: str, acc: float | None, collapse: bool | None) -> None:
    store.put_json(
        f"evaluations/{eid}.json",
        {
            "id": eid,
            "checkpoint_id": CANARY,
            "baseline": STABLE,
            "created_at": datetime.now(UTC).isoformat(),
            "state": "succeeded",
            "heldout_implicit_acc": acc,
            "heldout_reward_margin": 0.1,
            "motion_collapse": collapse,
            "results": {},
        },
    )


def evaluate(c: TestClient) -> dict[str, Any]:
    r = c.post("/v1/rollouts/web/evaluate")
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def metric(c: TestClient, name: str, **labels: str) -> float:
    text = c.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_canary_with_injected_errors_is_rolled_back_with_its_reasons(
    env: tuple[TestClient, LocalStore, Path],
) -> None:
    c, store, _ = env
    rollout = start_canary(c)
    write_evaluation(store, "ev-1", acc=0.8, collapse=False)  # a good evaluation: errors alone decide
    a, b = Replica(store, "inference-a"), Replica(store, "inference-b")
    a.serve(rollout, canary=(30, 9), stable=(270, 1))
    b.serve(rollout, canary=(30, 6), stable=(270, 2))
    out = evaluate(c)
    assert (out["decision"], out["applied"], out["revision"]) == ("rollback", True, rollout["revision"])
    (reason,) = out["reasons"]
    assert reason.startswith("exceeds: canary error ratio 0.2500 (15/60) vs stable 0.0056 (3/540)")
    after = out["rollout"]
    assert (after["current"], after["canary"], after["policy"]) == (STABLE, None, None)
    last = c.get("/v1/rollouts/web/history").json()[-1]
    assert (last["action"], last["decision"], last["actor"], last["reasons"]) == (
        "rollback",
        "rollback",
        "rollout-gate",
        out["reasons"],
    )
    assert metric(c, "huvidpo_controlplane_rollout_automatic_rollbacks_total", deployment="web") == 1
    assert metric(c, "huvidpo_controlplane_rollout_gate_decisions_total", decision="rollback") == 1
    assert c.post("/v1/rollouts/web/evaluate").status_code == 409  # no canary left to judge


def test_a_good_canary_waits_for_enough_requests_then_is_promoted(
    env: tuple[TestClient, LocalStore, Path],
) -> None:
    c, store, _ = env
    rollout = start_canary(c)
    replica = Replica(store, "inference-a")
    out = evaluate(c)
    assert out["decision"] == "wait"
    assert out["reasons"] == [
        f"no succeeded evaluation of {CANARY} yet",
        "canary served 0 of the 50 requests needed",
    ]
    write_evaluation(store, "ev-1", acc=0.8, collapse=False)
    replica.serve(rollout, canary=(20, 0), stable=(180, 0))
    for _ in range(2):  # the same wait twice is recorded once, on the same revision
        out = evaluate(c)
        assert (out["decision"], out["reasons"]) == ("wait", ["canary served 20 of the 50 requests needed"])
    history = c.get("/v1/rollouts/web/history").json()
    waits = [h for h in history if h["decision"] == "wait"]
    assert len(waits) == 2 and {h["revision"] for h in waits} == {rollout["revision"]}
    assert c.get("/v1/rollouts/web").json()["revision"] == rollout["revision"]  # nothing served changed

    replica.serve(rollout, canary=(60, 1), stable=(540, 0))
    out = evaluate(c)
    assert (out["decision"], out["applied"]) == ("promote", True)
    assert out["reasons"] == [
        "held-out implicit accuracy 0.800 >= 0.6 (evaluation ev-1)",
        "no motion collapse (evaluation ev-1)",
        "within: canary error ratio 0.0167 (1/60) vs stable 0.0000 (0/540) + margin 0.02",
        f"no human A/B round compares {CANARY} and {STABLE}: not required",
    ]
    after = c.get("/v1/rollouts/web").json()
    assert (after["current"], after["canary"], after["revision"]) == (CANARY, None, rollout["revision"] + 1)
    assert after["history"][-1]["decision"] == "promote" and after["history"][-1]["reasons"] == out["reasons"]
    assert metric(c, "huvidpo_controlplane_rollout_gate_decisions_total", decision="wait") == 3
    assert metric(c, "huvidpo_controlplane_rollout_gate_decisions_total", decision="promote") == 1
    assert metric(c, "huvidpo_controlplane_rollout_automatic_rollbacks_total", deployment="web") == 0


@pytest.mark.parametrize(
    ("acc", "collapse", "reason"),
    [
        (0.55, False, "held-out implicit accuracy 0.550 < 0.6 (evaluation ev-1)"),
        (0.9, True, "motion collapse flagged by evaluation ev-1"),
    ],
)
def test_a_failing_evaluation_rolls_the_canary_back(
    env: tuple[TestClient, LocalStore, Path], acc: float, collapse: bool, reason: str
) -> None:
    c, store, _ = env
    start_canary(c)
    write_evaluation(store, "ev-1", acc=acc, collapse=collapse)
    out = evaluate(c)  # no requests yet: a failed evaluation is enough
    assert (out["decision"], out["reasons"]) == ("rollback", [reason])


def test_human_rounds_hold_the_canary_while_judged_and_roll_it_back_when_it_loses(
    env: tuple[TestClient, LocalStore, Path],
) -> None:
    c, store, tmp = env
    rollout = start_canary(c, {**POLICY, "min_heldout_accuracy": None, "require_no_motion_collapse": False})
    Replica(store, "inference-a").serve(rollout, canary=(100, 0), stable=(900, 0))
    version = upload(c, {}, "round", write_round(tmp / "ds", [STABLE, CANARY], samples=3))
    pairs = [(f"{CANARY}-p{p}-s{k}", f"{STABLE}-p{p}-s{k}") for p in range(2) for k in range(3)]
    for canary, stable in pairs[:3]:  # people prefer the stable checkpoint's clips
        judge(c, "round", version, "ann", canary, stable, stable)
    out = evaluate(c)
    assert out["decision"] == "wait" and "still being judged: round@" in out["reasons"][0]
    for canary, stable in pairs[3:]:
        judge(c, "round", version, "ann", canary, stable, canary if canary.endswith("p1-s0") else None)
    out = evaluate(c)
    assert out["decision"] == "rollback"
    assert out["reasons"] == [
        f"human win rate 0.333 vs {STABLE} (1 wins, 2 ties, 3 losses), Wilson 95% lower bound 0.097 <= 0.5"
    ]


def test_the_background_loop_promotes_without_being_asked(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    publish_checkpoints(store, tmp_path / "ckpts", [STABLE, CANARY])
    cfg = ControlPlaneSettings(
        dev_mode=True, host="127.0.0.1", work_dir=tmp_path / "w", rollout_gate_seconds=0.1
    )
    with TestClient(create_app(cfg, store, IdleExecutor(), background=True)) as c:
        rollout = start_canary(c, {**POLICY, "max_wait_seconds": 3600})
        write_evaluation(store, "ev-1", acc=0.7, collapse=False)
        Replica(store, "inference-a").serve(rollout, canary=(50, 0), stable=(450, 0))
        deadline = time.monotonic() + 20
        while c.get("/v1/rollouts/web").json()["current"] != CANARY:
            assert time.monotonic() < deadline, c.get("/v1/rollouts/web/history").json()
            time.sleep(0.1)
        assert c.get("/v1/rollouts/web").json()["history"][-1]["actor"] == "rollout-gate"


def test_evaluate_needs_a_canary_with_a_policy_and_bad_policies_are_refused(
    env: tuple[TestClient, LocalStore, Path],
) -> None:
    c, _, _ = env
    assert c.post("/v1/rollouts/nope/evaluate").status_code == 404
    assert c.put("/v1/rollouts/web?create=true", json={"checkpoint": STABLE}).status_code == 200
    assert c.post("/v1/rollouts/web/canary", json={"checkpoint": CANARY, "percent": 10}).status_code == 200
    r = c.post("/v1/rollouts/web/evaluate")
    assert r.status_code == 409 and "no canary with a policy" in r.json()["detail"]
    r = c.post(
        "/v1/rollouts/web/canary", json={"checkpoint": CANARY, "percent": 10, "policy": {"min_request": 5}}
    )
    assert r.status_code == 422 and "min_request" in r.text


def test_replica_heartbeat_counts_requests_and_server_errors_per_role_since_the_revision(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path / "store")
    settings = InferenceSettings(replica_id="inference-a", cache_dir=str(tmp_path / "cache"))
    manager = ModelManager(settings, store, InferenceMetrics())
    manager.apply_rollout(RolloutRecord(deployment="default").next("set_current", current="base"))
    for code in ("OK", "OK", "INVALID_ARGUMENT", "CANCELLED", "INTERNAL", "UNAVAILABLE"):
        manager.count_outcome("base", code)
    beat = manager.heartbeat.record()
    assert [t.model_dump() for t in beat.traffic] == [
        {"role": "current", "checkpoint": "base", "requests": 6, "errors": 2}
    ]
    nxt = RolloutRecord(deployment="default", revision=1).next("set_current", current="base")
    manager.apply_rollout(nxt)  # a new revision counts afresh
    assert manager.heartbeat.record().traffic[0].requests == 0


def test_a_failed_generate_call_is_counted_in_the_heartbeat(tmp_path: Path) -> None:
    import asyncio

    from services.inference.servicer import VideoGenerationServicer

    store = LocalStore(tmp_path / "store")
    settings = InferenceSettings(replica_id="inference-a", cache_dir=str(tmp_path / "cache"))
    manager = ModelManager(settings, store, InferenceMetrics())
    manager.apply_rollout(RolloutRecord(deployment="default").next("set_current", current="base"))
    servicer = VideoGenerationServicer.__new__(VideoGenerationServicer)
    servicer.metrics, servicer.manager = manager.metrics, manager

    async def failing(request: Any, context: Any, served: list[str]) -> Any:
        served.append("base")  # admitted to the current model, then the model fails
        raise RuntimeError("boom")
        yield  # pragma: no cover - makes this an async generator

    class Context:
        async def abort(self, code: Any, details: str) -> None:
            raise RuntimeError(details)

    servicer._generate = failing  # type: ignore[method-assign]

    async def call() -> None:
        async for _ in servicer.Generate(None, Context()):  # type: ignore[arg-type]
            pass

    with pytest.raises(RuntimeError):
        asyncio.run(call())
    (t,) = manager.heartbeat.record().traffic
    assert (t.role, t.checkpoint, t.requests, t.errors) == ("current", "base", 1, 1)
