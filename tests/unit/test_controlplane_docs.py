"""``/docs`` and ``/redoc`` work with no network beyond the control plane: every asset they load is
served by the app itself (``fastapi-offline``), and the OpenAPI declares the bearer scheme on every
route that takes a token, so Swagger UI has an Authorize button."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.auth import api_routes, route_scopes
from tests.doubles import IdleExecutor


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    settings = ControlPlaneSettings(tokens=["0" * 64], work_dir=tmp_path / "work")
    return TestClient(create_app(settings, LocalStore(tmp_path / "store"), IdleExecutor(), background=False))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_same_origin_assets_and_those_are_served(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    urls = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']""", html) + re.findall(
        r"url: '([^']+)'", html
    )
    assert urls, html
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
    # nothing else in the page names another host (a CDN, Google Fonts, the Swagger validator)
    assert not re.search(r"https?://", html), re.findall(r"https?://\S+", html)
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.content, url
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts and all(
        client.get(u).headers["content-type"].startswith(("text/javascript", "application/javascript"))
        for u in scripts
    )


def test_swagger_ui_does_not_send_the_spec_to_the_online_validator(client: TestClient) -> None:
    assert '"validatorUrl": null' in client.get("/docs").text


def test_openapi_declares_the_bearer_scheme_on_every_route_that_takes_a_token(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearer"]["description"],
    }
    app = client.app
    checked = 0
    for route in api_routes(app.routes):  # type: ignore[attr-defined]
        if not route.include_in_schema:
            continue
        for method in route.methods - {"HEAD"}:
            op = spec["paths"][route.path_format][method.lower()]
            if route_scopes(route) is not None:
                assert op["security"] == [{"bearer": []}], (method, route.path)
                checked += 1
            elif route.path.startswith("/v1/"):
                # the only /v1 routes without a token: presigned object URLs (their signature is the auth)
                assert route.path.startswith("/v1/objects/") and "security" not in op, route.path
    assert checked > 30
