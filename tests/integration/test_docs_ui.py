"""``/docs`` renders in a real browser (headless Debian chromium) with nothing but the control plane
to load from: Swagger UI draws the API, its Authorize button offers the bearer scheme, and every
resource the page fetched is same-origin."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from tests.doubles import IdleExecutor
from tests.s3_fixtures import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.slow

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "Debian chromium and chromium-driver are needed (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("docs-ui")
    settings = ControlPlaneSettings(tokens=[hashlib.sha256(b"docs-token").hexdigest()], work_dir=tmp / "work")
    app = create_app(settings, LocalStore(tmp / "store"), IdleExecutor(), background=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_swagger_ui_renders_offline_with_an_authorize_button(url: str) -> None:
    os.environ["SE_OFFLINE"] = "1"
    profile = tempfile.mkdtemp(prefix="huvidpo-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1200,1000",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    try:
        driver.get(url + "/docs")
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        title = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"))
        assert "HuViDPO control plane" in title[0].text
        # the operations are drawn (the spec loaded and parsed), models and events among them
        ops = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        paths = {o.get_attribute("data-path") for o in ops}
        assert {"/v1/models", "/v1/fine-tunes/{finetune_id}/events"} <= paths
        driver.find_element(By.CSS_SELECTOR, "button.authorize").click()
        dialog = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".dialog-ux .modal-ux-content"))
        assert "bearer" in dialog[0].text and "http, Bearer" in dialog[0].text
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href]);"
        )
        assert resources and all(r.startswith(url + "/") for r in resources), resources
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
