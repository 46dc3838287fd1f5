"""FastAPI dependencies: the app's services, settings and auth, taken from ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from services.common.settings import ControlPlaneSettings
from services.common.store import ObjectStore
from services.controlplane.domain.checkpoints import CheckpointService
from services.controlplane.domain.datasets import DatasetService
from services.controlplane.domain.evaluations import EvaluationService
from services.controlplane.domain.finetunes import FineTuneService
from services.controlplane.domain.models import ModelService
from services.controlplane.domain.ports import Executor
from services.controlplane.domain.rollouts import RolloutService
from services.controlplane.metrics import Metrics


@dataclass
class Context:
    settings: ControlPlaneSettings
    store: ObjectStore
    executor: Executor
    datasets: DatasetService
    finetunes: FineTuneService
    checkpoints: CheckpointService
    rollouts: RolloutService
    metrics: Metrics
    cache_dir: Path
    models: ModelService
    evaluations: EvaluationService


def ctx(request: Request) -> Context:
    context: Context = request.app.state.ctx
    return context
