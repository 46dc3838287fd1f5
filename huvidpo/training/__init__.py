"""Trainers: stage 1 (temporal layers) and stage 2 (Diffusion-DPO with LoRA), callable from Python
(``run_stage1``, ``run_dpo``) and from the ``huvidpo train`` command."""

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
