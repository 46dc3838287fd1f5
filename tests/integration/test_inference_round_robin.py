"""The documented client setup (deploy/README.md, "Load that reaches every replica";
``huvidpo.client._grpc.channel``): ``round_robin`` over every replica's address spreads one client's calls over
all replicas, and a call a draining replica refuses (UNAVAILABLE) is retried on another.

The headless Service gives the ``dns:///`` target one address per ready pod; here two replicas on
127.0.0.1 stand in for them through an ``ipv4:`` target listing both (the same resolver result)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from huvidpo.client._grpc import channel
from services.common.settings import InferenceSettings
from services.common.store import LocalStore
from services.inference.gen import inference_pb2 as pb
from services.inference.gen import inference_pb2_grpc as pb_grpc
from services.inference.testing import ServerThread, image_bytes


@pytest.fixture()
def replicas(tiny_model_dir: Path, tmp_path: Path) -> Iterator[list[ServerThread]]:
    store = LocalStore(tmp_path / "store")
    started: list[ServerThread] = []
    try:
        for name in ("replica-a", "replica-b"):
            s = InferenceSettings(
                port=0,
                metrics_port=0,
                base_model=str(tiny_model_dir),
                cache_dir=tmp_path / name,
                poll_seconds=0.2,
                replica_id=name,
                dev_mode=True,  # open on 127.0.0.1
            )
            started.append(ServerThread(s, store).start())
        yield started
    finally:
        for r in started:
            r.stop()


def _generate(stub: pb_grpc.VideoGenerationServiceStub, seed: int) -> pb.GenerationResult:
    req = pb.GenerateRequest(
        prompt="a red ball",
        first_frame_image=image_bytes(seed=1),
        seed=seed,
        frames=4,
        height=64,
        width=64,
        steps=1,
    )
    (result,) = [e.result for e in stub.Generate(req, timeout=60) if e.HasField("result")]
    return result


def _requests(replica: ServerThread, code: str) -> float:
    total = 0.0
    for metric in replica.server.metrics.registry.collect():
        if metric.name == "huvidpo_inference_requests":
            total += sum(
                s.value for s in metric.samples if s.name.endswith("_total") and s.labels["code"] == code
            )
    return total


def test_round_robin_reaches_every_replica_and_retries_past_a_draining_one(
    replicas: list[ServerThread],
) -> None:
    a, b = replicas
    with channel("ipv4:" + ",".join(r.address for r in replicas)) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = pb_grpc.VideoGenerationServiceStub(ch)
        for seed in range(6):
            _generate(stub, seed)
        # round_robin alternates over the two connections: 3 and 3 (pick_first would give 6 and 0).
        assert [_requests(r, "OK") for r in replicas] == [3.0, 3.0]

        a.server.batcher.drain()  # replica a refuses new calls as on SIGTERM, its connection still up
        for seed in range(6):
            _generate(stub, 100 + seed)
    assert _requests(b, "OK") == 9.0  # every call succeeded, the ones a refused on b
    # a refused its turns (a retry can come back to it before moving on) and ran nothing more.
    assert _requests(a, "UNAVAILABLE") >= 3.0 and _requests(a, "OK") == 3.0
