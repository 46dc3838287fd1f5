"""Helpers for tests and benchmarks of the inference service: run a real server on 127.0.0.1 in a
background thread, make and publish small LoRA checkpoints, write rollout records."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from PIL import Image

from huvidpo.lora import lora_config, save_lora
from huvidpo.models import load_components
from services.common.publish import RolloutRecord, publish_dir, read_rollout, write_rollout
from services.common.records.keys import checkpoint_prefix
from services.common.settings import InferenceSettings
from services.common.store import ObjectStore
from services.inference.gen import inference_pb2_grpc as pb_grpc
from services.inference.server import InferenceServer


class ServerThread:
    """An ``InferenceServer`` running in its own event loop on a background thread."""

    def __init__(self, settings: InferenceSettings, store: ObjectStore, bucket: str = "huvidpo") -> None:
        self.server = InferenceServer(settings, store, bucket)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="inference-server", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._started.set()
                raise
            self._started.set()
            await self._stop.wait()
            await self.server.stop(grace=1.0)

        asyncio.run(main())

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> ServerThread:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the inference server did not start")
        if self._error is not None:
            raise RuntimeError(f"the inference server failed to start: {self._error}") from self._error
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.server.manager.ready:
            if time.monotonic() > deadline:
                raise TimeoutError("the inference server did not load a model in time")
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )

    def stub(self, channel: grpc.Channel) -> pb_grpc.VideoGenerationServiceStub:
        return pb_grpc.VideoGenerationServiceStub(channel)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_adapter(
    model_dir: str | Path, out_dir: str | Path, seed: int, scale: float = 0.5, nan: bool = False
) -> Path:
    """A rank-4 LoRA adapter over the UNet of ``model_dir`` with perturbed ``lora_B`` (so it changes
    the output); ``nan`` poisons it (a checkpoint that loads but cannot generate)."""
    unet = load_components(model_dir).unet
    unet.add_adapter(lora_config(rank=4), adapter_name="default")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
                if nan:
                    p.fill_(float("nan"))
    return save_lora(unet, Path(out_dir) / "adapter", "default")


def publish_checkpoint(
    store: ObjectStore, checkpoint_id: str, local_dir: str | Path, lineage: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Publish ``local_dir`` (holding ``adapter/``) as ``checkpoints/{id}/`` with its manifest last."""
    return publish_dir(
        store,
        local_dir,
        checkpoint_prefix(checkpoint_id),
        extra_manifest={
            "id": checkpoint_id,
            "lineage": lineage
            or {
                "dataset_digest": "d" * 64,
                "base_model_digest": "",
                "finetune_id": "ft-test",
                "config": {"beta": 500},
            },
            "created_at": datetime.now(UTC).isoformat(),
        },
    )


def set_rollout(
    store: ObjectStore, deployment: str, current: str | None, canary: str | None = None, percent: int = 0
) -> RolloutRecord:
    """Write the next revision of the rollout record."""
    record = read_rollout(store, deployment) or RolloutRecord(deployment=deployment)
    return write_rollout(store, record.next("test", current=current, canary=canary, canary_percent=percent))


def image_bytes(width: int = 64, height: int = 64, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A smooth random image encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def inference_env(tmp: Path, model_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a `python -m services.inference` subprocess on 127.0.0.1 (ports chosen by the
    OS unless overridden), local store and cache under ``tmp``, base model ``model_dir``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "HF_HUB_OFFLINE": "1",
        "HUVIDPO_STORE_BACKEND": "local",
        "HUVIDPO_STORE_ROOT": str(tmp / "store"),
        "HUVIDPO_INFERENCE_HOST": "127.0.0.1",
        "HUVIDPO_INFERENCE_PORT": "0",
        "HUVIDPO_INFERENCE_METRICS_PORT": "0",
        "HUVIDPO_INFERENCE_BASE_MODEL": str(model_dir),
        "HUVIDPO_INFERENCE_CACHE_DIR": str(tmp / "cache"),
        # loopback test servers: no token needed unless the test sets HUVIDPO_TOKENS
        "HUVIDPO_DEV_MODE": "1",
    }
    env.update(overrides)
    return env
