"""Ratings to preference pairs, with a report.

Rules (the reference code's defects §8.6 fixed):

- Score pairs: every two rated videos **of the same prompt**; the higher mean score (over raters) is
  chosen. Equal means are ties: dropped by default (``tie_policy="drop"``, as Diffusion-DPO) or, with
  ``tie_policy="keep"`` (the reference behaviour), kept with a direction that is arbitrary but fixed
  by ``seed``. Pairs whose score difference is below ``min_margin`` are dropped.
- Choice pairs: explicit choices are used as given. When raters disagree on a pair, each rater's last
  choice is one vote and the majority wins; a tie of votes drops the pair. When a pair of videos has
  both scores and choices, the choices decide (a direct comparison beats two absolute scores).
- ``margin`` is the mean-score difference (0..10) for score pairs and the vote share difference
  ``(for - against) / votes`` (0..1] for choice pairs. ``weight`` is 1 unless ``margin_weighting``:
  then score pairs get ``margin / mean margin`` (mean weight 1, so the loss scale is unchanged) and
  choice pairs get their vote share difference.

The report counts videos, raters, pairs and what was dropped, histograms the scores, and checks for
motion bias: when chosen clips move clearly less than rejected ones (mean chosen motion below
:data:`MOTION_WARN_RATIO` of the mean rejected motion, over at least :data:`MOTION_MIN_PAIRS` pairs),
DPO would learn "move less", and the report says so.

Held-out pairs: ``holdout_fraction > 0`` holds out whole prompts (``max(1, round(prompts x fraction))``
of the prompts that have pairs, chosen by ``random.Random(holdout_seed)``, the same choice as
``huvidpo.training``'s ``holdout_by="prompt"`` with that seed), so an evaluation on them measures
prompts the fine-tune never saw. The report's counts and motion check are of the training pairs; its
``holdout`` records the fraction, the seed, the held-out prompts and their pair count.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from huvidpo.data.manifest import (
    DatasetError,
    DatasetIssue,
    PreferenceDataset,
    atomic_write_bytes,
)

TiePolicy = Literal["drop", "keep"]
TIE_EPS = 1e-9
MOTION_WARN_RATIO = 0.7
MOTION_MIN_PAIRS = 3
HISTOGRAM_BINS = 10


@dataclass(frozen=True)
class Pair:
    """One preference pair: ``chosen_id`` preferred over ``rejected_id`` under ``prompt``."""

    chosen_id: str
    rejected_id: str
    prompt: str
    margin: float
    weight: float = 1.0
    source: Literal["scores", "choices"] = "scores"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Holdout:
    """The prompts :func:`compile_pairs` held out (``holdout_fraction``, ``holdout_seed``) and their pair count."""

    fraction: float
    seed: int
    prompts: list[str]
    pairs: int


@dataclass
class MotionCheck:
    """Mean motion (0..255 grey levels, see :func:`huvidpo.data.manifest.motion_score`) of the chosen and
    rejected clips over the pairs whose two videos could be decoded."""

    pairs: int
    mean_chosen: float
    mean_rejected: float
    chosen_less_fraction: float
    warning: bool

    @property
    def ratio(self) -> float | None:
        """mean chosen motion / mean rejected motion (``None`` when nothing moves)."""
        return self.mean_chosen / self.mean_rejected if self.mean_rejected > 0 else None


@dataclass
class PairReport:
    """What :func:`compile_pairs` did. Counts are of videos, raters and pairs."""

    videos: int = 0
    rated_videos: int = 0
    prompts: int = 0
    raters: int = 0
    ratings: int = 0
    choices: int = 0
    pairs: int = 0
    pairs_from_scores: int = 0
    pairs_from_choices: int = 0
    ties_dropped: int = 0
    ties_kept: int = 0
    below_margin_dropped: int = 0
    vote_ties_dropped: int = 0
    scores_overridden_by_choices: int = 0
    score_histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    motion: MotionCheck | None = None
    motion_unavailable: int = 0
    warnings: list[str] = field(default_factory=list)
    holdout: Holdout | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.motion is not None:
            d["motion"]["ratio"] = self.motion.ratio
        return d

    def format(self) -> str:
        """A human-readable multi-line report."""
        lines = [
            f"videos        {self.videos} ({self.rated_videos} rated) in {self.prompts} prompt(s)",
            f"raters        {self.raters} ({self.ratings} ratings, {self.choices} pairwise choices)",
            f"pairs made    {self.pairs} ({self.pairs_from_scores} from scores, {self.pairs_from_choices} "
            "from choices)",
            f"ties          {self.ties_dropped} dropped, {self.ties_kept} kept",
            f"dropped       {self.below_margin_dropped} below min_margin, {self.vote_ties_dropped} tied votes, "
            f"{self.scores_overridden_by_choices} score pairs decided by choices",
            "score histogram (per rating):",
        ]
        peak = max(self.score_histogram) or 1
        for i, n in enumerate(self.score_histogram):
            hi = "10]" if i == HISTOGRAM_BINS - 1 else f"{i + 1})"
            lines.append(f"  [{i:>2}, {hi:<4} {n:>5} {'#' * round(30 * n / peak)}".rstrip())
        m = self.motion
        if m is None:
            lines.append("motion check  not run")
        else:
            ratio = f"{m.ratio:.2f}" if m.ratio is not None else "n/a"
            lines.append(
                f"motion check  chosen {m.mean_chosen:.2f} vs rejected {m.mean_rejected:.2f} (ratio {ratio}) over "
                f"{m.pairs} pairs; chosen moves less in {100 * m.chosen_less_fraction:.0f}%"
            )
        if self.motion_unavailable:
            lines.append(
                f"              motion unknown for {self.motion_unavailable} video(s) (not decodable)"
            )
        h = self.holdout
        if h is not None:
            lines.append(
                f"held out      {h.pairs} pairs of {len(h.prompts)} prompt(s) (fraction {h.fraction:g}, "
                f"seed {h.seed}): " + "; ".join(repr(p) for p in h.prompts)
            )
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass
class PairSet:
    """Compiled pairs (deterministic order: by prompt, then by video ids) and their report;
    ``heldout``: the pairs of the held-out prompts (same order), empty without a hold-out."""

    pairs: list[Pair]
    report: PairReport
    heldout: list[Pair] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)


def _tie_flip(seed: int, a: str, b: str) -> bool:
    """A direction for a tie that depends only on the seed and the two ids (not on their order)."""
    lo, hi = sorted((a, b))
    return hashlib.sha256(f"{seed}\0{lo}\0{hi}".encode()).digest()[0] & 1 == 1


def _choice_votes(ds: PreferenceDataset) -> dict[tuple[str, str], dict[str, str]]:
    """``{(id_a, id_b) sorted: {rater: winner}}``, each rater's last choice."""
    votes: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for c in ds.choices:
        key = (min(c.chosen_id, c.rejected_id), max(c.chosen_id, c.rejected_id))
        votes[key].pop(c.rater_id, None)
        votes[key][c.rater_id] = c.chosen_id
    return votes


def _video_motion(ds: PreferenceDataset, vid: str, by_file: dict[Path, float | None]) -> float | None:
    """The video's motion score; each file decoded once (``by_file``), one frame held at a time."""
    v = ds.videos[vid]
    if v.motion is None:
        from huvidpo.data.manifest import inspect_video
        from huvidpo.video_io import VideoDecodeError

        if v.path not in by_file:
            try:
                by_file[v.path] = inspect_video(v.path)[2]
            except (VideoDecodeError, OSError):
                by_file[v.path] = None
        v.motion = by_file[v.path]
    return v.motion


def check_motion(ds: PreferenceDataset, pairs: list[Pair]) -> tuple[MotionCheck | None, int]:
    """Compare the motion of chosen and rejected clips; ``(check or None, videos without motion)``."""
    ids = sorted({i for p in pairs for i in (p.chosen_id, p.rejected_id)})
    by_file: dict[Path, float | None] = {}
    motion = {i: _video_motion(ds, i, by_file) for i in ids}
    usable = [(motion[p.chosen_id], motion[p.rejected_id]) for p in pairs]
    pairs_m = [(w, lo) for w, lo in usable if w is not None and lo is not None]
    missing = sum(m is None for m in motion.values())
    if not pairs_m:
        return None, missing
    mw = sum(w for w, _ in pairs_m) / len(pairs_m)
    ml = sum(lo for _, lo in pairs_m) / len(pairs_m)
    less = sum(w < lo for w, lo in pairs_m) / len(pairs_m)
    warn = len(pairs_m) >= MOTION_MIN_PAIRS and ml > 0 and mw < MOTION_WARN_RATIO * ml
    return MotionCheck(len(pairs_m), mw, ml, less, warn), missing


def holdout_prompts(prompts: list[str] | set[str], fraction: float, seed: int) -> list[str]:
    """The prompts held out: ``max(1, round(n x fraction))`` of ``prompts`` (none when ``fraction`` is
    0), a seeded choice that depends only on the sorted prompts and ``seed``. ``ValueError`` when
    ``fraction`` is outside ``[0, 1)`` or would leave no prompt to train on."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {fraction}")
    ordered = sorted(prompts)
    if fraction == 0 or not ordered:
        return []
    n_hold = max(1, round(len(ordered) * fraction))
    if n_hold >= len(ordered):
        raise ValueError(
            f"holdout_fraction {fraction} leaves no prompt to train on ({len(ordered)} prompt(s) with pairs)"
        )
    return sorted(random.Random(seed).sample(ordered, n_hold))


def compile_pairs(
    ds: PreferenceDataset,
    tie_policy: TiePolicy | str = "drop",
    min_margin: float = 0.0,
    margin_weighting: bool = False,
    seed: int = 0,
    motion_check: bool = True,
    holdout_fraction: float = 0.0,
    holdout_seed: int = 0,
) -> PairSet:
    """Turn a dataset's scores and choices into preference pairs (rules in the module docstring).

    ``min_margin`` is in score points (0..10) and applies to score pairs only. ``tie_policy`` is
    ``"drop"`` or ``"keep"`` (``"keep_arbitrary"`` is accepted as an alias). ``motion_check`` decodes
    the videos whose motion was not measured at load time. ``holdout_fraction`` (of the prompts, in
    ``[0, 1)``) moves whole prompts' pairs to ``PairSet.heldout``, chosen by ``holdout_seed``."""
    policy = "keep" if tie_policy == "keep_arbitrary" else tie_policy
    if policy not in ("drop", "keep"):
        raise ValueError(f"tie_policy must be 'drop' or 'keep', got {tie_policy!r}")
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    if policy == "keep" and min_margin > 0:
        raise ValueError("tie_policy 'keep' with min_margin > 0 contradicts itself: ties have margin 0")

    report = PairReport(
        videos=len(ds.videos), prompts=len(ds.prompts), raters=len(ds.raters), choices=len(ds.choices)
    )
    votes = _choice_votes(ds)

    # Explicit choices, by majority.
    choice_pairs: list[Pair] = []
    for (a, b), by_rater in sorted(votes.items()):
        n_a = sum(w == a for w in by_rater.values())
        n_b = len(by_rater) - n_a
        if n_a == n_b:
            report.vote_ties_dropped += 1
            continue
        w, lo = (a, b) if n_a > n_b else (b, a)
        share = abs(n_a - n_b) / len(by_rater)
        choice_pairs.append(
            Pair(w, lo, ds.videos[w].prompt, share, share if margin_weighting else 1.0, "choices")
        )

    # Score pairs within each prompt.
    by_prompt: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for v in ds.videos.values():
        eff = v.effective_ratings
        report.ratings += len(eff)
        for r in eff:
            report.score_histogram[min(int(r.score), HISTOGRAM_BINS - 1)] += 1
        mean = v.mean_score
        if mean is not None:
            report.rated_videos += 1
            by_prompt[v.prompt].append((v.id, mean))
    score_pairs: list[Pair] = []
    for prompt in sorted(by_prompt):
        for (a, sa), (b, sb) in itertools.combinations(sorted(by_prompt[prompt]), 2):
            if (min(a, b), max(a, b)) in votes:
                report.scores_overridden_by_choices += 1
                continue
            diff = sa - sb
            if abs(diff) <= TIE_EPS:
                if policy == "drop":
                    report.ties_dropped += 1
                    continue
                report.ties_kept += 1
                w, lo = (b, a) if _tie_flip(seed, a, b) else (a, b)
                score_pairs.append(Pair(w, lo, prompt, 0.0, 1.0, "scores"))
                continue
            if abs(diff) < min_margin:
                report.below_margin_dropped += 1
                continue
            w, lo = (a, b) if diff > 0 else (b, a)
            score_pairs.append(Pair(w, lo, prompt, abs(diff), 1.0, "scores"))
    if margin_weighting and score_pairs:
        mean_margin = sum(p.margin for p in score_pairs) / len(score_pairs)
        score_pairs = [
            Pair(
                p.chosen_id,
                p.rejected_id,
                p.prompt,
                p.margin,
                p.margin / mean_margin if mean_margin > 0 else 1.0,
                p.source,
            )
            for p in score_pairs
        ]

    pairs = sorted(score_pairs + choice_pairs, key=lambda p: (p.prompt, p.source, p.chosen_id, p.rejected_id))
    heldout: list[Pair] = []
    if holdout_fraction:
        held = set(holdout_prompts({p.prompt for p in pairs}, holdout_fraction, holdout_seed))
        heldout = [p for p in pairs if p.prompt in held]
        pairs = [p for p in pairs if p.prompt not in held]
        report.holdout = Holdout(holdout_fraction, holdout_seed, sorted(held), len(heldout))
    report.pairs = len(pairs)
    report.pairs_from_scores = sum(p.source == "scores" for p in pairs)
    report.pairs_from_choices = len(pairs) - report.pairs_from_scores
    if not pairs:
        report.warnings.append("no pairs: every comparison was a tie, below min_margin or unrated")
    if motion_check and pairs:
        report.motion, report.motion_unavailable = check_motion(ds, pairs)
        if report.motion is not None and report.motion.warning:
            m = report.motion
            report.warnings.append(
                f"chosen clips move less than rejected ones (mean motion {m.mean_chosen:.2f} vs "
                f"{m.mean_rejected:.2f}, ratio {m.ratio:.2f} < {MOTION_WARN_RATIO}): the raters may prefer static "
                "clips, and DPO would learn to suppress motion"
            )
    return PairSet(pairs, report, heldout)


def write_pairs(pairset: PairSet | list[Pair], path: str | os.PathLike[str]) -> Path:
    """Write pairs as JSONL (one :class:`Pair` object per line), atomically."""
    pairs = pairset.pairs if isinstance(pairset, PairSet) else pairset
    text = "".join(json.dumps(p.to_dict(), ensure_ascii=False, sort_keys=True) + "\n" for p in pairs)
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """Read a JSONL pairs file written by :func:`write_pairs`; :class:`DatasetError` names bad lines."""
    p = Path(path)
    pairs: list[Pair] = []
    issues: list[DatasetIssue] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if not isinstance(d, dict):
                raise TypeError(f"a pair must be an object, got {type(d).__name__}")
            src = d.get("source", "scores")
            if src not in ("scores", "choices"):
                raise ValueError(f"source must be 'scores' or 'choices', got {src!r}")
            pairs.append(
                Pair(
                    str(d["chosen_id"]),
                    str(d["rejected_id"]),
                    str(d["prompt"]),
                    float(d["margin"]),
                    float(d.get("weight", 1.0)),
                    src,
                )
            )
        except KeyError as exc:
            issues.append(DatasetIssue(str(p), n, str(exc.args[0]), "missing"))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            issues.append(DatasetIssue(str(p), n, "-", str(exc)))
    if issues:
        raise DatasetError(issues)
    return pairs
