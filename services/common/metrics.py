"""Small Prometheus helpers shared by the services.

Each service builds its own ``CollectorRegistry`` (so tests can create several apps in one process
without "Duplicated timeseries" errors) and either serves it on its own port (gRPC inference) or from
a route of its HTTP app (control plane ``/metrics`` via ``render``).
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)


def build_registry(process_metrics: bool = True) -> CollectorRegistry:
    """A fresh registry, with the process/platform/GC collectors unless ``process_metrics`` is False."""
    registry = CollectorRegistry(auto_describe=True)
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """(body, content type) of the text exposition of ``registry``, for a ``/metrics`` route."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


class MetricsServer:
    """A running ``/metrics`` HTTP server (a daemon thread); ``port`` is the bound port."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_port

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (``port=0`` picks a free port)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
