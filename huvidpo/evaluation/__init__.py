"""Evaluation of fine-tuned checkpoints against their base model (``huvidpo eval``):

- ``video_stats``: motion, warp error (temporal consistency), flicker and first-frame fidelity of
  generated clips, from OpenCV's Farneback optical flow; motion collapse against the base;
- ``clip_score``: text-video alignment with a local CLIP directory;
- ``evaluate``: :func:`run_evaluation` (held-out pairs, generated clips, CLIP) and the comparison PNG.

Names resolve lazily: importing the package loads neither torch nor OpenCV."""

from __future__ import annotations

from typing import TYPE_CHECKING

from huvidpo._lazy import lazy_exports

if TYPE_CHECKING:
    from huvidpo.evaluation.clip_score import ClipModelError, ClipScorer, save_tiny_clip
    from huvidpo.evaluation.evaluate import (
        EvaluationError,
        EvaluationSpec,
        PromptCase,
        plot_comparison,
        read_prompt_set,
        run_evaluation,
        write_report,
    )
    from huvidpo.evaluation.video_stats import ClipStatistics, clip_statistics, motion_collapse

_EXPORTS = {
    "ClipModelError": "clip_score",
    "ClipScorer": "clip_score",
    "save_tiny_clip": "clip_score",
    "EvaluationError": "evaluate",
    "EvaluationSpec": "evaluate",
    "PromptCase": "evaluate",
    "plot_comparison": "evaluate",
    "read_prompt_set": "evaluate",
    "run_evaluation": "evaluate",
    "write_report": "evaluate",
    "ClipStatistics": "video_stats",
    "clip_statistics": "video_stats",
    "motion_collapse": "video_stats",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ClipModelError",
    "ClipScorer",
    "ClipStatistics",
    "EvaluationError",
    "EvaluationSpec",
    "PromptCase",
    "clip_statistics",
    "motion_collapse",
    "plot_comparison",
    "read_prompt_set",
    "run_evaluation",
    "save_tiny_clip",
    "write_report",
]
