"""Trainers: stage 1 (temporal layers) and stage 2 (Diffusion-DPO with LoRA), callable from Python
(``run_stage1``, ``run_dpo``) and from the ``huvidpo train`` command.

Names resolve lazily, so ``huvidpo.training.config`` (what the control plane validates requests with)
imports without torch or diffusers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from huvidpo._lazy import lazy_exports

if TYPE_CHECKING:
    from huvidpo.training.callbacks import (
        CallbackBase,
        JsonlMetrics,
        LogMetrics,
        PlotMetrics,
        TrainingCallback,
        plot_metrics,
    )
    from huvidpo.training.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
    from huvidpo.training.common import TrainResult
    from huvidpo.training.config import ConfigError, DPOConfig, Stage1Config, TrainConfig
    from huvidpo.training.dpo import dpo_step, evaluate_pairs, run_dpo
    from huvidpo.training.stage1 import run_stage1, stage1_step

_EXPORTS = {
    "CallbackBase": "callbacks",
    "JsonlMetrics": "callbacks",
    "LogMetrics": "callbacks",
    "PlotMetrics": "callbacks",
    "TrainingCallback": "callbacks",
    "plot_metrics": "callbacks",
    "CheckpointError": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "list_checkpoints": "checkpoint",
    "TrainResult": "common",
    "ConfigError": "config",
    "DPOConfig": "config",
    "Stage1Config": "config",
    "TrainConfig": "config",
    "dpo_step": "dpo",
    "evaluate_pairs": "dpo",
    "run_dpo": "dpo",
    "run_stage1": "stage1",
    "stage1_step": "stage1",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "CallbackBase",
    "CheckpointError",
    "ConfigError",
    "DPOConfig",
    "JsonlMetrics",
    "LogMetrics",
    "PlotMetrics",
    "Stage1Config",
    "TrainConfig",
    "TrainResult",
    "TrainingCallback",
    "dpo_step",
    "evaluate_pairs",
    "latest_checkpoint",
    "list_checkpoints",
    "plot_metrics",
    "run_dpo",
    "run_stage1",
    "stage1_step",
]
