"""Routing of the inference service as pure functions (no server, no model, no store), and the
rollout follower driving a stand-in for ModelManager."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.publish import RolloutRecord, write_rollout
from services.common.store import LocalStore, StoreUnavailable
from services.inference.errors import UnknownCheckpoint
from services.inference.follow import RolloutFollower
from services.inference.routing import BASE_ID, RoutingTable, roles_after, route

ROOT = Path(__file__).resolve().parents[2]
LOADED = {BASE_ID, "ckpt-a", "ckpt-b", "ckpt-pinned"}


def _draws(seed: int, n: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.random() for _ in range(n)]


@pytest.mark.parametrize(("percent", "seed"), [(1, 11), (10, 1), (25, 7), (50, 3), (90, 4), (99, 5)])
def test_canary_split_follows_the_percent_over_many_seeded_draws(percent: int, seed: int) -> None:
    table = RoutingTable("ckpt-a", "ckpt-b", percent)
    n = 5000
    served = [route(table, LOADED, "", d) for d in _draws(seed, n)]
    assert set(served) <= {"ckpt-a", "ckpt-b"}
    hits = served.count("ckpt-b")
    expected = n * percent / 100
    sd = (n * percent / 100 * (1 - percent / 100)) ** 0.5
    assert abs(hits - expected) <= 4 * sd, (hits, expected)


def test_the_same_draws_route_the_same_way() -> None:
    table = RoutingTable("ckpt-a", "ckpt-b", 30)
    draws = _draws(1234, 200)
    assert [route(table, LOADED, "", d) for d in draws] == [route(table, LOADED, "", d) for d in draws]


def test_the_draw_boundary_is_the_percent() -> None:
    table = RoutingTable("ckpt-a", "ckpt-b", 30)
    assert route(table, LOADED, "", 0.0) == "ckpt-b"
    assert route(table, LOADED, "", 0.2999) == "ckpt-b"
    assert route(table, LOADED, "", 0.30) == "ckpt-a"
    assert route(table, LOADED, "", 0.9999) == "ckpt-a"


@pytest.mark.parametrize("table", [RoutingTable("ckpt-a"), RoutingTable("ckpt-a", "ckpt-b", 50)])
def test_an_explicit_checkpoint_wins_over_current_and_canary(table: RoutingTable) -> None:
    for d in _draws(0, 100):
        assert route(table, LOADED, "ckpt-pinned", d) == "ckpt-pinned"
    assert route(table, LOADED, BASE_ID, 0.0) == BASE_ID


@pytest.mark.parametrize("current", [BASE_ID, None])
def test_base_serves_when_current_is_base_or_null(current: str | None) -> None:
    table = RoutingTable(current)
    assert {route(table, LOADED, "", d) for d in _draws(0, 100)} == {BASE_ID}


@pytest.mark.parametrize("current", [None, BASE_ID])
def test_a_record_without_current_wants_the_base_model(current: str | None) -> None:
    record = RolloutRecord(deployment="default", revision=1, current=current)
    assert RoutingTable.wanted(record) == RoutingTable(BASE_ID, None, 0)
    assert route(RoutingTable.wanted(record), LOADED, "", 0.5) == BASE_ID


def test_canary_at_zero_percent_never_serves() -> None:
    record = RolloutRecord(
        deployment="default", revision=2, current="ckpt-a", canary="ckpt-b", canary_percent=0
    )
    table = RoutingTable.wanted(record)
    assert table == RoutingTable("ckpt-a", None, 0)
    assert not table.splits
    assert {route(table, LOADED, "", d) for d in _draws(1, 500)} == {"ckpt-a"}
    # even a table that names the canary at 0% routes nothing to it
    assert {route(RoutingTable("ckpt-a", "ckpt-b", 0), LOADED, "", d) for d in _draws(1, 500)} == {"ckpt-a"}


def test_canary_at_hundred_percent_serves_every_unpinned_request() -> None:
    record = RolloutRecord(
        deployment="default", revision=3, current="ckpt-a", canary="ckpt-b", canary_percent=100
    )
    table = RoutingTable.wanted(record)
    assert table.splits
    assert {route(table, LOADED, "", d) for d in _draws(2, 500)} == {"ckpt-b"}
    assert route(table, LOADED, "ckpt-a", 0.0) == "ckpt-a"


def test_an_unknown_explicit_checkpoint_is_refused_with_unknown_checkpoint() -> None:
    # UnknownCheckpoint is what the servicer maps to NOT_FOUND; its message goes to the client as is.
    with pytest.raises(UnknownCheckpoint) as info:
        route(RoutingTable("ckpt-a", "ckpt-b", 50), LOADED, "ckpt-missing", 0.1)
    assert str(info.value) == (
        "checkpoint 'ckpt-missing' is not loaded; loaded: ['base', 'ckpt-a', 'ckpt-b', 'ckpt-pinned'] "
        "(leave checkpoint_id empty for the current rollout)"
    )
    assert isinstance(info.value, LookupError)


def test_a_replaced_checkpoint_retires_unless_pinned() -> None:
    roles = {
        BASE_ID: "base",
        "ckpt-a": "current",
        "ckpt-b": "canary",
        "ckpt-pinned": "pinned",
        "ckpt-c": "pinned",
    }
    before = RoutingTable("ckpt-a", "ckpt-b", 20)
    after = RoutingTable("ckpt-c", None, 0)
    assert roles_after(roles, before, after, pinned=["ckpt-b", "ckpt-c", "ckpt-pinned"]) == {
        BASE_ID: "base",
        "ckpt-a": "retiring",
        "ckpt-b": "pinned",
        "ckpt-pinned": "pinned",
        "ckpt-c": "current",
    }


def test_a_refused_rollout_keeps_the_roles() -> None:
    # apply_rollout keeps the previous current when the wanted one is refused: nothing changes role
    roles = {BASE_ID: "base", "ckpt-a": "current"}
    table = RoutingTable("ckpt-a")
    assert roles_after(roles, table, table, pinned=[]) == roles


def test_routing_needs_neither_torch_nor_a_server() -> None:
    code = (
        "import json, sys\n"
        "import services.inference.routing, services.inference.fetch, services.inference.follow\n"
        "print(json.dumps(sorted(n for n in ('torch', 'diffusers', 'grpc', 'fastapi') if n in sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


class _Target:
    """A stand-in for ModelManager: records what the follower asks of it."""

    def __init__(self, fail_once: bool = False) -> None:
        self.calls: list[str] = []
        self.ready = False
        self.base_loaded = False
        self.fail_once = fail_once

    def load_base(self) -> None:
        self.calls.append("load_base")
        self.base_loaded = True

    def load_pinned(self) -> None:
        self.calls.append("load_pinned")

    def apply_rollout(self, record: RolloutRecord) -> None:
        if self.fail_once:
            self.fail_once = False
            raise StoreUnavailable("store down")
        self.calls.append(f"apply {record.revision}")

    def retire_idle(self) -> None:
        self.calls.append("retire_idle")

    def set_ready(self, ready: bool) -> None:
        self.calls.append(f"ready {ready}")
        self.ready = ready


def test_the_follower_applies_each_revision_once_and_retries_a_failed_one(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    target = _Target(fail_once=True)
    follower = RolloutFollower(target, store, "default", poll_seconds=0.01)
    record = write_rollout(store, RolloutRecord(deployment="default", revision=1, current="ckpt-a"))

    with pytest.raises(StoreUnavailable):
        follower.poll_once()  # base loaded, then the store fails: not ready, revision not applied
    assert target.calls == ["load_base", "load_pinned"]
    assert follower.applied_revision is None

    follower.poll_once()
    follower.poll_once()
    assert target.calls[2:] == ["apply 1", "ready True", "retire_idle", "retire_idle"]

    write_rollout(store, record.next("promote", current="ckpt-b"))
    follower.poll_once()
    assert target.calls[-2:] == ["apply 2", "retire_idle"]
    assert follower.applied_revision == 2
