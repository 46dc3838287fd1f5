"""The SDK against an ``httpx.MockTransport``: the routes built on another branch (``/v1/models``,
fine-tune ``events`` and ``metrics``, to the shared contract), retries, Idempotency-Key, typed errors.

Everything else is exercised against a real control plane in tests/integration/test_client_cli.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from huvidpo.cli import main
from huvidpo.client import (
    Client,
    Conflict,
    ConnectionFailed,
    ExitCode,
    InvalidInput,
    NotFound,
    RateLimited,
    ServerError,
    UploadInterrupted,
)

PROBLEMS = "https://huvidpo.dev/problems/"
MODEL = {
    "id": "sd15",
    "prefix": "models/sd15/",
    "digest": "sha256:" + "a" * 64,
    "unet": "image",
    "files": 2,
    "size_bytes": 11,
    "created_at": "2026-01-01T00:00:00Z",
    "created_by": "dev",
    "description": "",
}


def problem(status: int, kind: str, detail: str, field: str | None = None, **headers: str) -> httpx.Response:
    body = {"type": PROBLEMS + kind, "title": "x", "status": status, "detail": detail}
    if field:
        body["field"] = field
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json", **headers})


def client(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> tuple[Client, list[float]]:
    c = Client("http://cp.test", "tok", transport=httpx.MockTransport(handler), **kw)
    slept: list[float] = []
    c.http.sleep = slept.append
    return c, slept


def multipart_fields(req: httpx.Request) -> list[tuple[str, str | None, bytes]]:
    """(name, filename, content) of each part of a multipart request body."""
    ctype = req.headers["content-type"]
    boundary = ctype.split("boundary=", 1)[1].encode()
    out = []
    for chunk in req.content.split(b"--" + boundary)[1:-1]:
        head, _, body = chunk[2:-2].partition(b"\r\n\r\n")
        disp = next(h for h in head.decode().split("\r\n") if h.lower().startswith("content-disposition"))
        name = disp.split('name="', 1)[1].split('"', 1)[0]
        filename = disp.split('filename="', 1)[1].split('"', 1)[0] if "filename=" in disp else None
        out.append((name, filename, body))
    return out


# ---------------------------------------------------------------------------------------- models
def test_register_streams_every_file_as_a_part_named_by_its_path(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"123456789")
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        req.read()
        seen.append(req)
        return httpx.Response(201, json=MODEL)

    c, _ = client(handler)
    progress: list[tuple[int, int]] = []
    view = c.models.register(
        "sd15", tmp_path, description="d", on_progress=lambda d, t: progress.append((d, t))
    )
    assert view == MODEL
    (req,) = seen
    assert (req.method, req.url.path) == ("POST", "/v1/models")
    assert req.headers["authorization"] == "Bearer tok"
    assert req.headers["idempotency-key"]
    assert int(req.headers["content-length"]) == len(req.content)
    parts = multipart_fields(req)
    assert parts == [
        ("id", None, b"sd15"),
        ("description", None, b"d"),
        ("files", "unet/config.json", b"{}"),
        ("files", "unet/w.safetensors", b"123456789"),
    ]
    assert progress[-1] == (11, 11)


def test_register_from_a_store_prefix_sends_json_and_reads_409_as_conflict() -> None:
    bodies: list[Any] = []

    def handler(req: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(req.content))
        return problem(409, "conflict", "model 'sd15' exists with other content", "id")

    c, _ = client(handler)
    with pytest.raises(Conflict) as exc:
        c.models.register("sd15", from_prefix="imports/sd15/")
    assert bodies == [{"id": "sd15", "from_prefix": "imports/sd15/", "description": ""}]
    assert exc.value.status == 409 and exc.value.field == "id"
    assert exc.value.kind == "conflict"
    assert str(exc.value) == "model 'sd15' exists with other content (field: id)"


def test_register_refuses_a_directory_and_a_prefix_together(tmp_path: Path) -> None:
    c, _ = client(lambda r: httpx.Response(500))
    with pytest.raises(ValueError, match="not both"):
        c.models.register("m", tmp_path, from_prefix="x/")


def test_bad_layout_is_invalid_input_with_the_type_and_field() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return problem(422, "invalid-model-layout", "unet/w.bin: only safetensors weights", "unet/w.bin")

    c, _ = client(handler)
    with pytest.raises(InvalidInput) as exc:
        c.models.register("m", from_prefix="p/")
    assert exc.value.type == PROBLEMS + "invalid-model-layout"
    assert exc.value.field == "unet/w.bin"


def test_model_listing_follows_page_tokens_and_get_reads_one() -> None:
    pages = {
        None: {"items": [MODEL], "next_page_token": "t1"},
        "t1": {"items": [{**MODEL, "id": "tiny"}], "next_page_token": None},
    }

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v1/models/nope":
            return problem(404, "not-found", "model 'nope' not found")
        if req.url.path == "/v1/models/sd15":
            return httpx.Response(200, json=MODEL)
        assert req.url.params.get("page_size") == "1"
        return httpx.Response(200, json=pages[req.url.params.get("page_token")])

    c, _ = client(handler)
    assert [m["id"] for m in c.models.list(page_size=1)] == ["sd15", "tiny"]
    assert c.models.get("sd15") == MODEL
    with pytest.raises(NotFound, match="model 'nope' not found"):
        c.models.get("nope")


# ------------------------------------------------------------------------------ events and metrics
EVENTS = [
    {"seq": 0, "event": "start", "total_steps": 3},
    {"seq": 1, "event": "step", "step": 1, "loss": 0.69},
    {"seq": 2, "event": "step", "step": 2, "loss": 0.5},
    {"seq": 3, "event": "end", "state": "succeeded"},
]


def test_events_page_after_a_sequence_number() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        assert req.url.path == "/v1/fine-tunes/ft-1/events"
        after = int(req.url.params.get("after", -1))
        limit = int(req.url.params.get("limit", 2))
        items = [e for e in EVENTS if e["seq"] > after][:limit]
        return httpx.Response(200, json={"items": items, "next_after": items[-1]["seq"] if items else None})

    c, _ = client(handler)
    assert c.fine_tunes.events("ft-1", after=1, limit=1) == {"items": [EVENTS[2]], "next_after": 2}
    assert list(c.fine_tunes.iter_events("ft-1")) == EVENTS


def test_following_events_reads_the_ndjson_stream() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        assert req.url.params["follow"] == "true" and req.url.params["after"] == "0"
        body = "".join(json.dumps(e) + "\n" for e in EVENTS[1:])
        return httpx.Response(200, text=body, headers={"content-type": "application/x-ndjson"})

    c, _ = client(handler)
    assert list(c.fine_tunes.iter_events("ft-1", after=0, follow=True)) == EVENTS[1:]


def test_metrics_history_and_its_cli_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = {
        "finetune_id": "ft-1",
        "steps": [1, 2],
        "metrics": {"loss": [0.6931471824645996, 0.5], "implicit_acc": [0.5, None]},
    }

    def handler(req: httpx.Request) -> httpx.Response:
        assert req.url.path == "/v1/fine-tunes/ft-1/metrics"
        return httpx.Response(200, json=metrics)

    c, _ = client(handler)
    assert c.fine_tunes.metrics("ft-1") == metrics
    _route_cli_to(monkeypatch, handler)
    assert main(["fine-tunes", "metrics", "ft-1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["STEP", "IMPLICIT_ACC", "LOSS"]
    assert lines[1].split() == ["1", "0.5", "0.6931"]  # 4 significant digits
    assert lines[2].split() == ["2", "0.5"]  # null -> empty cell
    assert main(["fine-tunes", "metrics", "ft-1", "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics


def _route_cli_to(
    monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]
) -> None:
    """Make the CLI's Client talk to ``handler``."""
    import huvidpo.client.cli as cli

    real = cli.Client

    def make(*a: Any, **kw: Any) -> Client:
        c = real(*a, transport=httpx.MockTransport(handler), **kw)
        c.http.sleep = lambda s: None
        return c

    monkeypatch.setattr(cli, "Client", make)


def test_cli_models_register_and_list(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{}")

    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "POST":
            req.read()
            assert [p[1] for p in multipart_fields(req) if p[0] == "files"] == ["model_index.json"]
            return httpx.Response(201, json=MODEL)
        if req.url.path == "/v1/models/nope":
            return problem(404, "not-found", "model 'nope' not found")
        return httpx.Response(200, json={"items": [MODEL], "next_page_token": None})

    _route_cli_to(monkeypatch, handler)
    assert main(["models", "register", str(tmp_path / "m"), "--name", "sd15", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == MODEL["digest"]
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["ID", "UNET"] and out[1].split()[:2] == ["sd15", "image"]
    assert main(["models", "show", "nope"]) == ExitCode.NOT_FOUND
    assert capsys.readouterr().err.strip() == "huvidpo models show: error: model 'nope' not found (HTTP 404)"
    assert main(["models", "register", str(tmp_path / "absent"), "--name", "x"]) == ExitCode.USAGE
    assert "directory not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ retries
def test_a_create_retried_after_503_keeps_its_idempotency_key_and_honours_retry_after() -> None:
    keys: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        keys.append(req.headers["idempotency-key"])
        if len(keys) < 3:
            return problem(503, "service-unavailable", "store unavailable", **{"Retry-After": "7"})
        return httpx.Response(201, json={"id": "ft-1", "state": "queued"})

    c, slept = client(handler)
    assert c.fine_tunes.create("d", "v" * 64, "tiny", {"max_steps": 2})["id"] == "ft-1"
    assert len(keys) == 3 and len(set(keys)) == 1
    assert slept[0] >= 7 and slept[1] >= 7  # the server's Retry-After, not the shorter backoff


def test_backoff_grows_with_jitter_and_429_raises_rate_limited_when_retries_run_out() -> None:
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req)
        return problem(429, "too-many-requests", "too many streams for this token")

    c, slept = client(handler, retries=3, backoff=1.0)
    with pytest.raises(RateLimited, match="too many streams"):
        c.datasets.get("d")
    assert len(calls) == 4
    assert [0.5 <= slept[0] <= 1, 1 <= slept[1] <= 2, 2 <= slept[2] <= 4] == [True] * 3


def test_other_server_errors_are_not_retried() -> None:
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req)
        return problem(500, "internal-error", "internal error")

    c, _ = client(handler)
    with pytest.raises(ServerError):
        c.rollouts.get("default")
    assert len(calls) == 1


def test_an_unreachable_control_plane_is_retried_then_reported() -> None:
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req)
        raise httpx.ConnectError("connection refused", request=req)

    c, slept = client(handler, retries=2)
    with pytest.raises(ConnectionFailed, match=r"cannot reach http://cp.test: connection refused"):
        c.datasets.create("d")
    assert len(calls) == 3 and len(slept) == 2


def test_an_upload_cut_part_way_resumes_with_only_the_missing_files(tmp_path: Path) -> None:
    for name, data in (("manifest.jsonl", b"{}\n"), ("videos/a.mp4", b"aaaa"), ("videos/b.mp4", b"bbbb")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    staged: dict[str, dict[str, Any]] = {}
    fail = [True]

    def handler(req: httpx.Request) -> httpx.Response:
        req.read()
        path = req.url.path
        if path == "/v1/datasets/d/uploads" and req.method == "POST":
            return httpx.Response(201, json={"id": "up-1", "dataset": "d", "created_at": "", "files": {}})
        if path == "/v1/datasets/d/uploads/up-1" and req.method == "GET":
            return httpx.Response(200, json={"id": "up-1", "dataset": "d", "created_at": "", "files": staged})
        if path.endswith("/files"):
            names = [(f, b) for n, f, b in multipart_fields(req) if n == "files"]
            if fail[0] and any(f == "videos/b.mp4" for f, _ in names):
                fail[0] = False
                return problem(500, "internal-error", "disk full")
            for f, b in names:
                staged[f] = {"size": len(b), "sha256": None}
            return httpx.Response(200, json={"files": []})
        if path.endswith("/commit"):
            return httpx.Response(201, json={"id": "v1", "files": staged})
        raise AssertionError(path)

    c, _ = client(handler)
    with pytest.raises(UploadInterrupted) as exc:
        c.datasets.upload("d", tmp_path, batch_files=2)
    assert exc.value.upload_id == "up-1"
    assert set(staged) == {"manifest.jsonl", "videos/a.mp4"}
    seen: list[tuple[int, int]] = []
    version = c.datasets.upload("d", tmp_path, resume="up-1", on_progress=lambda d, t: seen.append((d, t)))
    assert set(version["files"]) == {"manifest.jsonl", "videos/a.mp4", "videos/b.mp4"}
    assert seen[0] == (7, 11) and seen[-1] == (11, 11)  # resumed from the 7 bytes already there


def test_configuration_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUVIDPO_URL", "http://env.test:1/")
    monkeypatch.setenv("HUVIDPO_TOKEN", "envtok")
    monkeypatch.setenv("HUVIDPO_GRPC_ADDRESS", "env.test:2")
    with Client() as c:
        assert (c.url, c.token, c.grpc_address) == ("http://env.test:1", "envtok", "env.test:2")
    with Client("http://arg.test", "argtok", "arg.test:3") as c:
        assert (c.url, c.token, c.grpc_address) == ("http://arg.test", "argtok", "arg.test:3")


def test_pairs_compile_with_dataset_is_the_remote_compile_and_pairs_dir_stays_local() -> None:
    from huvidpo.client.cli import rewrite_argv

    assert rewrite_argv(["pairs", "compile", "--dataset", "cats", "--version", "latest"]) == [
        "datasets",
        "pairs",
        "cats",
        "--version",
        "latest",
    ]
    assert rewrite_argv(["pairs", "compile", "--dataset=cats", "--version", "v"]) == [
        "datasets",
        "pairs",
        "cats",
        "--version",
        "v",
    ]
    assert rewrite_argv(["pairs", "compile"]) == ["pairs", "compile"]  # a local directory named compile
    assert rewrite_argv(["pairs", "some/dir", "--json"]) == ["pairs", "some/dir", "--json"]


def test_the_remote_verbs_are_left_out_without_the_client_extra() -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "from huvidpo.cli import build_parser\n"
        "sub = build_parser()._subparsers._group_actions[0].choices\n"
        "print(sorted(sub))"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    names = eval(out.stdout)
    assert "generate" in names and "pairs" in names and "datasets" not in names


# ----------------------------------------------------------------------------------- the guard
ROOT = Path(__file__).resolve().parents[2]


def test_nothing_in_the_library_imports_the_sdk_but_the_cli_hooks() -> None:
    """The SDK is an extra: only huvidpo/cli.py reaches it, lazily (the parser's module loop and
    ``generate --remote``); the ML library never imports it."""
    import re

    offenders = []
    for path in sorted((ROOT / "huvidpo").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("huvidpo/client/") or rel == "huvidpo/cli.py":
            continue
        if re.search(r"^\s*(from|import)\s+huvidpo\.client\b|\"huvidpo\.client", path.read_text(), re.M):
            offenders.append(rel)
    assert offenders == []


def test_the_sdk_loads_neither_torch_nor_the_server_nor_grpc_until_a_generate() -> None:
    import os
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from huvidpo.client import Client\n"
        "Client('http://x.test').close()\n"
        "heavy = ('torch', 'diffusers', 'fastapi', 'uvicorn', 'pydantic', 'grpc')\n"
        "print(json.dumps(sorted(n for n in heavy if n in sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_client_extra_pins_what_the_server_extra_pins() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    client_reqs = set(extras["client"])
    assert (
        {"grpcio>=1.85.1,<1.86", "protobuf>=7.35.1,<8"} <= client_reqs <= {*extras["server"], *extras["dev"]}
    )
    assert any(r.startswith("httpx") for r in client_reqs)


def _rated_dir(root: Path) -> Path:
    for name, data in (("manifest.jsonl", b"{}\n"), ("videos/a.mp4", b"aaaa")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("cut", ["server", "ctrl-c"])
def test_the_cli_says_how_to_resume_an_interrupted_upload(
    cut: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _rated_dir(tmp_path / "rated")

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/uploads"):
            return httpx.Response(201, json={"id": "up-7", "dataset": "d", "created_at": "", "files": {}})
        if cut == "ctrl-c":
            raise KeyboardInterrupt
        return problem(503, "service-unavailable", "the object store is unavailable")

    _route_cli_to(monkeypatch, handler)
    rc = main(["datasets", "upload", "d", str(data), "--retries", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the upload's progress lines
    assert f"resume with: huvidpo datasets upload d {data} --resume up-7" in err
    if cut == "server":
        assert rc == ExitCode.UNAVAILABLE
        assert err.startswith("huvidpo datasets upload: error: the object store is unavailable (HTTP 503)")
    else:
        assert rc == ExitCode.INTERRUPTED
        assert err.startswith("huvidpo datasets upload: interrupted")


def test_wait_stops_early_when_until_holds() -> None:
    views = iter([{"id": "ft", "state": "queued"}, {"id": "ft", "state": "running"}])

    c, _ = client(lambda req: httpx.Response(200, json=next(views)))
    view = c.fine_tunes.wait("ft", until=lambda v: v["state"] == "running", interval=0)
    assert view["state"] == "running"


def test_checkpoint_show_lists_its_sample_videos_and_sample_saves_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = {
        "id": "ckpt-ft-1-4",
        "finetune_id": "ft-1",
        "step": 4,
        "created_at": None,
        "files": {"samples/00.mp4": {"sha256": None, "size": 3}},
        "lineage": {},
        "samples": [
            {"index": 0, "prompt": "a cat", "seed": 5, "url": "/v1/checkpoints/ckpt-ft-1-4/samples/0"}
        ],
    }

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v1/checkpoints/ckpt-ft-1-4/samples/0":
            return httpx.Response(200, content=b"mp4", headers={"content-type": "video/mp4"})
        return httpx.Response(200, json=ck)

    c, _ = client(handler)
    assert c.checkpoints.sample("ckpt-ft-1-4", 0, tmp_path / "s.mp4").read_bytes() == b"mp4"
    _route_cli_to(monkeypatch, handler)
    assert main(["checkpoints", "show", "ckpt-ft-1-4", "--url", "http://cp.test"]) == 0
    out = capsys.readouterr().out
    assert "sample 0" in out and "'a cat' seed 5" in out
    assert "http://cp.test/v1/checkpoints/ckpt-ft-1-4/samples/0" in out


def test_generate_needs_a_model_or_remote_and_refuses_local_only_options_remotely(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "v.mp4")
    assert main(["generate", "--prompt", "x", "--out", out]) == ExitCode.USAGE
    assert (
        capsys.readouterr().err.strip()
        == "huvidpo generate: error: --model is required (or --remote ADDRESS)"
    )
    rc = main(["generate", "--remote", "127.0.0.1:1", "--lora", str(tmp_path), "--prompt", "x", "--out", out])
    assert rc == ExitCode.USAGE
    assert capsys.readouterr().err.strip() == "huvidpo generate: error: --lora is not available with --remote"


@pytest.mark.parametrize(
    ("done", "total", "line"),
    [
        (0, 109_171, "up: 0.0/106.6 KiB (0%)"),
        (54_000, 109_171, "up: 52.7/106.6 KiB (49%)"),
        (2_359_296, 4_718_592, "up: 2.2/4.5 MiB (50%)"),
        (300, 600, "up: 300.0/600.0 B (50%)"),
        (2**30, 3 * 2**30, "up: 1.0/3.0 GiB (33%)"),
    ],
)
def test_upload_progress_reads_in_the_unit_of_the_whole_upload(
    done: int, total: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from huvidpo.client.cli import _Bar

    _Bar("up")(done, total)
    assert capsys.readouterr().err.strip() == line


def test_a_missing_local_file_is_named_as_given_not_as_an_errno(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.png"
    argv = ["generate", "--remote", "127.0.0.1:9", "--prompt", "x", "--first-frame", str(missing)]
    assert main([*argv, "--out", str(tmp_path / "v.mp4")]) == 2  # before any connection
    assert (
        capsys.readouterr().err.strip() == f"huvidpo generate: error: --first-frame {missing}: no such file"
    )
    records = tmp_path / "ratings.jsonl"
    assert main(["ratings", "add", "cats", "--file", str(records), "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"huvidpo ratings add: error: no such file or directory: {records}", err
