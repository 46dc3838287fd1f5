"""Prometheus metrics of a running trainer, served on ``HUVIDPO_TRAINER_METRICS_PORT`` while it trains.

A training callback sets gauges from each optimizer step's metrics; names follow
``huvidpo_trainer_<what>_<unit>`` and carry no labels (one trainer per process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from services.common.metrics import MetricsServer, build_registry, start_metrics_server


class TrainerMetrics:
    """Gauges of the latest step plus counters of steps and checkpoints (a training callback)."""

    def __init__(self) -> None:
        self.registry = build_registry()
        r = self.registry
        self.step = Gauge("huvidpo_trainer_step", "Optimizer steps done", registry=r)
        self.loss = Gauge("huvidpo_trainer_loss", "Training loss of the last step", registry=r)
        self.accuracy = Gauge(
            "huvidpo_trainer_implicit_reward_accuracy",
            "Implicit reward accuracy of the last step (DPO)",
            registry=r,
        )
        self.margin = Gauge(
            "huvidpo_trainer_reward_margin", "Implicit reward margin of the last step (DPO)", registry=r
        )
        self.step_seconds = Gauge("huvidpo_trainer_step_seconds", "Seconds of the last step", registry=r)
        self.samples_per_second = Gauge(
            "huvidpo_trainer_samples_per_second", "Training samples per second of the last step", registry=r
        )
        self.steps = Counter("huvidpo_trainer_steps_total", "Optimizer steps run by this process", registry=r)
        self.checkpoints = Counter(
            "huvidpo_trainer_checkpoints_total", "Checkpoints written by this process", registry=r
        )
        self._server: MetricsServer | None = None

    def serve(self, port: int, host: str) -> int:
        self._server = start_metrics_server(self.registry, port, host)
        return self._server.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    # training callback
    def on_step(self, metrics: dict[str, Any]) -> None:
        self.steps.inc()
        pairs = (
            ("step", self.step),
            ("loss", self.loss),
            ("implicit_acc", self.accuracy),
            ("reward_margin", self.margin),
            ("step_seconds", self.step_seconds),
            ("samples_per_second", self.samples_per_second),
        )
        for key, gauge in pairs:
            if metrics.get(key) is not None:
                gauge.set(float(metrics[key]))

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.checkpoints.inc()

    def on_end(self, summary: dict[str, Any]) -> None:
        return None
