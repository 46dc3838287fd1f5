"""Assembly of the inference server: gRPC (service, health, reflection), metrics HTTP, the model
thread and the rollout follower. ``InferenceServer`` is what ``python -m services.inference`` runs and
what the tests start on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import load_table
from services.common.settings import InferenceSettings
from services.common.store import ObjectStore
from services.inference.auth import AuthInterceptor
from services.inference.batcher import Batcher
from services.inference.gen import inference_pb2 as pb
from services.inference.gen import inference_pb2_grpc as pb_grpc
from services.inference.manager import ModelManager
from services.inference.metrics import InferenceMetrics
from services.inference.servicer import VideoGenerationServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VideoGenerationService"].full_name


class BindError(OSError):
    """A port the server needs cannot be bound (most often: another process listens on it)."""


def _bind_error(setting: str, host: str, port: int, reason: str) -> BindError:
    return BindError(f"cannot listen on {host}:{port} ({setting}): {reason}")


def _check_free(setting: str, host: str, port: int) -> None:
    """Raise ``BindError`` if ``host:port`` cannot be bound now.

    gRPC reports a failed bind only as "Failed to bind" after logging its own error line, so the
    cause (usually "address already in use") is found here first with a plain socket, set up as
    gRPC's would be (SO_REUSEADDR on, SO_REUSEPORT off)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise _bind_error(setting, host, port, f"cannot resolve the host: {exc.strerror or exc}") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(addr)
            except OSError as exc:
                reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                raise _bind_error(setting, host, port, reason) from None


def _connection_age_options(seconds: float) -> list[tuple[str, int]]:
    """Close each client connection after ``seconds`` (GOAWAY: its running calls finish, the
    client reconnects and, with ``dns:///`` and round_robin, re-resolves the headless Service)."""
    return [("grpc.max_connection_age_ms", int(seconds * 1000))] if seconds > 0 else []


class InferenceServer:
    def __init__(self, settings: InferenceSettings, store: ObjectStore, bucket: str = "huvidpo") -> None:
        self.settings = settings
        self.store = store
        self.metrics = InferenceMetrics()
        self.manager = ModelManager(settings, store, self.metrics)
        self.batcher = Batcher(
            self.manager.run_batch,
            max_queue=settings.max_queue,
            max_batch=settings.max_batch,
            max_batch_pixels=settings.max_batch_pixels,
            batch_wait_s=settings.batch_wait_ms / 1000.0,
            metrics=self.metrics,
            after_batch=self.manager.retire_idle,
        )
        self.health = health.aio.HealthServicer()
        self.servicer = VideoGenerationServicer(
            settings, store, bucket, self.manager, self.batcher, self.metrics
        )
        # fail closed (AuthConfigError) before anything listens: see services/common/auth.py
        self.tokens = load_table(settings.auth_config(), settings.host, "huvidpo-inference")
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _set_health(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)
        log.info("health: %s", "SERVING" if ready else "NOT_SERVING")

    def _on_ready(self, ready: bool) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._set_health(ready), loop)

    async def start(self) -> None:
        """Listen (gRPC and metrics), report NOT_SERVING, and start loading in the background."""
        s = self.settings
        self._loop = asyncio.get_running_loop()
        # A first frame a little over the image limit still reaches validation (INVALID_ARGUMENT with
        # the limit in the message) instead of gRPC's own RESOURCE_EXHAUSTED.
        receive_limit = max(4 * 1024 * 1024, 2 * s.max_image_bytes + 8 * s.max_prompt_chars + 65536)
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(self.tokens, SERVICE_NAME, health_open=s.health_open)],
            options=[
                # gRPC's default SO_REUSEPORT would let a second server share the port silently and
                # split the clients between the two; a clash must be an error instead.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", receive_limit),
                ("grpc.max_send_message_length", s.inline_limit_bytes + 1024 * 1024),
                *_connection_age_options(s.max_connection_age_seconds),
            ],
        )
        pb_grpc.add_VideoGenerationServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if s.dev_mode if s.reflection is None else s.reflection:
            reflection.enable_server_reflection(
                [
                    SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ],
                server,
            )
        _check_free("HUVIDPO_INFERENCE_PORT", s.host, s.port)
        try:
            if s.tls_certfile and s.tls_keyfile:
                creds = grpc.ssl_server_credentials(
                    [(s.tls_keyfile.read_bytes(), s.tls_certfile.read_bytes())]
                )
                self.port = server.add_secure_port(f"{s.host}:{s.port}", creds)
            else:
                self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        except RuntimeError:  # grpc >= 1.5x raises instead of returning 0
            self.port = 0
        if self.port == 0:
            raise _bind_error("HUVIDPO_INFERENCE_PORT", s.host, s.port, "gRPC could not bind the address")
        try:
            self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
        except OSError as exc:
            await server.stop(None)
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise _bind_error("HUVIDPO_INFERENCE_METRICS_PORT", s.host, s.metrics_port, reason) from None
        await self._set_health(False)
        await server.start()
        self._server = server
        self.metrics.ready.set(0)
        self.batcher.start()
        self.manager.start(on_ready=self._on_ready)
        log.info("inference server on %s:%d (metrics on :%d)", s.host, self.port, self.metrics_port)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking requests, let running ones finish for ``grace`` seconds, then shut down."""
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.grace_seconds if grace is None else grace)
        await asyncio.to_thread(self.batcher.stop)
        await asyncio.to_thread(self.manager.stop)
        self.metrics.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
