"""services.common.metrics: per-service registries, text exposition, a /metrics server on a port."""

from __future__ import annotations

import urllib.request

from prometheus_client import Counter

from services.common.metrics import build_registry, render, start_metrics_server


def test_registries_are_independent_and_render_their_own_metrics() -> None:
    a, b = build_registry(process_metrics=False), build_registry(process_metrics=False)
    Counter("huvidpo_test_requests_total", "requests", registry=a).inc(3)
    Counter("huvidpo_test_requests_total", "requests", registry=b)  # same name: no clash across registries
    body, content_type = render(a)
    assert b"huvidpo_test_requests_total 3.0" in body
    assert content_type.startswith("text/plain")
    assert b"huvidpo_test_requests_total 0.0" in render(b)[0]
    assert b"process_" not in body


def test_metrics_server_serves_the_registry_and_stops() -> None:
    registry = build_registry()
    Counter("huvidpo_test_served_total", "served", registry=registry).inc()
    server = start_metrics_server(registry, 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
    finally:
        server.stop()
    assert "huvidpo_test_served_total 1.0" in text
    assert "process_resident_memory_bytes" in text
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)
        raise AssertionError("server still answering after stop()")
    except OSError:
        pass
