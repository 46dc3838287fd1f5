"""The rating page in a real browser: Debian chromium (headless) driven by Selenium through chromedriver,
against the control plane served by uvicorn (``python -m services.controlplane``) on 127.0.0.1 over a
LocalStore in a temporary directory.

A rater signs in with the bearer token, rates with keys and mouse in both modes, reloads and resumes;
the stored records are checked through the REST API, the ratings are compiled into a new dataset
version whose lineage names them, and a prompt holding HTML is shown as text. Screenshots of both
modes are written to ``tests/artifacts/`` (and copied to /tmp).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "rating-ui-test-token"
# Raters sign in with `rate` tokens named after them (cy also curates: `data` compiles the ratings).
RATERS = {
    "ann": "rate",
    "bob": "rate",
    "cy": "rate,data",
    "dee": "rate",
    "someone-else": "rate",
    "eve": "rate,read",
}


def rater_token(rater: str) -> str:
    return f"rate-token-{rater}"


def as_rater(rater: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {rater_token(rater)}"}


XSS = "<img src=x onerror=alert(1)>"
DATASET = "clips"

pytestmark = pytest.mark.slow

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "Debian chromium and chromium-driver are needed (apt-get install chromium chromium-driver; "
        "listed in .ci/apt-packages.txt)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from tests.s3_fixtures import free_port  # noqa: E402


# --------------------------------------------------------------------------------------------- server
def upload_dataset(api: httpx.Client, name: str, directory: Path) -> str:
    """Create dataset ``name`` and upload ``directory`` as a version through the REST API."""
    r = api.post("/v1/datasets", json={"name": name})
    assert r.status_code == 201, r.text
    files = [
        ("files", (p.relative_to(directory).as_posix(), p.read_bytes()))
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    ]
    r = api.post(f"/v1/datasets/{name}/versions", files=files)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, Any]]:
    """The control plane as its own process, with one dataset whose second prompt is an HTML string."""
    from huvidpo.data import make_synthetic_dataset

    tmp = Path(tempfile.mkdtemp(prefix="huvidpo-ui-"))
    port = free_port()
    env = {
        **os.environ,
        "HUVIDPO_STORE_BACKEND": "local",
        "HUVIDPO_STORE_ROOT": str(tmp / "store"),
        "HUVIDPO_CONTROLPLANE_HOST": "127.0.0.1",
        "HUVIDPO_CONTROLPLANE_PORT": str(port),
        "HUVIDPO_TOKENS": ";".join(
            [hashlib.sha256(TOKEN.encode()).hexdigest()]  # a plain digest: an admin token
            + [f"{r}:{s}:{hashlib.sha256(rater_token(r).encode()).hexdigest()}" for r, s in RATERS.items()]
        ),
        "HUVIDPO_CONTROLPLANE_WORK_DIR": str(tmp / "work"),
        "HUVIDPO_CONTROLPLANE_EXECUTOR": "local",
    }
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.controlplane"], cwd=REPO, env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("control plane did not start:\n" + (tmp / "server.log").read_text())
            time.sleep(0.2)
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        data = make_synthetic_dataset(tmp / "ds", n_prompts=2, videos_per_prompt=3, num_frames=8, size=64)
        manifest = data / "manifest.jsonl"
        records = [json.loads(ln) for ln in manifest.read_text().splitlines()]
        for rec in records:
            if rec["id"].startswith("p1_"):
                rec["prompt"] = XSS
        manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
        version = upload_dataset(api, DATASET, data)
        yield {"url": url, "api": api, "version": version, "tmp": tmp, "store": tmp / "store"}
        api.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


# -------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless Debian chromium; Selenium Manager is kept offline (the driver path is given)."""
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
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1200,1000",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: WebDriver, cond: Callable[[WebDriver], Any], what: str, timeout: float = 30) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)
    except TimeoutException:
        status = driver.find_element(By.ID, "status").text
        raise AssertionError(f"timed out waiting for {what}; page status: {status!r}") from None


def text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def wait_text(driver: WebDriver, element_id: str, expected: str) -> None:
    wait(driver, lambda d: text(d, element_id) == expected, f"#{element_id} to read {expected!r}")


def press(driver: WebDriver, *keys: str) -> None:
    body = driver.find_element(By.TAG_NAME, "body")
    for k in keys:
        body.send_keys(k)


def video_ready(driver: WebDriver, element_id: str, video_id: str) -> bool:
    """The <video> shows ``video_id`` and has decoded frames (readyState >= HAVE_CURRENT_DATA)."""
    return bool(
        driver.execute_script(
            "const v = document.getElementById(arguments[0]);"
            "return v.dataset.videoId === arguments[1] && v.readyState >= 2 && v.videoWidth > 0;",
            element_id,
            video_id,
        )
    )


def open_page(driver: WebDriver, url: str, rater: str, mode: str, dataset: str = DATASET) -> None:
    """Load the page, sign in with the rater's token (it goes to sessionStorage; the rater id is the
    token's name, shown read-only), and set the mode."""
    driver.get(url + "/ui/static/style.css")  # same origin, no script running: a clean slate
    driver.execute_script("sessionStorage.clear(); localStorage.clear();")
    driver.get(url + "/ui/")
    driver.find_element(By.ID, "token").send_keys(rater_token(rater))
    driver.find_element(By.ID, "signin-btn").click()
    wait(driver, lambda d: d.find_element(By.ID, "setup").is_displayed(), "sign-in")
    wait(
        driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"#dataset option[value='{dataset}']"), "datasets"
    )
    Select(driver.find_element(By.ID, "dataset")).select_by_value(dataset)
    rater_box = driver.find_element(By.ID, "rater")
    wait(driver, lambda d: rater_box.get_attribute("value") == rater, "the rater id from the token")
    assert rater_box.get_attribute("readonly") is not None
    wait(driver, lambda d: d.find_element(By.ID, "main").is_displayed(), "the rating view")
    driver.find_element(By.ID, "tab-ab" if mode == "ab" else "tab-absolute").click()


def wait_saved(driver: WebDriver) -> None:
    """Judgments show at once and are saved in the background: wait until none is in flight."""
    wait(driver, lambda d: d.execute_script("return document.body.dataset.saving || '0'") == "0", "saves")


def ratings_of(api: httpx.Client, rater: str, dataset: str = DATASET) -> list[dict[str, Any]]:
    """The rater's stored records, through ``GET /v1/datasets/{name}/ratings`` (all pages)."""
    items: list[dict[str, Any]] = []
    token = None
    while True:
        params = {"page_size": 200, **({"page_token": token} if token else {})}
        r = api.get(f"/v1/datasets/{dataset}/ratings", params=params)
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        token = r.json()["next_page_token"]
        if not token:
            break
    return [i for i in items if i["record"]["rater_id"] == rater]


def save_screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"huvidpo-ui-{name}.png"
    driver.save_screenshot(str(path))
    shutil.copyfile(path, Path("/tmp") / path.name)
    return path


def assert_no_alert(driver: WebDriver) -> None:
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018


# ---------------------------------------------------------------------------------------------- tests
def test_page_needs_the_token_for_data(server: dict[str, Any]) -> None:
    """The page itself is public (it holds nothing); every data route behind it wants the token."""
    url, version = server["url"], server["version"]
    page = httpx.get(url + "/ui/")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path in (
        "/v1/datasets",
        f"/v1/datasets/{DATASET}/rating-session?rater_id=x",
        f"/v1/datasets/{DATASET}/versions/{version}/files/videos/p0_v0.mp4",
    ):
        assert httpx.get(url + path).status_code == 401, path
    assert httpx.get(url + "/ui/static/__init__.py").status_code == 404


def test_absolute_scores_with_keys_and_mouse_then_resume(server: dict[str, Any], browser: WebDriver) -> None:
    url, api, version = server["url"], server["api"], server["version"]
    open_page(browser, url, "ann", "absolute")
    wait_text(browser, "progress", "0 of 6 rated")
    assert text(browser, "position") == "Video 1 of 6"
    wait(browser, lambda d: video_ready(d, "abs-video", "p0_v0"), "the first video to play")

    press(browser, "7")  # video 1 -> 7, advances
    wait_text(browser, "progress", "1 of 6 rated")
    wait_text(browser, "position", "Video 2 of 6")
    press(browser, "1", "0")  # "1" then "0": 10
    wait_text(browser, "progress", "2 of 6 rated")
    browser.find_element(By.CSS_SELECTOR, "#score-buttons button[data-score='4']").click()  # mouse
    wait_text(browser, "progress", "3 of 6 rated")
    wait_text(browser, "position", "Video 4 of 6")
    press(browser, "p")  # back to video 3: shows the score given by mouse
    wait_text(browser, "position", "Video 3 of 6")
    wait_text(browser, "abs-current", "4")
    press(browser, "3")  # changed my mind: an update, not a second record
    wait_text(browser, "position", "Video 4 of 6")
    assert text(browser, "progress") == "3 of 6 rated"

    # Stored through the REST API: one record per video, the latest score.
    wait_saved(browser)
    mine = ratings_of(api, "ann")
    assert sorted((i["record"]["video_id"], i["record"]["score"]) for i in mine) == [
        ("p0_v0", 7.0),
        ("p0_v1", 10.0),
        ("p0_v2", 3.0),
    ]

    # Reload: the progress and the place come back from the server's records.
    browser.refresh()
    wait_text(browser, "progress", "3 of 6 rated")
    wait_text(browser, "position", "Video 4 of 6")
    assert "resuming" in text(browser, "status")

    # Video 4's prompt is HTML: it must show as text, create no element and run nothing.
    wait_text(browser, "abs-prompt", XSS)
    assert browser.find_elements(By.CSS_SELECTOR, "#abs-prompt *") == []
    assert browser.find_elements(By.CSS_SELECTOR, "img") == []
    assert_no_alert(browser)
    wait(browser, lambda d: video_ready(d, "abs-video", "p1_v0"), "video 4 to play")

    # A second rater in another browser profile would not see ann's progress: the session is per rater.
    r = api.get(f"/v1/datasets/{DATASET}/rating-session", headers=as_rater("someone-else"))
    assert r.json()["progress"]["absolute"] == {"done": 0, "total": 6}
    assert r.json()["version"] == version
    save_screenshot(browser, "absolute")


def test_ab_mode_synced_playback_choices_and_resume(server: dict[str, Any], browser: WebDriver) -> None:
    url, api = server["url"], server["api"]
    open_page(browser, url, "bob", "ab")
    wait_text(browser, "progress", "0 of 6 pairs judged")
    session = api.get(f"/v1/datasets/{DATASET}/rating-session", headers=as_rater("bob")).json()
    pairs = session["pairs"]
    assert all(p["left"]["id"][:2] == p["right"]["id"][:2] for p in pairs)  # same prompt in every pair

    def shown(i: int) -> None:
        wait_text(browser, "position", f"Pair {i + 1} of 6")
        wait(
            browser,
            lambda d: (
                video_ready(d, "ab-left", pairs[i]["left"]["id"])
                and video_ready(d, "ab-right", pairs[i]["right"]["id"])
            ),
            f"both clips of pair {i + 1}",
        )

    shown(0)
    both = "return [document.getElementById('ab-left'), document.getElementById('ab-right')]"
    wait(browser, lambda d: d.execute_script(both + ".every(v => !v.paused)"), "both clips to play")
    press(browser, " ")  # pause both
    wait(browser, lambda d: d.execute_script(both + ".every(v => v.paused)"), "both clips to pause")
    # Seek with the shared slider: both clips jump to the same time.
    browser.execute_script(
        "const s = document.getElementById('ab-seek'); s.value = '500';s.dispatchEvent(new Event('input'));"
    )

    def seeked(d: WebDriver) -> list[float] | None:
        t: list[float] = d.execute_script(both + ".map(v => v.currentTime)")
        return t if t[0] > 0 else None

    times = wait(browser, seeked, "the seek")
    assert abs(times[0] - times[1]) < 0.05 and times[0] > 0.3, times
    press(browser, " ")  # play both again
    wait(browser, lambda d: d.execute_script(both + ".every(v => !v.paused)"), "both clips to play again")

    press(browser, Keys.ARROW_LEFT)  # pair 1: left better
    wait_text(browser, "progress", "1 of 6 pairs judged")
    shown(1)
    browser.find_element(By.ID, "ab-choose-right").click()  # pair 2: right better (mouse)
    wait_text(browser, "progress", "2 of 6 pairs judged")
    shown(2)
    press(browser, "t")  # pair 3: tie
    wait_text(browser, "progress", "3 of 6 pairs judged")
    shown(3)
    press(browser, "p")  # back to pair 3, change the tie into "left"
    shown(2)
    wait_text(browser, "ab-current", "tie")
    press(browser, "a")
    wait_text(browser, "position", "Pair 4 of 6")
    assert text(browser, "progress") == "3 of 6 pairs judged"

    wait_saved(browser)
    mine = ratings_of(api, "bob")
    got = sorted((i["record"]["chosen"], i["record"]["rejected"]) for i in mine)
    want = sorted(
        [
            (pairs[0]["left"]["id"], pairs[0]["right"]["id"]),
            (pairs[1]["right"]["id"], pairs[1]["left"]["id"]),
            (pairs[2]["left"]["id"], pairs[2]["right"]["id"]),
        ]
    )
    assert got == want
    assert all(i["record"]["type"] == "choice" for i in mine)

    press(browser, "t")  # pair 4: a tie, kept by the server (not a choice record)
    wait_text(browser, "progress", "4 of 6 pairs judged")
    wait_saved(browser)
    assert len(ratings_of(api, "bob")) == 3

    browser.refresh()  # the mode, the progress and the place survive a reload
    wait_text(browser, "progress", "4 of 6 pairs judged")
    shown(4)
    browser.find_element(By.ID, "ab-prev").click()
    wait_text(browser, "ab-current", "tie")
    browser.find_element(By.ID, "ab-next").click()
    shown(4)
    assert text(browser, "ab-prompt") == XSS  # the second prompt's pairs: HTML shown as text
    assert browser.find_elements(By.CSS_SELECTOR, "#ab-prompt *") == []
    assert_no_alert(browser)
    save_screenshot(browser, "ab")


def test_compile_from_the_page_makes_a_version_with_lineage(
    server: dict[str, Any], browser: WebDriver
) -> None:
    url, api, base = server["url"], server["api"], server["version"]
    open_page(browser, url, "cy", "absolute")
    wait_text(browser, "progress", "0 of 6 rated")
    press(browser, "9", "2")
    wait_text(browser, "progress", "2 of 6 rated")

    browser.find_element(By.ID, "compile-btn").click()
    wait(browser, lambda d: text(d, "compile-result").startswith("new version"), "the compile")

    versions = api.get(f"/v1/datasets/{DATASET}/versions").json()["items"]
    compiled = [v for v in versions if "ratings" in v["source"]]
    assert len(compiled) == 1
    new = compiled[0]
    assert new["id"] != base and new["source"]["ratings"]["base"] == base
    assert text(browser, "compile-result").startswith(f"new version {new['id'][:12]}")

    # Lineage: every stored record id (and only those), and the digest over them.
    stored = ratings_of(api, "ann") + ratings_of(api, "bob") + ratings_of(api, "cy")
    data = server["store"] / "datasets" / DATASET / new["id"] / "data"
    lineage = json.loads((data / "ratings-lineage.json").read_text())
    assert lineage["base"] == base
    assert sorted(lineage["records"]) == sorted(i["id"] for i in stored)
    assert len(lineage["ties"]) == 1 and lineage["raters"] == ["ann", "bob", "cy"]
    assert new["source"]["ratings"]["sha256"] == lineage["ratings_sha256"]
    assert "data/ratings-lineage.json" in new["files"]

    # The new version's manifest holds the records (once each) and compiles into DPO pairs.
    lines = [json.loads(ln) for ln in (data / "manifest.jsonl").read_text().splitlines()]
    added = [ln for ln in lines if ln.get("type") in ("rating", "choice")]
    assert sorted(json.dumps(r, sort_keys=True) for r in added) == sorted(
        json.dumps(i["record"], sort_keys=True) for i in stored
    )
    r = api.post(f"/v1/datasets/{DATASET}/versions/{new['id']}/pairs", json={})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["report"]["pairs_from_choices"] >= 1
    assert report["report"]["raters"] == 5  # the synthetic rater0/rater1 plus ann, bob, cy

    # Compiling the same ratings again gives the same immutable version.
    again = api.post(f"/v1/datasets/{DATASET}/ratings/compile", json={"base": new["id"]})
    assert again.status_code == 201 and again.json()["version"]["id"] == new["id"]


def _load_script() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("ab_samples", REPO / "scripts" / "ab_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ab_samples"] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_on_policy_ab_of_current_vs_previous_checkpoint(
    server: dict[str, Any], browser: WebDriver, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """scripts/ab_samples.py samples two checkpoints on the same prompts, first frame and seeds and
    registers the set; the A/B mode pairs them (one clip of each) and a choice becomes a choice record."""
    import numpy as np
    import torch
    from PIL import Image

    from huvidpo.lora import lora_config, lora_parameters, save_lora
    from huvidpo.models import load_components
    from huvidpo.pipeline import GenerationConfig
    from huvidpo.video_io import read_video

    # "current" = a LoRA adapter with non-zero weights; "previous" = the base model.
    unet = load_components(tiny_model_dir).unet
    unet.add_adapter(lora_config(rank=4, alpha=4, dropout=0.0), adapter_name="default")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(unet, "default").values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    adapter = save_lora(unet, tmp_path / "adapter", "default")
    frame = tmp_path / "frame0.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(frame)

    ab = _load_script()
    out = ab.generate_comparison(
        tiny_model_dir,
        [ab.Checkpoint("ckpt-ft1-200", adapter), ab.Checkpoint("ckpt-ft1-100", None)],
        ["a cat turns to smile", "a dog jumps"],
        [frame],
        tmp_path / "abset",
        config=GenerationConfig(num_frames=4, height=64, width=64, steps=2),
    )
    new, old = (
        read_video(out / "videos/ckpt-ft1-200/0000.mp4")[0],
        read_video(out / "videos/ckpt-ft1-100/0000.mp4")[0],
    )
    assert new.shape == old.shape and not np.array_equal(new, old)  # the adapter changed the samples
    version = ab.register(server["url"], TOKEN, "rollout", out)
    assert version["videos"] == 4

    api = server["api"]
    session = api.get("/v1/datasets/rollout/rating-session", headers=as_rater("dee")).json()
    pairs = session["pairs"]
    assert len(pairs) == 2 and all(p["on_policy"] and p["first_frame"] == "frame0" for p in pairs)
    for p in pairs:  # one clip of each checkpoint, same sample number
        assert sorted(x["id"] for x in (p["left"], p["right"])) == [
            f"ckpt-ft1-100-{p['left']['id'][-4:]}",
            f"ckpt-ft1-200-{p['left']['id'][-4:]}",
        ]

    open_page(browser, server["url"], "dee", "ab", dataset="rollout")
    wait_text(browser, "progress", "0 of 2 pairs judged")
    assert "previous checkpoint" in text(browser, "ab-kind")
    wait(
        browser,
        lambda d: (
            video_ready(d, "ab-left", pairs[0]["left"]["id"])
            and video_ready(d, "ab-right", pairs[0]["right"]["id"])
        ),
        "both samples",
    )
    save_screenshot(browser, "ab-onpolicy")
    press(browser, Keys.ARROW_RIGHT)
    wait_text(browser, "progress", "1 of 2 pairs judged")
    wait_saved(browser)
    [stored] = ratings_of(api, "dee", "rollout")
    assert stored["record"]["chosen"] == pairs[0]["right"]["id"]
    assert stored["record"]["rejected"] == pairs[0]["left"]["id"]

    r = api.post("/v1/datasets/rollout/ratings/compile", json={})
    assert r.status_code == 201, r.text
    assert r.json()["pairs"]["report"]["pairs_from_choices"] == 1
    assert r.json()["lineage"]["records"] == [stored["id"]]


def test_round_results_show_only_once_every_rater_has_judged_every_pair(
    server: dict[str, Any], browser: WebDriver, tmp_path: Path
) -> None:
    """An on-policy round of two checkpoints: while bob is still judging, ann (done) sees only the
    round's progress; once bob is done, the win rates with their Wilson intervals appear."""
    from tests.abrounds import write_round

    api = server["api"]
    version = upload_dataset(api, "round-two", write_round(tmp_path, ["ckpt-r-10", "ckpt-r-20"], samples=2))
    pairs = [(f"ckpt-r-20-p{p}-s{k}", f"ckpt-r-10-p{p}-s{k}") for p in range(2) for k in range(2)]

    def bob(a: str, b: str) -> None:
        body = {"version": version, "left": a, "right": b, "winner": "left"}
        r = api.put("/v1/datasets/round-two/ratings/choice", json=body, headers=as_rater("bob"))
        assert r.status_code == 200, r.text

    bob(*pairs[0])  # bob has started
    open_page(browser, server["url"], "ann", "ab", dataset="round-two")
    wait(browser, lambda d: "Round in progress: 1 of 4" in text(d, "round-state"), "the round's progress")
    for _ in pairs:
        press(browser, "a")
        wait_saved(browser)
    wait(browser, lambda d: "Round in progress: 5 of 8" in text(d, "round-state"), "ann's judgments counted")
    assert not browser.find_element(By.ID, "round-table").is_displayed()
    for a, b in pairs[1:]:
        bob(a, b)
    open_page(browser, server["url"], "ann", "ab", dataset="round-two")
    wait(
        browser, lambda d: text(d, "round-state").startswith("Round complete: 4 pairs"), "the round's results"
    )
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#round-rows tr")]
    assert len(rows) == 1 and rows[0].startswith("ckpt-r-10 ckpt-r-20")
    assert not browser.find_element(By.ID, "round-ranking").is_displayed()  # two checkpoints: no ranking
    browser.execute_script("document.getElementById('round').scrollIntoView()")
    save_screenshot(browser, "ab-round-results")


def test_checkpoint_samples_panel_plays_a_checkpoints_sample_videos(
    server: dict[str, Any], browser: WebDriver, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A checkpoint published with sample videos (rendered by the trainer's own code) shows them in
    the page's samples panel, for a token that may read checkpoints; a rate-only token sees no panel."""
    from huvidpo.models import load_components
    from huvidpo.training import DPOConfig
    from huvidpo.training.samples import SampleSpec, render_samples
    from services.common.publish import publish_dir
    from services.common.store import LocalStore

    cid = "ckpt-ft-ui-5"
    cfg = DPOConfig(num_frames=4, height=32, width=32, sample_steps=1)
    specs = [SampleSpec(0, "a red ball", 0, None), SampleSpec(1, XSS, 1, None)]
    render_samples(tmp_path / cid, load_components(tiny_model_dir), specs, cfg)
    publish_dir(LocalStore(server["store"]), tmp_path / cid, f"checkpoints/{cid}/",
                {"id": cid, "step": 5, "lineage": {"finetune_id": "ft-ui"}})  # fmt: skip

    open_page(browser, server["url"], "ann", "absolute")  # rate only: no checkpoints for this token
    assert not browser.find_element(By.ID, "samples-panel").is_displayed()
    open_page(browser, server["url"], "eve", "absolute")
    panel = browser.find_element(By.ID, "samples-panel")
    assert panel.is_displayed()
    panel.find_element(By.TAG_NAME, "summary").click()
    wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, f"#samples-checkpoint option[value='{cid}']"),
        "the checkpoint",
    )
    ready = (
        "return [...document.querySelectorAll('#samples-list video')]"
        ".filter(v => v.readyState >= 2 && v.videoWidth === 32).length"
    )
    wait(browser, lambda d: d.execute_script(ready) == 2, "both sample videos to play")
    captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#samples-list figcaption")]
    assert captions == ["#0 · seed 0 · a red ball", f"#1 · seed 1 · {XSS}"]  # the prompt as text
    assert_no_alert(browser)
    browser.execute_script("document.getElementById('samples-panel').scrollIntoView()")
    save_screenshot(browser, "checkpoint-samples")
