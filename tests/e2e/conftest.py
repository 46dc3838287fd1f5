"""The whole system as processes on 127.0.0.1: control plane, inference service, trainers (local
executor), a real Prometheus, and the real S3 server of tests/integration (Ceph radosgw).

The services are started by ``demo.stack.Stack`` (the same code ``make demo`` runs) and stopped by PID.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from demo.loop import publish_base_model
from demo.stack import Stack, local_store_env
from tests.e2e.harness import Prometheus, Running, TcpProxy, store_from_env

# The real S3 server fixture of the integration tests (a session-scoped Ceph radosgw).


@pytest.fixture
def make_stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Callable[..., Running]]:
    """``make_stack(store_env=None, inference=True, **inference_settings)``: the tiny model published as
    ``models/tiny``, the control plane (local executor) and optionally the inference service."""
    made: list[Running] = []

    def make(
        store_env: dict[str, str] | None = None,
        inference: bool = True,
        extra_env: dict[str, str] | None = None,
        **inference_settings: str,
    ) -> Running:
        work = tmp_path_factory.mktemp("stack")
        env = store_env or local_store_env(work / "store")
        store = store_from_env(env)
        digest = publish_base_model(store, tiny_model_dir, "tiny")
        stack = Stack(work, env, extra_env or {})
        running = Running(stack, store, digest)
        made.append(running)
        stack.start_controlplane()
        if inference:
            settings = {
                "default_frames": "4",
                "default_height": "64",
                "default_width": "64",
                "default_steps": "2",
            }
            settings.update(inference_settings)
            stack.start_inference(settings)
        return running

    yield make
    for r in made:
        r.close()


@pytest.fixture
def prometheus() -> Iterator[Callable[[dict[str, str]], Prometheus]]:
    """``prometheus({job: metrics_url})`` starts Debian's prometheus scraping those targets at 1 s."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (apt-get install prometheus; listed in .ci/apt-packages.txt)")
    started: list[Prometheus] = []
    dirs: list[str] = []

    def start(targets: dict[str, str]) -> Prometheus:
        d = tempfile.mkdtemp(prefix="huvidpo-prom-")
        dirs.append(d)
        p = Prometheus(binary, targets, Path(d))
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[str], TcpProxy]]:
    made: list[TcpProxy] = []

    def make(target: str) -> TcpProxy:
        p = TcpProxy(target)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
