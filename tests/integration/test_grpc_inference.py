"""The gRPC inference service against a real server on 127.0.0.1 with the tiny model.

Sizes are small (4 frames, 64x64, 2 steps) so every generation takes a fraction of a second."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from huvidpo.video_io import read_video
from services.common.publish import publish_dir
from services.common.settings import InferenceSettings
from services.common.store import LocalStore
from services.inference.gen import inference_pb2 as pb
from services.inference.testing import (
    ServerThread,
    image_bytes,
    make_adapter,
    publish_checkpoint,
    set_rollout,
)

SMALL = {"frames": 4, "height": 64, "width": 64, "steps": 2}


def request(**kw: object) -> pb.GenerateRequest:
    fields: dict[str, object] = {
        "prompt": "a red ball",
        "first_frame_image": image_bytes(seed=1),
        "seed": 11,
        **SMALL,
    }
    fields.update(kw)
    return pb.GenerateRequest(**fields)  # type: ignore[arg-type]


def run(stub, req: pb.GenerateRequest, timeout: float = 60) -> tuple[list[pb.Progress], pb.GenerationResult]:  # type: ignore[no-untyped-def]
    progress: list[pb.Progress] = []
    result = None
    for event in stub.Generate(req, timeout=timeout):
        if event.HasField("progress"):
            progress.append(event.progress)
        else:
            result = event.result
    assert result is not None, "the stream ended without a result"
    return progress, result


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url, timeout=5).text
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else 0.0


def settings(tmp: Path, model_dir: Path, **kw: object) -> InferenceSettings:
    base: dict[str, object] = {
        "port": 0,
        "metrics_port": 0,
        "base_model": str(model_dir),
        "cache_dir": tmp / "cache",
        "poll_seconds": 0.2,
        "default_frames": 4,
        "default_height": 64,
        "default_width": 64,
        "default_steps": 2,
        "max_steps": 500,
        "dev_mode": True,
        "first_frame_prefixes": ["frames/"],
    }
    base.update(kw)
    return InferenceSettings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny_model_dir, root / "a", seed=1).parent,
        "b": make_adapter(tiny_model_dir, root / "b", seed=2).parent,
        "c": make_adapter(tiny_model_dir, root / "c", seed=3).parent,
        "nan": make_adapter(tiny_model_dir, root / "nan", seed=4, nan=True).parent,
    }


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    """One server for the read-mostly tests: ckpt-a current, ckpt-b pinned, small queue bounds."""
    tmp = tmp_path_factory.mktemp("grpc-server")
    store = LocalStore(tmp / "store")
    publish_checkpoint(store, "ckpt-ft-a-10", adapters["a"])
    publish_checkpoint(store, "ckpt-ft-b-20", adapters["b"])
    set_rollout(store, "default", "ckpt-ft-a-10")
    s = settings(
        tmp, tiny_model_dir, checkpoints=["ckpt-ft-b-20"], max_image_bytes=200_000, max_image_pixels=512 * 512
    )
    srv = ServerThread(s, store).start()
    yield srv
    srv.stop()


@pytest.fixture()
def stub(server: ServerThread) -> Iterator:  # type: ignore[type-arg]
    channel = server.channel()
    yield server.stub(channel)
    channel.close()


# --------------------------------------------------------------------------------------- generation
def test_streamed_generation_returns_a_decodable_mp4(stub, server: ServerThread) -> None:  # type: ignore[no-untyped-def]
    progress, result = run(stub, request(frames=5, height=64, width=96, steps=3, fps=10))
    steps = [p.step for p in progress if p.queue_position == 0 and p.step > 0]
    assert steps == [1, 2, 3] and all(p.total == 3 for p in progress)
    assert result.mime_type == "video/mp4" and result.output_format == pb.OUTPUT_FORMAT_MP4
    frames, fps = read_video(result.video_bytes)
    assert frames.shape == (5, 64, 96, 3) and fps == pytest.approx(10)
    assert (result.frames, result.height, result.width) == (5, 64, 96)
    assert result.size_bytes == len(result.video_bytes)
    assert result.checkpoint_id == "ckpt-ft-a-10" and result.seed == 11
    t = result.timings
    assert t.total_seconds >= t.denoise_seconds > 0 and t.encode_seconds > 0 and result.request_id


def test_same_seed_same_video_and_gif_output(stub) -> None:  # type: ignore[no-untyped-def]
    _, r1 = run(stub, request(output_format=pb.OUTPUT_FORMAT_GIF, seed=5))
    _, r2 = run(stub, request(output_format=pb.OUTPUT_FORMAT_GIF, seed=5))
    assert r1.mime_type == "image/gif" and r1.video_bytes[:6] in (b"GIF89a", b"GIF87a")
    f1, f2 = read_video(r1.video_bytes)[0], read_video(r2.video_bytes)[0]
    assert f1.shape == f2.shape == (4, 64, 64, 3)
    # same seed: the same video up to float noise of multithreaded CPU kernels (GIF palettes amplify it)
    diff = np.abs(f1.astype(int) - f2.astype(int))
    assert diff.mean() < 2.0, diff.mean()
    _, r3 = run(stub, request(output_format=pb.OUTPUT_FORMAT_GIF, seed=6))
    assert np.abs(read_video(r3.video_bytes)[0].astype(int) - f1.astype(int)).mean() > diff.mean()


def test_without_a_first_frame_and_without_a_seed(stub) -> None:  # type: ignore[no-untyped-def]
    req = pb.GenerateRequest(prompt="a red ball", **SMALL)  # type: ignore[arg-type]
    _, result = run(stub, req)
    assert read_video(result.video_bytes)[0].shape == (4, 64, 64, 3)
    assert result.seed >= 0


def test_several_adapters_are_served_side_by_side(stub) -> None:  # type: ignore[no-untyped-def]
    videos = {}
    for ckpt in ("ckpt-ft-a-10", "ckpt-ft-b-20", "base"):
        _, result = run(stub, request(checkpoint_id=ckpt, output_format=pb.OUTPUT_FORMAT_GIF))
        assert result.checkpoint_id == ckpt
        videos[ckpt] = read_video(result.video_bytes)[0]
    assert (videos["ckpt-ft-a-10"] != videos["ckpt-ft-b-20"]).any()
    assert (videos["ckpt-ft-a-10"] != videos["base"]).any()
    with pytest.raises(grpc.RpcError) as err:
        run(stub, request(checkpoint_id="ckpt-nope-1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "checkpoint 'ckpt-nope-1' is not loaded" in (err.value.details() or "")


def test_compatible_queued_requests_run_as_one_batch(stub, server: ServerThread) -> None:  # type: ignore[no-untyped-def]
    url = server.metrics_url
    # Hold the model thread with a long request so the next ones queue up together.
    blocker = stub.Generate(request(steps=500, seed=99), timeout=120)
    _wait_first_step(blocker)
    before = metric(url, "huvidpo_inference_batch_size_count")
    with ThreadPoolExecutor(5) as pool:
        same = [pool.submit(run, stub, request(seed=100 + i)) for i in range(3)]
        other = pool.submit(run, stub, request(seed=200, steps=3))  # different steps: not compatible
        _wait_metric(url, "huvidpo_inference_requests_queued", 4)
        blocker.cancel()
        results = [f.result()[1] for f in same]
        other_result = other.result()[1]
    assert sorted(r.seed for r in results) == [100, 101, 102]
    assert [r.batch_size for r in results] == [3, 3, 3] and other_result.batch_size == 1
    assert metric(url, "huvidpo_inference_batch_size_count") - before == 2
    # batching changes nothing about a request's own result
    alone = run(stub, request(seed=101))[1]
    a, b = read_video(alone.video_bytes)[0], read_video(results[1].video_bytes)[0]
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0


def test_list_and_get_models_report_digests_and_lineage(stub) -> None:  # type: ignore[no-untyped-def]
    listing = stub.ListModels(pb.ListModelsRequest())
    by_id = {m.id: m for m in listing.models}
    assert by_id["base"].role == pb.MODEL_ROLE_BASE and len(by_id["base"].digest) == 64
    a = by_id["ckpt-ft-a-10"]
    assert a.role == pb.MODEL_ROLE_CURRENT and len(a.digest) == 64 and len(a.manifest_sha256) == 64
    assert a.lineage.finetune_id == "ft-test" and a.lineage.dataset_digest == "d" * 64
    assert '"beta": 500' in a.lineage.config_json
    assert by_id["ckpt-ft-b-20"].role == pb.MODEL_ROLE_PINNED
    assert listing.rollout.current == "ckpt-ft-a-10" and listing.rollout.revision == 1
    got = stub.GetModel(pb.GetModelRequest(id="ckpt-ft-a-10")).model
    assert got.digest == a.digest
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(pb.GetModelRequest(id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_metrics(server: ServerThread) -> None:
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "huvidpo.v1.VideoGenerationService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    text = httpx.get(server.metrics_url, timeout=5).text
    for name in (
        "huvidpo_inference_generation_seconds_bucket",
        "huvidpo_inference_denoising_steps_per_second",
        "huvidpo_inference_requests_in_flight",
        "huvidpo_inference_requests_queued",
        "huvidpo_inference_batch_size_bucket",
        "huvidpo_inference_loaded_checkpoint_info",
        "huvidpo_inference_rollout_outcomes_total",
    ):
        assert name in text, name
    assert re.search(
        r'huvidpo_inference_loaded_checkpoint_info\{checkpoint="ckpt-ft-a-10",digest="[0-9a-f]{16}",role="current"\} 1',
        text,
    )


# --------------------------------------------------------------------------------------- bad input
BAD: dict[str, tuple[dict[str, object], str]] = {
    "frames_below_bound": ({"frames": 1}, "frames must be between 2 and 32, got 1"),
    "frames_above_bound": ({"frames": 33}, "frames must be between 2 and 32, got 33"),
    "size_not_divisible_by_8": ({"width": 100}, "width must be divisible by 8"),
    "size_above_bound": ({"height": 2048}, "height must be between 32 and 1024 pixels, got 2048"),
    "size_below_bound": ({"height": 16}, "height must be between 32 and 1024 pixels, got 16"),
    "steps_above_bound": ({"steps": 501}, "steps must be between 1 and 500, got 501"),
    "image_too_many_bytes": (
        {"first_frame_image": b"\0" * 200_001},
        "first_frame_image is 200001 bytes; at most 200000",
    ),
    "image_too_many_pixels": (
        {"first_frame_image": image_bytes(1024, 512, "JPEG")},
        "is 1024x512 = 524288 pixels; at most 262144",
    ),
    "undecodable_image": (
        {"first_frame_image": b"this is not an image"},
        "could not be decoded as PNG, JPEG or WebP",
    ),
    "prompt_too_many_chars": ({"prompt": "x" * 2001}, "prompt is 2001 characters; at most 2000"),
    "prompt_too_many_tokens": (
        {"prompt": "a cat " * 40},
        "tokens; the text encoder takes at most",
    ),
    "uri_in_another_bucket": (
        {"first_frame_uri": "s3://elsewhere/x.png"},
        "must name an object in bucket 'huvidpo'",
    ),
    "uri_missing_object": (
        {"first_frame_uri": "s3://huvidpo/frames/missing.png"},
        "does not exist or may not be read",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_invalid_argument_saying_what_to_fix(stub, case: str) -> None:  # type: ignore[no-untyped-def]
    fields, message = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        run(stub, request(**fields), timeout=20)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")


def test_first_frame_from_the_store(stub, server: ServerThread) -> None:  # type: ignore[no-untyped-def]
    server.server.store.put_bytes("frames/first.webp", image_bytes(80, 64, "WEBP", seed=3))
    _, result = run(stub, request(first_frame_uri="s3://huvidpo/frames/first.webp"))
    assert read_video(result.video_bytes)[0].shape == (4, 64, 64, 3)


def _thin_png() -> bytes:
    """The 72-byte-class probe: a 600x1 PNG (600 pixels, far under any limit on its own)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (600, 1), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS


def _peak_rss() -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_a_thin_first_frame_is_refused_by_its_resized_pixel_count(stub, server: ServerThread) -> None:  # type: ignore[no-untyped-def]
    """600x1 resized to cover 32x1024 is 614400x1024 pixels (2.4 GB decoded): refused from the header,
    by upload and by store URI, and the server's memory (this process) does not grow for it."""
    png = _thin_png()
    server.server.store.put_bytes("frames/thin.png", png)
    _peak_rss_reset()
    before = _peak_rss()
    for first in ({"first_frame_image": png}, {"first_frame_uri": "s3://huvidpo/frames/thin.png"}):
        with pytest.raises(grpc.RpcError) as err:
            run(stub, request(**first, height=1024, width=32), timeout=20)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details() or ""
        assert "is 600x1" in details and "614400x1024" in details, details
        assert "at most 262144 pixels (max_image_pixels)" in details, details
    grown = _peak_rss() - before
    assert grown < 64 * 1024 * 1024, f"peak RSS grew by {grown / 2**20:.0f} MiB"


def test_first_frame_uri_outside_the_readable_prefixes_answers_like_a_missing_key(  # type: ignore[no-untyped-def]
    stub, server: ServerThread
) -> None:
    """An existing object outside ``first_frame_prefixes`` (500 KB of
    bytes) and a key that does not exist get the same code and message, and no size."""
    server.server.store.put_bytes("secret/exists.png", b"\x89PNG" + b"\0" * 500_000)
    answers = []
    for key in ("secret/exists.png", "secret/missing.png"):
        with pytest.raises(grpc.RpcError) as err:
            run(stub, request(first_frame_uri=f"s3://huvidpo/{key}"), timeout=20)
        answers.append((err.value.code(), (err.value.details() or "").replace(key, "KEY")))
    assert answers[0] == answers[1], answers
    assert answers[0][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "500" not in answers[0][1] and "bytes" not in answers[0][1]


# --------------------------------------------------------------------------------------- cancel, queue
def _wait_first_step(stream: Iterator[pb.GenerateResponse]) -> None:
    for event in stream:
        if event.HasField("progress") and event.progress.step >= 1:
            return
    raise AssertionError("no denoising step reported")


def _wait_metric(url: str, name: str, value: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while metric(url, name) != value:
        assert time.monotonic() < deadline, f"{name} did not reach {value}"
        time.sleep(0.05)


def test_client_cancel_stops_generation_within_a_step(stub, server: ServerThread) -> None:  # type: ignore[no-untyped-def]
    url = server.metrics_url
    stream = stub.Generate(request(steps=500, seed=1), timeout=120)
    _wait_first_step(stream)
    stream.cancel()
    _wait_metric(url, "huvidpo_inference_requests_in_flight", 0)
    steps_after_stop = metric(url, "huvidpo_inference_denoising_steps_total")
    time.sleep(0.5)
    assert metric(url, "huvidpo_inference_denoising_steps_total") == steps_after_stop
    assert metric(url, "huvidpo_inference_requests_total", 'code="CANCELLED"') >= 1
    run(stub, request())  # the model thread is free again


def test_deadline_stops_generation(stub, server: ServerThread) -> None:  # type: ignore[no-untyped-def]
    url = server.metrics_url
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        run(stub, request(steps=500, seed=2), timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_metric(url, "huvidpo_inference_requests_in_flight", 0)
    assert time.monotonic() - t0 < 10
    steps = metric(url, "huvidpo_inference_denoising_steps_total")
    time.sleep(0.5)
    assert metric(url, "huvidpo_inference_denoising_steps_total") == steps


def test_queue_full_is_resource_exhausted(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    s = settings(tmp_path, tiny_model_dir, max_queue=1, max_batch=1)
    with ServerThread(s, store).start() as srv, srv.channel() as channel:
        stub = srv.stub(channel)
        running = stub.Generate(request(steps=500), timeout=120)
        _wait_first_step(running)
        queued = stub.Generate(request(steps=500, seed=3), timeout=120)
        first = next(queued)
        assert first.progress.queue_position == 1
        with pytest.raises(grpc.RpcError) as err:
            run(stub, request(), timeout=20)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full (1 of 1 waiting); retry later" in (err.value.details() or "")
        running.cancel()
        queued.cancel()


# --------------------------------------------------------------------------------------- readiness
def test_not_serving_until_the_model_is_loaded(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    s = settings(tmp_path, tiny_model_dir, base_model="models/tiny")
    with ServerThread(s, store).start(wait_ready=False) as srv, srv.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            run(srv.stub(channel), request(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no model is loaded yet" in (err.value.details() or "")
        assert metric(srv.metrics_url, "huvidpo_inference_ready") == 0
        publish_dir(store, tiny_model_dir, "models/tiny/")  # the base model appears in the store
        srv.wait_ready(60)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        _, result = run(srv.stub(channel), request())
        assert result.checkpoint_id == "base"


def test_large_video_comes_back_as_a_download_url(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", presign_secret="s3cret")
    s = settings(tmp_path, tiny_model_dir, inline_limit_bytes=100)
    with ServerThread(s, store).start() as srv, srv.channel() as channel:
        _, result = run(srv.stub(channel), request())
    assert result.WhichOneof("video") == "download_url" and not result.video_bytes
    assert result.url_expires_at.seconds > time.time() + 3000
    keys = [o.key for o in store.list("generations/default/")]
    assert keys == [f"generations/default/{result.request_id}.mp4"]
    assert result.download_url.startswith("http") and result.request_id in result.download_url
    frames, _ = read_video(store.get_bytes(keys[0]))
    assert frames.shape == (4, 64, 64, 3) and result.size_bytes == store.stat(keys[0]).size  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------- rollouts
@pytest.mark.slow
def test_hot_swap_under_concurrent_load_loses_no_request(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    publish_checkpoint(store, "ckpt-ft-a-10", adapters["a"])
    publish_checkpoint(store, "ckpt-ft-c-30", adapters["c"])
    set_rollout(store, "default", "ckpt-ft-a-10")
    s = settings(tmp_path, tiny_model_dir, max_queue=32)
    failures: list[BaseException] = []
    served: list[str] = []
    stop = threading.Event()
    with ServerThread(s, store).start() as srv, srv.channel() as channel:
        stub = srv.stub(channel)

        def client(i: int) -> None:
            n = 0
            while not stop.is_set():
                try:
                    served.append(run(stub, request(seed=i * 1000 + n), timeout=60)[1].checkpoint_id)
                except BaseException as exc:  # every failure counts
                    failures.append(exc)
                n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(served) < 4:
            assert time.monotonic() < deadline and not failures, "no load before the swap"
            time.sleep(0.05)
        set_rollout(store, "default", "ckpt-ft-c-30")
        while stub.ListModels(pb.ListModelsRequest()).rollout.current != "ckpt-ft-c-30":
            assert time.monotonic() < deadline, "the rollout was not applied"
            time.sleep(0.05)
        while served.count("ckpt-ft-c-30") < 8:
            assert time.monotonic() < deadline and not failures, "no load after the swap"
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
        listing = stub.ListModels(pb.ListModelsRequest())
        outcomes = metric(srv.metrics_url, "huvidpo_inference_rollout_outcomes_total", 'outcome="applied"')
    assert not failures, failures[:3]
    assert "ckpt-ft-a-10" in served and "ckpt-ft-c-30" in served
    # once swapped, everything after the swap point is on the new checkpoint
    first_new = served.index("ckpt-ft-c-30")
    assert served[first_new + 6 :].count("ckpt-ft-a-10") == 0
    assert outcomes == 2  # the initial current, then the swap
    roles = {m.id: m.role for m in listing.models}
    assert roles.get("ckpt-ft-c-30") == pb.MODEL_ROLE_CURRENT and "ckpt-ft-a-10" not in roles  # retired


def test_bad_checkpoints_are_refused_while_the_old_one_serves(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    publish_checkpoint(store, "ckpt-ft-a-10", adapters["a"])
    set_rollout(store, "default", "ckpt-ft-a-10")
    # 1) corrupt: a weights file changed after its manifest was written
    publish_checkpoint(store, "ckpt-ft-bad-1", adapters["b"])
    key = "checkpoints/ckpt-ft-bad-1/adapter/adapter_model.safetensors"
    data = bytearray(store.get_bytes(key))
    data[-10] ^= 0xFF
    store.put_bytes(key, bytes(data))
    # 2) a pickle next to the weights
    pickled = tmp_path / "pickled"
    (pickled / "adapter").mkdir(parents=True)
    for f in adapters["b"].joinpath("adapter").iterdir():
        (pickled / "adapter" / f.name).write_bytes(f.read_bytes())
    (pickled / "adapter" / "extra.bin").write_bytes(b"\x80\x04pickle")
    publish_checkpoint(store, "ckpt-ft-bad-2", pickled)
    # 3) loads, but its weights are NaN: the smoke generation catches it
    publish_checkpoint(store, "ckpt-ft-bad-3", adapters["nan"])
    s = settings(tmp_path, tiny_model_dir)
    with ServerThread(s, store).start() as srv, srv.channel() as channel:
        stub = srv.stub(channel)
        url = srv.metrics_url
        for n, (bad, stage) in enumerate(
            [("ckpt-ft-bad-1", "checksum"), ("ckpt-ft-bad-2", "files"), ("ckpt-ft-bad-3", "smoke")], start=1
        ):
            set_rollout(store, "default", bad)
            deadline = time.monotonic() + 30
            while metric(url, "huvidpo_inference_rollout_outcomes_total", f'stage="{stage}"') < 1:
                assert time.monotonic() < deadline, f"{bad} was not refused at {stage}"
                time.sleep(0.05)
            listing = stub.ListModels(pb.ListModelsRequest())
            assert listing.rollout.current == "ckpt-ft-a-10" and listing.rollout.revision == 1 + n
            assert bad not in {m.id for m in listing.models}
            _, result = run(stub, request(seed=n))
            assert result.checkpoint_id == "ckpt-ft-a-10"
        refused = metric(url, "huvidpo_inference_rollout_outcomes_total", 'outcome="refused"')
        assert refused == 3


def test_canary_split_with_real_requests(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    publish_checkpoint(store, "ckpt-ft-a-10", adapters["a"])
    publish_checkpoint(store, "ckpt-ft-b-20", adapters["b"])
    set_rollout(store, "default", "ckpt-ft-a-10", canary="ckpt-ft-b-20", percent=50)
    s = settings(tmp_path, tiny_model_dir, routing_seed=1234)
    with ServerThread(s, store).start() as srv, srv.channel() as channel:
        stub = srv.stub(channel)
        listing = stub.ListModels(pb.ListModelsRequest())
        assert listing.rollout.canary == "ckpt-ft-b-20" and listing.rollout.canary_percent == 50
        roles = {m.id: m.role for m in listing.models}
        assert roles["ckpt-ft-b-20"] == pb.MODEL_ROLE_CANARY
        with ThreadPoolExecutor(4) as pool:
            served = list(pool.map(lambda i: run(stub, request(seed=i))[1].checkpoint_id, range(12)))
        # the router's own 200-draw split is in tests/unit; here: both arms really serve
        assert set(served) == {"ckpt-ft-a-10", "ckpt-ft-b-20"}
        # an explicit checkpoint id bypasses the split
        assert run(stub, request(checkpoint_id="ckpt-ft-a-10"))[1].checkpoint_id == "ckpt-ft-a-10"
        set_rollout(store, "default", "ckpt-ft-a-10", canary="ckpt-ft-b-20", percent=100)
        deadline = time.monotonic() + 30
        while stub.ListModels(pb.ListModelsRequest()).rollout.canary_percent != 100:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert {run(stub, request(seed=i))[1].checkpoint_id for i in range(3)} == {"ckpt-ft-b-20"}


# --------------------------------------------------------------------------------------- S3 store
def test_everything_from_s3_and_the_download_url_works(
    tiny_model_dir: Path,
    adapters: dict[str, Path],
    tmp_path: Path,
    moto_s3_endpoint: dict[str, str],
    make_s3_store,  # type: ignore[no-untyped-def]
) -> None:
    """Base model, checkpoint, rollout and first frame all come from a real S3 server (moto); the
    large result goes back to it and its presigned URL serves the video."""
    store = make_s3_store(moto_s3_endpoint)
    publish_dir(store, tiny_model_dir, "models/tiny/")
    publish_checkpoint(store, "ckpt-ft-a-10", adapters["a"])
    set_rollout(store, "default", "ckpt-ft-a-10")
    store.put_bytes("frames/first.jpg", image_bytes(96, 64, "JPEG", seed=4), content_type="image/jpeg")
    s = settings(tmp_path, tiny_model_dir, base_model="models/tiny", inline_limit_bytes=100)
    with ServerThread(s, store, bucket=store.bucket).start() as srv, srv.channel() as channel:
        _, result = run(srv.stub(channel), request(first_frame_uri=f"s3://{store.bucket}/frames/first.jpg"))
    assert result.checkpoint_id == "ckpt-ft-a-10" and result.download_url
    response = httpx.get(result.download_url, timeout=20)
    assert response.status_code == 200
    frames, _ = read_video(response.content)
    assert frames.shape == (4, 64, 64, 3) and len(response.content) == result.size_bytes


def _samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(httpx.get(url, timeout=5).text)
        for s in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metric_series_follow_the_served_checkpoints_and_base_can_be_rolled_back_to(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    publish_checkpoint(store, "ckpt-ft-a-10", adapters["a"])
    set_rollout(store, "default", "ckpt-ft-a-10")
    with ServerThread(settings(tmp_path, tiny_model_dir), store).start() as srv, srv.channel() as channel:
        stub = srv.stub(channel)
        assert run(stub, request())[1].checkpoint_id == "ckpt-ft-a-10"
        for bad in (request(frames=1), request(checkpoint_id="ckpt-typo-1")):
            with pytest.raises(grpc.RpcError):
                run(stub, bad)
        m = _samples(srv.metrics_url)
        requests = "huvidpo_inference_requests_total"
        assert _value(m, requests, code="OK", checkpoint="ckpt-ft-a-10") == 1
        # Refused before a model was chosen: one bounded label, never the client's text.
        assert _value(m, requests, code="INVALID_ARGUMENT", checkpoint="none") == 1
        assert _value(m, requests, code="NOT_FOUND", checkpoint="none") == 1
        assert not any("ckpt-typo-1" in dict(labels).values() for _, labels in m)
        assert _value(m, "huvidpo_inference_generation_seconds_count", checkpoint="ckpt-ft-a-10") == 1
        assert _value(m, "huvidpo_inference_queue_wait_seconds_count") == 1

        # Roll back to the base model ("base", as PUT /v1/rollouts/{deployment} writes it).
        set_rollout(store, "default", "base")
        deadline = time.monotonic() + 60
        while True:
            listing = stub.ListModels(pb.ListModelsRequest())
            if listing.rollout.current == "base" and all(x.id != "ckpt-ft-a-10" for x in listing.models):
                break
            assert time.monotonic() < deadline, listing
            time.sleep(0.05)
        assert run(stub, request())[1].checkpoint_id == "base"
        m = _samples(srv.metrics_url)
    # The retired checkpoint's series are gone; the base model's are there.
    assert not any("ckpt-ft-a-10" in dict(labels).values() for name, labels in m if "info" not in name)
    assert _value(m, requests, code="OK", checkpoint="base") == 1
    assert _value(m, "huvidpo_inference_generation_seconds_count", checkpoint="base") == 1
    assert _value(m, "huvidpo_inference_queue_wait_seconds_count") == 2
