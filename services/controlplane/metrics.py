"""Prometheus metrics of the control plane, in a registry per app (tests build several apps).

Names follow ``huvidpo_controlplane_<what>_<unit>``; labels are bounded: the route *template*
(``/v1/datasets/{name}``), never the concrete path, and the status code.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "<unmatched>"


class FineTuneStateCollector(Collector):
    """``huvidpo_controlplane_finetunes{state}`` computed from the store at scrape time (cached briefly)."""

    def __init__(self, count: Callable[[], dict[str, int]], ttl_seconds: float = 10.0) -> None:
        self._count = count
        self._ttl = ttl_seconds
        self._cached: tuple[float, dict[str, int]] | None = None

    def collect(self):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self._ttl:
            try:
                self._cached = (now, self._count())
            except Exception:
                self._cached = self._cached or (now, {})
        family = GaugeMetricFamily(
            "huvidpo_controlplane_finetunes", "Fine-tunes by recorded state", labels=["state"]
        )
        for state, n in sorted(self._cached[1].items()):
            family.add_metric([state], n)
        yield family


class EvaluationCollector(Collector):
    """Evaluations by recorded state, and each checkpoint's latest succeeded evaluation as gauges
    labelled by checkpoint id, computed from the records at scrape time (cached briefly)."""

    def __init__(
        self,
        count: Callable[[], dict[str, int]],
        latest: Callable[[], dict[str, Any]],
        ttl_seconds: float = 10.0,
    ) -> None:
        self._read = lambda: (count(), latest())
        self._ttl = ttl_seconds
        self._cached: tuple[float, tuple[dict[str, int], dict[str, Any]]] | None = None

    def collect(self):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self._ttl:
            try:
                self._cached = (now, self._read())
            except Exception:
                self._cached = self._cached or (now, ({}, {}))
        counts, latest = self._cached[1]
        family = GaugeMetricFamily(
            "huvidpo_controlplane_evaluations", "Evaluations by recorded state", labels=["state"]
        )
        for state, n in sorted(counts.items()):
            family.add_metric([state], n)
        yield family
        gauges = {
            "heldout_accuracy": "Held-out implicit reward accuracy of the checkpoint's latest evaluation",
            "heldout_reward_margin": "Mean held-out reward margin of the checkpoint's latest evaluation",
            "motion_magnitude": "Mean optical-flow magnitude (px/frame) of the checkpoint's evaluation clips",
            "motion_ratio": "The checkpoint's motion over the base model's on the same prompts and seeds",
            "motion_collapse": "1 when the checkpoint's latest evaluation flags motion collapse, else 0",
        }
        families = {
            k: GaugeMetricFamily(f"huvidpo_evaluation_{k}", text, labels=["checkpoint"])
            for k, text in gauges.items()
        }
        for checkpoint, record in sorted(latest.items()):
            mine = record.results.get(checkpoint)
            video = mine.video if mine is not None else None
            values = {
                "heldout_accuracy": record.heldout_implicit_acc,
                "heldout_reward_margin": record.heldout_reward_margin,
                "motion_magnitude": video.motion if video is not None else None,
                "motion_ratio": mine.motion_ratio if mine is not None else None,
                "motion_collapse": None if record.motion_collapse is None else float(record.motion_collapse),
            }
            for k, v in values.items():
                if v is not None:
                    families[k].add_metric([checkpoint], float(v))
        yield from families.values()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "huvidpo_controlplane_requests_total",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "huvidpo_controlplane_request_duration_seconds",
            "HTTP request latency by route template and method",
            ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.upload_bytes = Counter(
            "huvidpo_controlplane_upload_bytes_total",
            "Bytes received in dataset uploads",
            registry=self.registry,
        )
        self.finetune_transitions = Counter(
            "huvidpo_controlplane_finetune_transitions_total",
            "Fine-tune state changes observed by this process",
            ["from_state", "to_state"],
            registry=self.registry,
        )

        self.rollout_gate_decisions = Counter(
            "huvidpo_controlplane_rollout_gate_decisions_total",
            "Rollout gate checks of canaries with a policy, by decision (promote, rollback, wait)",
            ["decision"],
            registry=self.registry,
        )
        self.rollout_automatic_rollbacks = Counter(
            "huvidpo_controlplane_rollout_automatic_rollbacks_total",
            "Canaries the rollout gate rolled back, by deployment",
            ["deployment"],
            registry=self.registry,
        )

    def gate_decision(self, deployment: str, decision: str, applied: bool) -> None:
        """One rollout gate check; a rollback this process wrote counts as an automatic rollback."""
        self.rollout_gate_decisions.labels(decision).inc()
        if decision == "rollback" and applied:
            self.rollout_automatic_rollbacks.labels(deployment).inc()

    def watch_finetunes(self, count: Callable[[], dict[str, int]]) -> None:
        self.registry.register(FineTuneStateCollector(count))

    def watch_evaluations(
        self, count: Callable[[], dict[str, int]], latest: Callable[[], dict[str, Any]]
    ) -> None:
        self.registry.register(EvaluationCollector(count, latest))


class MetricsMiddleware:
    """Pure ASGI middleware (no response buffering, so streamed bodies stay streamed)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = route_template(scope)
            method = scope.get("method", "GET")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - start)


def route_template(scope: Scope) -> str:
    """The path template of the route that served ``scope`` (or would have: a request refused by a
    middleware before routing), or ``UNMATCHED``.

    FastAPI's own routes put themselves in ``scope["route"]``. Otherwise the path is matched against
    the app's documented paths (its OpenAPI, built once) and then its plain Starlette routes
    (``/docs``, ``/redoc``, ``/openapi.json``, mounts), which the OpenAPI does not list."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return str(path)
    app = scope.get("app")
    request_path = scope.get("path", "")
    for template, pattern in _documented_paths(app):
        if pattern.fullmatch(request_path):
            return template
    for candidate in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = candidate.matches(scope)
        if match == Match.FULL and getattr(candidate, "path", None):
            return str(candidate.path)
    return UNMATCHED


def _documented_paths(app: Any) -> list[tuple[str, re.Pattern[str]]]:
    cached = getattr(getattr(app, "state", None), "path_templates", None)
    if cached is None:
        openapi = getattr(app, "openapi", None)
        paths = openapi().get("paths", {}) if callable(openapi) else {}
        # Literal paths first, so /v1/fine-tunes/x/cancel is not taken for /v1/fine-tunes/{id}.
        ordered = sorted(paths, key=lambda t: (t.count("{"), -len(t)))
        cached = [(t, re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(t)))) for t in ordered]
        if getattr(app, "state", None) is not None:
            app.state.path_templates = cached
    return list(cached)
