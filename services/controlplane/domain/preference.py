"""Human win rates: the rating page's A/B rounds summarised per round and per prompt.

A **round** is a dataset version whose videos come from at least two checkpoints (an on-policy sample
set, ``scripts/ab_samples.py``: video records carry ``checkpoint``); a version compiled from ratings
is not a round of its own (it copies its base's videos, so it is the base's round). The round's
comparisons are its A/B pairs (``ratings.ab_pairs``) whose two clips come from different checkpoints;
each rater's latest judgment of a pair (``ratings.resolve``) is one comparison.

**Complete**: every pair of the round has a judgment from every rater who judged any pair of it, and
at least ``min_raters`` raters judged. While any rater who started is still short of some pair, the
round is in progress and no summary is given: no win rate, interval or ranking is shown (or used by
a rollout gate) while people are still judging.

**Ties** count as half a win and half a loss: ``win_rate = (wins + ties / 2) / n`` over all ``n``
judgments, and the Wilson interval is taken of that proportion. A tie is a judgment that neither
clip is better, so it pulls the rate towards 0.5 instead of being thrown away.

**Bradley–Terry** (when a round compares more than two checkpoints): strengths ``p`` with
``P(i beats j) = p_i / (p_i + p_j)``, fitted by Hunter's MM algorithm on the judgments (ties as half
a win each way) plus one virtual tie per compared pair, so a checkpoint that never won still has a
finite strength; strengths are normalised to sum to 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.common.records.keys import BASE_MODEL
from services.controlplane.domain.ratings import RatingService, VideoInfo, ab_pairs, pair_key, resolve

Z95 = 1.959963984540054
TIES = "half"
"""How ties count: half a win and half a loss."""


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes / n`` (``(0, 1)`` when ``n`` is 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Tally:
    """Judgments of ``checkpoint`` against ``opponent``, from ``checkpoint``'s side."""

    checkpoint: str
    opponent: str
    wins: int = 0
    ties: int = 0
    losses: int = 0

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def flipped(self) -> Tally:
        return Tally(self.opponent, self.checkpoint, self.losses, self.ties, self.wins)

    def add(self, other: Tally) -> None:
        self.wins += other.wins
        self.ties += other.ties
        self.losses += other.losses

    def view(self) -> dict[str, Any]:
        rate = (self.wins + self.ties / 2) / self.n if self.n else None
        lo, hi = wilson(self.wins + self.ties / 2, self.n)
        return {
            "checkpoint": self.checkpoint,
            "opponent": self.opponent,
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "n": self.n,
            "win_rate": rate,
            "wilson_low": lo if self.n else None,
            "wilson_high": hi if self.n else None,
        }


def bradley_terry(
    names: list[str], outcomes: Iterable[tuple[str, str, float]], iterations: int = 10000, tol: float = 1e-12
) -> dict[str, float]:
    """Bradley–Terry strengths (summing to 1) by Hunter's MM algorithm.

    ``outcomes``: ``(i, j, s)`` with ``s`` = 1 (i won), 0.5 (tie) or 0 (j won). One virtual tie is
    added per compared pair (a weak prior that keeps every strength finite)."""
    idx = {n: k for k, n in enumerate(names)}
    k = len(names)
    wins = np.zeros((k, k))  # wins[i, j]: i's (fractional) wins over j
    for a, b, s in outcomes:
        i, j = idx[a], idx[b]
        wins[i, j] += s
        wins[j, i] += 1 - s
    games = wins + wins.T
    compared = games > 0
    wins = wins + 0.5 * compared  # the virtual tie
    games = wins + wins.T
    w = wins.sum(axis=1)
    p = np.full(k, 1.0 / k)
    for _ in range(iterations):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denom > 0, w / np.where(denom > 0, denom, 1), p)
        new = new / new.sum()
        if np.max(np.abs(new - p)) < tol:
            p = new
            break
        p = new
    return {n: float(p[idx[n]]) for n in names}


@dataclass
class Round:
    """One A/B round: its checkpoints, pairs (key -> (video a, video b)) and effective judgments."""

    dataset: str
    version: str
    checkpoints: list[str]
    pairs: dict[str, tuple[VideoInfo, VideoInfo]]
    # (rater, pair key) -> the winning video id, or None for a tie
    judged: dict[tuple[str, str], str | None] = field(default_factory=dict)

    @property
    def raters(self) -> list[str]:
        return sorted({r for r, _ in self.judged})

    def complete(self, min_raters: int = 1) -> bool:
        raters = self.raters
        return (
            bool(self.pairs)
            and len(raters) >= max(1, min_raters)
            and all((r, key) in self.judged for r in raters for key in self.pairs)
        )

    def tallies(self) -> tuple[dict[tuple[str, str], Tally], dict[tuple[str, str, str], Tally]]:
        """Overall tallies per checkpoint pair (sorted names, first's side) and per prompt."""
        overall: dict[tuple[str, str], Tally] = {}
        per_prompt: dict[tuple[str, str, str], Tally] = {}
        for (_, key), winner in sorted(self.judged.items()):
            a, b = self.pairs[key]
            assert a.checkpoint is not None and b.checkpoint is not None
            x, y = sorted((a.checkpoint, b.checkpoint))
            one = Tally(x, y)
            if winner is None:
                one.ties = 1
            elif (a if a.id == winner else b).checkpoint == x:
                one.wins = 1
            else:
                one.losses = 1
            overall.setdefault((x, y), Tally(x, y)).add(one)
            per_prompt.setdefault((a.prompt, x, y), Tally(x, y)).add(one)
        return overall, per_prompt

    def summary(self) -> dict[str, Any]:
        overall, per_prompt = self.tallies()
        ranking = None
        if len(self.checkpoints) > 2:
            outcomes = [
                (t.checkpoint, t.opponent, s)
                for t in overall.values()
                for s, count in ((1.0, t.wins), (0.5, t.ties), (0.0, t.losses))
                for _ in range(count)
            ]
            strengths = bradley_terry(self.checkpoints, outcomes)
            order = sorted(self.checkpoints, key=lambda c: (-strengths[c], c))
            ranking = [
                {"rank": i + 1, "checkpoint": c, "strength": strengths[c]} for i, c in enumerate(order)
            ]
        return {
            "comparisons": [t.view() for _, t in sorted(overall.items())],
            "per_prompt": [{"prompt": p, **t.view()} for (p, _, _), t in sorted(per_prompt.items())],
            "ranking": ranking,
        }

    def view(self, min_raters: int = 1) -> dict[str, Any]:
        done = self.complete(min_raters)
        raters = self.raters
        judged = sum(1 for r in raters for key in self.pairs if (r, key) in self.judged)
        return {
            "dataset": self.dataset,
            "version": self.version,
            "checkpoints": self.checkpoints,
            "pairs": len(self.pairs),
            "raters": raters,
            "min_raters": min_raters,
            "progress": {"done": judged, "total": len(self.pairs) * len(raters)},
            "complete": done,
            "ties": TIES,
            "summary": self.summary() if done else None,
        }


class PreferenceService:
    """Rounds and win rates over the rating records; knows nothing of HTTP."""

    def __init__(self, ratings: RatingService) -> None:
        self.ratings = ratings
        self.datasets = ratings.datasets

    def round(self, name: str, version: str) -> Round | None:
        """The round of one version (``None``: its videos do not come from two checkpoints)."""
        if self.ratings.root_version(name, version) != version:
            return None
        videos = self.ratings.videos(name, version)
        checkpoints = sorted({v.checkpoint for v in videos if v.checkpoint is not None})
        if len(checkpoints) < 2:
            return None
        pairs = {
            pair_key(a.id, b.id): (a, b)
            for a, b in ab_pairs(videos)
            if a.checkpoint is not None and b.checkpoint is not None and a.checkpoint != b.checkpoint
        }
        rnd = Round(name, version, checkpoints, pairs)
        for j in resolve(self.ratings.judgments(name)).effective:
            if j.kind == "score" or j.target not in pairs:
                continue
            rnd.judged[(j.rater_id, j.target)] = None if j.kind == "tie" else str(j.record["chosen"])
        return rnd

    def rounds(self, checkpoint: str | None = None) -> list[Round]:
        """Every round of every dataset (those comparing ``checkpoint`` when given), oldest first."""
        out = []
        token: str | None = None
        while True:
            page, token = self.datasets.list(200, token)
            for ds in page:
                for m in self.datasets.manifests(ds["name"]):
                    rnd = self.round(ds["name"], m["id"])
                    if rnd is not None and (checkpoint is None or checkpoint in rnd.checkpoints):
                        out.append(rnd)
            if token is None:
                return out

    def for_checkpoint(self, checkpoint: str, min_raters: int = 1) -> dict[str, Any]:
        """Every round comparing ``checkpoint``, its results seen from its side (opponent by opponent,
        per prompt), with the round's ranking; rounds in progress carry no results."""
        out = []
        for rnd in self.rounds(checkpoint):
            view = rnd.view(min_raters)
            results: dict[str, Any] | None = None
            if view["complete"]:
                overall, per_prompt = rnd.tallies()
                mine = [t if t.checkpoint == checkpoint else t.flipped() for t in overall.values()]
                mine = [t for t in mine if t.checkpoint == checkpoint]
                pooled = Tally(checkpoint, "*")
                for t in mine:
                    pooled.add(t)
                prompts = [
                    {"prompt": p, **(t if t.checkpoint == checkpoint else t.flipped()).view()}
                    for (p, x, y), t in sorted(per_prompt.items())
                    if checkpoint in (x, y)
                ]
                results = {
                    "overall": pooled.view(),
                    "opponents": [t.view() for t in sorted(mine, key=lambda t: t.opponent)],
                    "per_prompt": prompts,
                    "ranking": view["summary"]["ranking"],
                }
            view.pop("summary")
            out.append({**view, "results": results})
        return {"checkpoint": checkpoint, "ties": TIES, "rounds": out}

    def head_to_head(self, checkpoint: str, opponent: str, min_raters: int = 1) -> tuple[Tally, list[Round]]:
        """``checkpoint`` against ``opponent`` pooled over the complete rounds comparing both, and the
        rounds comparing both that are still in progress."""
        pooled = Tally(checkpoint, opponent)
        pending = []
        opponent = opponent or BASE_MODEL
        for rnd in self.rounds(checkpoint):
            if opponent not in rnd.checkpoints:
                continue
            if not rnd.complete(min_raters):
                pending.append(rnd)
                continue
            overall, _ = rnd.tallies()
            x, y = sorted((checkpoint, opponent))
            t = overall.get((x, y))
            if t is not None:
                pooled.add(t if t.checkpoint == checkpoint else t.flipped())
        return pooled, pending
