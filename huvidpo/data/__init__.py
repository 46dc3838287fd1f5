"""Preference data: datasets on disk, ratings-to-pairs compiler, clip decoding, latent/text cache,
synthetic videos for tests and demos.

:class:`LatentCache` (torch) resolves lazily: the control plane reads datasets through this package
without loading torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from huvidpo._lazy import lazy_exports
from huvidpo.data.clips import ClipError, clip_span, load_clip, load_pair_clips, preprocess_clip, sample_clip
from huvidpo.data.manifest import (
    Choice,
    DatasetError,
    DatasetIssue,
    PreferenceDataset,
    Rating,
    VideoEntry,
    atomic_write_bytes,
    file_sha256,
    find_manifest,
    load_dataset,
    motion_score,
    reference_problems,
    write_manifest,
)
from huvidpo.data.pairs import (
    MotionCheck,
    Pair,
    PairReport,
    PairSet,
    check_motion,
    compile_pairs,
    read_pairs,
    write_pairs,
)
from huvidpo.data.synthetic import make_synthetic_dataset, moving_square, static_square

if TYPE_CHECKING:
    from huvidpo.data.cache import LatentCache

__getattr__, __dir__ = lazy_exports(__name__, {"LatentCache": "cache"})

__all__ = [
    "Choice",
    "ClipError",
    "DatasetError",
    "DatasetIssue",
    "LatentCache",
    "MotionCheck",
    "Pair",
    "PairReport",
    "PairSet",
    "PreferenceDataset",
    "Rating",
    "VideoEntry",
    "atomic_write_bytes",
    "check_motion",
    "clip_span",
    "compile_pairs",
    "file_sha256",
    "find_manifest",
    "load_clip",
    "load_dataset",
    "load_pair_clips",
    "make_synthetic_dataset",
    "motion_score",
    "moving_square",
    "preprocess_clip",
    "read_pairs",
    "reference_problems",
    "sample_clip",
    "static_square",
    "write_manifest",
    "write_pairs",
]
