"""Prometheus metrics of the inference service, in a registry of its own (one per server, so several
servers can live in one test process), served on their own HTTP port."""

from __future__ import annotations

import contextlib
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# ``checkpoint`` label of a request refused before a model was chosen for it (bad input, unknown
# checkpoint, not ready): never the client's own text, so the label stays bounded.
NO_CHECKPOINT = "none"


class InferenceMetrics:
    """Names follow ``huvidpo_inference_<what>_<unit>``; labels hold bounded values only: checkpoint
    ids come from rollouts (never from free client input), and the series of a checkpoint are removed
    when it stops being served (``forget_checkpoint``), so they are bounded by what is loaded."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.generation_seconds = Histogram(
            "huvidpo_inference_generation_seconds",
            "Seconds from a batch's start to its decoded frames, per request, by checkpoint",
            ["checkpoint"],
            buckets=GENERATION_BUCKETS,
            registry=r,
        )
        self.denoising_steps_per_second = Gauge(
            "huvidpo_inference_denoising_steps_per_second",
            "Denoising steps per second of the last batch, counting each request of the batch",
            registry=r,
        )
        self.denoising_steps = Counter(
            "huvidpo_inference_denoising_steps_total", "Denoising steps run (one per batch step)", registry=r
        )
        self.in_flight = Gauge(
            "huvidpo_inference_requests_in_flight", "Requests whose generation is running now", registry=r
        )
        self.queued = Gauge("huvidpo_inference_requests_queued", "Requests waiting in the queue", registry=r)
        self.batch_size = Histogram(
            "huvidpo_inference_batch_size",
            "Requests per UNet batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        # By checkpoint, so canary and current error rates can be compared; join with
        # huvidpo_inference_loaded_checkpoint_info on checkpoint for the role (canary, current...).
        self.requests = Counter(
            "huvidpo_inference_requests_total",
            "Generate calls by final gRPC status code and the checkpoint that served them "
            f'("{NO_CHECKPOINT}": refused before one was chosen)',
            ["code", "checkpoint"],
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "huvidpo_inference_queue_wait_seconds",
            "Seconds a request waited in the queue: until its batch started, or until it left the "
            "queue cancelled or past its deadline",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.loaded_checkpoint = Gauge(
            "huvidpo_inference_loaded_checkpoint_info",
            "1 for every loaded model, with its role and digest",
            ["checkpoint", "role", "digest"],
            registry=r,
        )
        self.rollout_outcomes = Counter(
            "huvidpo_inference_rollout_outcomes_total",
            "Checkpoints the rollout follower applied or refused, by role and stage",
            ["outcome", "role", "stage"],
            registry=r,
        )
        self.ready = Gauge("huvidpo_inference_ready", "1 when a model is loaded and serving", registry=r)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._codes_lock = threading.Lock()
        self._codes: dict[str, set[str]] = {}

    def count_request(self, code: str, checkpoint: str) -> None:
        """One finished Generate call (``checkpoint``: the model it ran on, or ``NO_CHECKPOINT``)."""
        with self._codes_lock:
            self._codes.setdefault(checkpoint, set()).add(code)
            self.requests.labels(code, checkpoint).inc()

    def forget_checkpoint(self, checkpoint: str) -> None:
        """Drop every series labelled with ``checkpoint`` (it is no longer loaded)."""
        with self._codes_lock:
            for code in self._codes.pop(checkpoint, ()):
                self.requests.remove(code, checkpoint)
        with contextlib.suppress(KeyError):
            self.generation_seconds.remove(checkpoint)

    def serve(self, host: str, port: int) -> int:
        """Start the ``/metrics`` HTTP server; returns the bound port (``port`` 0 picks a free one)."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
