"""Scoped, named bearer tokens (services/common/auth.py) and their REST edge: every route declares
its scope, refusals name it, mutating requests leave an audit line and their actor on the record,
and the services fail closed without tokens outside dev mode on loopback."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.auth import (
    DEV_TOKEN,
    AuthConfigError,
    hash_token,
    load_table,
    parse_entries,
)
from services.common.publish import publish_dir
from services.common.settings import ControlPlaneSettings, SettingsError, load_settings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.auth import ScopeCheck, api_routes

REPO = Path(__file__).resolve().parents[2]


def entry(name: str, scopes: str) -> str:
    return f"{name}:{scopes}:{hash_token('tok-' + name)}"


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer tok-{name}"}


class IdleExecutor:
    kind = "idle"

    def submit(self, spec: Any) -> dict[str, str]:
        return {"kind": "idle", "name": f"job-{spec.finetune_id}"}

    def status(self, finetune_id: str) -> Any:
        from services.controlplane.domain.ports import ExecStatus

        return ExecStatus("pending")

    def cancel(self, finetune_id: str) -> None:
        pass

    def logs(self, finetune_id: str, follow: bool = False) -> Iterator[bytes]:
        return iter([])

    def ready(self) -> bool:
        return True


@pytest.fixture
def client(tmp_path: Path, tiny_model_dir: Path) -> TestClient:
    store = LocalStore(tmp_path / "store")
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    table = ";".join(
        [
            entry("ops", "admin"),
            entry("ci", "read,data,train,rollout"),
            entry("viewer", "read"),
            entry("ann", "rate"),
        ]
    )
    settings = ControlPlaneSettings(tokens=[table], work_dir=tmp_path / "work")
    return TestClient(create_app(settings, store, IdleExecutor(), background=False))


def test_every_api_route_declares_the_scopes_it_needs(client: TestClient) -> None:
    # the API docs pages are open, as the OpenAPI is (fastapi-offline makes them APIRoutes)
    open_paths = {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc"}
    routes = list(api_routes(client.app.routes))  # type: ignore[attr-defined]
    assert len(routes) > 40
    for route in routes:
        if route.path in open_paths:
            continue
        if route.path.startswith(("/ui", "/v1/objects/")):  # the page's static files; presigned URLs
            continue
        stack, checks = [route.dependant], []
        while stack:
            d = stack.pop()
            stack += d.dependencies
            if isinstance(d.call, ScopeCheck):
                checks.append(d.call.scopes)
        assert len(checks) == 1, (route.path, route.methods, checks)
        writes = route.methods & {"POST", "PUT", "PATCH", "DELETE"}
        if writes and route.path != "/v1/whoami":
            assert "read" not in checks[0], (route.path, checks)  # a read token never writes


def test_scopes_grant_exactly_their_routes_and_403_names_the_scope(client: TestClient) -> None:
    assert client.post("/v1/datasets", json={"name": "d"}, headers=auth("ci")).status_code == 201
    r = client.post("/v1/datasets", json={"name": "e"}, headers=auth("viewer"))
    assert r.status_code == 403 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["detail"] == "this route needs the 'data' scope; token 'viewer' has ['read']"
    assert client.get("/v1/datasets/d", headers=auth("viewer")).status_code == 200
    # deletes are admin's only
    r = client.delete("/v1/datasets/d", headers=auth("ci"))
    assert r.status_code == 403 and "'admin'" in r.json()["detail"]
    assert client.get("/v1/whoami", headers=auth("ci")).json()["scopes"] == [
        "data",
        "read",
        "rollout",
        "train",
    ]
    assert client.get("/v1/whoami").status_code == 401
    r = client.get("/v1/whoami", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and "invalid_token" in r.headers["www-authenticate"]
    assert client.delete("/v1/datasets/d", headers=auth("ops")).status_code == 204


def test_mutating_requests_leave_an_audit_line_and_their_actor_on_the_record(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="huvidpo.audit")
    assert client.post("/v1/datasets", json={"name": "d"}, headers=auth("ci")).status_code == 201
    assert client.post("/v1/datasets", json={"name": "x"}, headers=auth("viewer")).status_code == 403
    assert client.post("/v1/datasets", json={"name": "y"}).status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "huvidpo.audit"]
    assert lines == [
        "audit actor=ci method=POST route=/v1/datasets path=/v1/datasets status=201",
        "audit actor=viewer method=POST route=/v1/datasets path=/v1/datasets status=403",
        "audit actor=- method=POST route=/v1/datasets path=/v1/datasets status=401",
    ]
    assert client.get("/v1/datasets", headers=auth("ci")).status_code == 200
    assert len([r for r in caplog.records if r.name == "huvidpo.audit"]) == 3  # reads are not audited

    # the actor on the record the request changed
    r = client.put("/v1/rollouts/default?create=true", json={"checkpoint": "base"}, headers=auth("ci"))
    assert r.status_code == 200, r.text
    assert client.get("/v1/rollouts/default/history", headers=auth("viewer")).json()[-1]["actor"] == "ci"


def test_dataset_versions_and_finetunes_record_who_made_them(client: TestClient, tmp_path: Path) -> None:
    from huvidpo.data import make_synthetic_dataset

    d = make_synthetic_dataset(tmp_path / "ds", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    assert client.post("/v1/datasets", json={"name": "d"}, headers=auth("ci")).status_code == 201
    files = [
        ("files", (p.relative_to(d).as_posix(), p.read_bytes())) for p in sorted(d.rglob("*")) if p.is_file()
    ]
    r = client.post("/v1/datasets/d/versions", files=files, headers=auth("ci"))
    assert r.status_code == 201, r.text
    version = r.json()["id"]
    assert r.json()["created_by"] == "ci"
    assert (
        client.get(f"/v1/datasets/d/versions/{version}", headers=auth("viewer")).json()["created_by"] == "ci"
    )
    hp = {"max_steps": 3, "num_frames": 4, "height": 32, "width": 32}
    body = {"dataset": "d", "version": version, "base_model": "tiny", "hyperparameters": hp}
    r = client.post("/v1/fine-tunes", json=body, headers=auth("ci"))
    assert r.status_code == 201, r.text
    assert client.get(f"/v1/fine-tunes/{r.json()['id']}", headers=auth("viewer")).json()["created_by"] == "ci"


# ------------------------------------------------------------------------------------ the table
def test_entries_parse_with_names_and_scopes_and_the_old_digests_still_read() -> None:
    d1, d2 = hash_token("a"), hash_token("b")
    got = parse_entries(f"alice:rate:{d1}; ci:read,train:{d2}\n# a comment\n")
    assert [(e.name, sorted(e.scopes)) for e in got] == [("alice", ["rate"]), ("ci", ["read", "train"])]
    [old] = parse_entries(d1.upper())
    assert (old.name, sorted(old.scopes)) == (f"token-{d1[:8]}", ["admin"])
    for bad, says in [
        (f"alice:fly:{d1}", "unknown or no scopes ['fly']"),
        ("alice:rate:abc", "sha256 hex digest"),
        (f"a:b:c:{d1}", "name:scope"),
    ]:
        with pytest.raises(AuthConfigError, match=says.replace("[", r"\[").replace("]", r"\]")) as info:
            parse_entries(bad)
        assert d1 not in str(info.value)


def test_tokens_file_is_read_and_its_errors_name_the_setting(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(entry("ann", "rate") + "\n" + entry("ops", "admin") + "\n")
    table = load_table(ControlPlaneSettings(tokens_file=f).auth_config(), "0.0.0.0", "svc")
    assert table.verify("tok-ann") == table.verify("tok-ann") and table.verify("tok-ann").name == "ann"  # type: ignore[union-attr]
    assert table.verify("tok-nobody") is None
    with pytest.raises(AuthConfigError, match="HUVIDPO_TOKENS_FILE: cannot read"):
        load_table(ControlPlaneSettings(tokens_file=tmp_path / "missing").auth_config(), "0.0.0.0", "svc")


def test_settings_errors_name_the_variable_not_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUVIDPO_TOKENS", "alice:rate:not-a-digest")
    with pytest.raises(SettingsError, match=r"HUVIDPO_CONTROLPLANE_TOKENS|tokens") as info:
        load_settings(ControlPlaneSettings)
    assert "not-a-digest" not in str(info.value)


@pytest.mark.parametrize(
    ("cfg", "host", "says"),
    [
        ({}, "127.0.0.1", "no bearer token configured"),
        ({"dev_mode": True}, "0.0.0.0", "not a loopback"),
        (
            {"tokens": [hashlib.sha256(DEV_TOKEN.encode()).hexdigest()]},
            "127.0.0.1",
            "public development token",
        ),
    ],
)
def test_fail_closed(cfg: dict[str, Any], host: str, says: str) -> None:
    with pytest.raises(AuthConfigError, match=says):
        load_table(ControlPlaneSettings(**cfg).auth_config(), host, "svc")


def test_dev_mode_on_loopback_runs_open_and_allows_the_dev_token() -> None:
    table = load_table(ControlPlaneSettings(dev_mode=True).auth_config(), "127.0.0.1", "svc")
    assert table.open and table.verify("") is not None
    dev = [hashlib.sha256(DEV_TOKEN.encode()).hexdigest()]
    table = load_table(ControlPlaneSettings(dev_mode=True, tokens=dev).auth_config(), "0.0.0.0", "svc")
    assert table.verify(DEV_TOKEN) is not None


def _start(env: dict[str, str], module: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", module], env={**base, **env}, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("module", ["services.controlplane", "services.inference"])
def test_services_refuse_to_start_open_or_with_dev_credentials(module: str, tmp_path: Path) -> None:
    store = {"HUVIDPO_STORE_ROOT": str(tmp_path / "s")}
    r = _start(store, module)
    assert r.returncode != 0 and "no bearer token configured" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = _start({**store, "HUVIDPO_TOKENS": hashlib.sha256(DEV_TOKEN.encode()).hexdigest()}, module)
    assert r.returncode != 0 and "public development token" in r.stderr, r.stderr
    dev_key = {"HUVIDPO_STORE_ACCESS_KEY": "huvidpo-dev", "HUVIDPO_STORE_SECRET_KEY": "x"}
    r = _start({**store, **dev_key, "HUVIDPO_TOKENS": entry("ops", "admin")}, module)
    assert r.returncode != 0 and "development store key" in r.stderr, r.stderr


def test_every_development_store_key_the_dev_overlay_ships_is_refused_outside_dev_mode() -> None:
    from services.common.auth import AuthConfigError, check_store_key

    root = Path(__file__).resolve().parents[2] / "deploy" / "overlays" / "cpu-dev"
    pairs = []
    for env in sorted(root.glob("store-*.dev.env")):
        values = dict(
            ln.split("=", 1) for ln in env.read_text().splitlines() if ln and not ln.startswith("#")
        )
        pairs.append((values["access-key"], values["secret-key"]))
    assert len(pairs) == 4
    for access, secret in pairs:
        check_store_key(access, secret, dev_mode=True, service="t")
        for a, s in ((access, "real-secret"), ("real-key", secret)):
            with pytest.raises(AuthConfigError, match="development store key"):
                check_store_key(a, s, dev_mode=False, service="t")
    check_store_key("real-key", "real-secret", dev_mode=False, service="t")
