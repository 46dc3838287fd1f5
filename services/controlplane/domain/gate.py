"""The rollout gate: promote a canary when its policy holds, roll it back when the policy fails.

A canary set with a ``policy`` (``POST /v1/rollouts/{deployment}/canary``) is checked by the
control plane's background loop every ``HUVIDPO_CONTROLPLANE_ROLLOUT_GATE_SECONDS`` and on
``POST /v1/rollouts/{deployment}/evaluate``. Each check is one of:

- **rollback**: a condition failed for good: the canary's latest succeeded evaluation
  (``evaluations/{id}.json``) has held-out implicit accuracy below the threshold or flags motion
  collapse; its error ratio over at least ``min_requests`` requests exceeds the stable's plus the
  margin; a complete human A/B round comparing it with the stable checkpoint gives a Wilson 95%
  lower bound of its win rate <= 0.5; or the canary has waited longer than ``max_wait_seconds``.
- **wait**: nothing failed but some evidence is missing (no evaluation yet, too few requests, a
  human round still being judged).
- **promote**: every condition holds.

Promote and rollback are written as the next rollout revision (``actor`` ``rollout-gate``), with the
decision and its reasons on the history entry. A wait changes nothing that is served: it is
appended to the history of the *same* revision (so replicas do not reload and their per-revision
request counts go on), and only when its reasons differ from the last wait recorded, so a canary
waiting for hours leaves one entry, not one per check. Writes are compare-and-swap on the record's
etag, so several control-plane replicas running the loop decide once.

Request and error counts come from the live replicas' heartbeats (``records.replicas.RoleTraffic``):
per role, counted since the replica applied the rollout's revision; only replicas that report the
record's revision and canary are summed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.publish import (
    MAX_ROLLOUT_HISTORY,
    RolloutEvent,
    RolloutRecord,
    read_rollout,
    rollout_key,
)
from services.common.records.keys import BASE_MODEL
from services.common.store import ObjectNotFound, ObjectStore, PreconditionFailed
from services.controlplane.domain.errors import Conflict, NotFound
from services.controlplane.domain.preference import PreferenceService, wilson
from services.controlplane.domain.rollouts import RolloutService

log = logging.getLogger(__name__)

GATE_ACTOR = "rollout-gate"
EVALUATIONS = "evaluations/"
Decision = Literal["promote", "rollback", "wait"]


class RolloutPolicy(BaseModel):
    """When the rollout gate promotes a canary (all hold) or rolls it back (one fails for good).

    The canary's traffic share is the canary request's ``percent``."""

    model_config = ConfigDict(extra="forbid")

    min_heldout_accuracy: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="the canary's latest succeeded evaluation needs held-out implicit accuracy >= this",
    )
    require_no_motion_collapse: bool = Field(
        default=True, description="the latest succeeded evaluation must not flag motion collapse"
    )
    max_error_ratio_margin: float = Field(
        default=0.02, ge=0, le=1, description="canary error ratio <= the stable's + this margin"
    )
    min_requests: int = Field(
        default=100, ge=1, le=10_000_000, description="canary requests needed before its error ratio counts"
    )
    require_human_win: bool = Field(
        default=True,
        description="when an A/B round compares canary and stable: the Wilson 95% lower bound of the "
        "canary's win rate (complete rounds pooled, ties half) must be > 0.5",
    )
    min_raters: int = Field(default=1, ge=1, le=1000, description="raters a round needs to count as complete")
    max_wait_seconds: float | None = Field(
        default=None, gt=0, description="roll back if still undecided this long after the canary started"
    )


class EvaluationFacts(BaseModel):
    """The fields of an evaluation record (``evaluations/{id}.json``) the gate reads."""

    model_config = ConfigDict(extra="ignore")

    id: str
    checkpoint_id: str
    baseline: str | None = None
    created_at: datetime
    state: Literal["succeeded", "failed", "running", "queued"]
    heldout_implicit_acc: float | None = None
    heldout_reward_margin: float | None = None
    motion_collapse: bool | None = None


def latest_evaluation(store: ObjectStore, checkpoint_id: str) -> EvaluationFacts | None:
    """The checkpoint's most recent succeeded evaluation, or None."""
    best: EvaluationFacts | None = None
    for obj in store.list(EVALUATIONS, recursive=False):
        if not obj.key.endswith(".json"):
            continue
        try:
            ev = EvaluationFacts.model_validate(store.get_json(obj.key))
        except (ObjectNotFound, ValueError):
            continue
        if ev.checkpoint_id != checkpoint_id or ev.state != "succeeded":
            continue
        if best is None or (ev.created_at, ev.id) > (best.created_at, best.id):
            best = ev
    return best


class Verdicts:
    def __init__(self) -> None:
        self.passed: list[str] = []
        self.waiting: list[str] = []
        self.failed: list[str] = []

    def decision(self) -> tuple[Decision, list[str]]:
        if self.failed:
            return "rollback", self.failed
        if self.waiting:
            return "wait", self.waiting
        return "promote", self.passed


class RolloutGate:
    """Checks canaries against their policies and acts; knows nothing of HTTP."""

    def __init__(
        self,
        rollouts: RolloutService,
        preference: PreferenceService,
        on_decision: Callable[[str, Decision, bool], None] = lambda d, decision, applied: None,
    ) -> None:
        self.rollouts = rollouts
        self.store = rollouts.store
        self.preference = preference
        self.on_decision = on_decision

    def check(self, rec: RolloutRecord, policy: RolloutPolicy) -> tuple[Decision, list[str]]:
        """The decision for ``rec``'s canary under ``policy``, with its reasons (nothing written)."""
        assert rec.canary is not None
        canary, stable = rec.canary, rec.current or BASE_MODEL
        v = Verdicts()
        if policy.min_heldout_accuracy is not None or policy.require_no_motion_collapse:
            ev = latest_evaluation(self.store, canary)
            if ev is None:
                v.waiting.append(f"no succeeded evaluation of {canary} yet")
            else:
                self._check_evaluation(ev, policy, v)
        self._check_errors(rec, policy, v)
        if policy.require_human_win:
            self._check_human(canary, stable, policy, v)
        if not v.failed and v.waiting and policy.max_wait_seconds is not None:
            waited = (self.rollouts.clock() - rec.updated_at).total_seconds()
            if waited > policy.max_wait_seconds:
                v.failed = [
                    f"undecided after {waited:.0f} s (max_wait_seconds {policy.max_wait_seconds:g}): "
                    + "; ".join(v.waiting)
                ]
        return v.decision()

    @staticmethod
    def _check_evaluation(ev: EvaluationFacts, policy: RolloutPolicy, v: Verdicts) -> None:
        threshold = policy.min_heldout_accuracy
        if threshold is not None:
            acc = ev.heldout_implicit_acc
            if acc is None:
                v.waiting.append(f"evaluation {ev.id} has no held-out implicit accuracy (no held-out pairs?)")
            elif acc < threshold:
                v.failed.append(f"held-out implicit accuracy {acc:.3f} < {threshold:g} (evaluation {ev.id})")
            else:
                v.passed.append(f"held-out implicit accuracy {acc:.3f} >= {threshold:g} (evaluation {ev.id})")
        if policy.require_no_motion_collapse:
            if ev.motion_collapse is None:
                v.waiting.append(f"evaluation {ev.id} did not check motion collapse (no baseline?)")
            elif ev.motion_collapse:
                v.failed.append(f"motion collapse flagged by evaluation {ev.id}")
            else:
                v.passed.append(f"no motion collapse (evaluation {ev.id})")

    def _check_errors(self, rec: RolloutRecord, policy: RolloutPolicy, v: Verdicts) -> None:
        counts = {"current": [0, 0], "canary": [0, 0]}
        for beat in self.rollouts.heartbeats(rec.deployment):
            if beat.revision != rec.revision or beat.canary != rec.canary:
                continue  # not (yet) serving this canary: its counts are of another revision
            for t in beat.traffic:
                if t.role in counts:
                    counts[t.role][0] += t.requests
                    counts[t.role][1] += t.errors
        (n, errors), (sn, serrors) = counts["canary"], counts["current"]
        if n < policy.min_requests:
            v.waiting.append(f"canary served {n} of the {policy.min_requests} requests needed")
            return
        ratio, stable = errors / n, (serrors / sn if sn else 0.0)
        text = (
            f"canary error ratio {ratio:.4f} ({errors}/{n}) vs stable {stable:.4f} ({serrors}/{sn}) "
            f"+ margin {policy.max_error_ratio_margin:g}"
        )
        (v.failed if ratio > stable + policy.max_error_ratio_margin else v.passed).append(
            ("exceeds: " if ratio > stable + policy.max_error_ratio_margin else "within: ") + text
        )

    def _check_human(self, canary: str, stable: str, policy: RolloutPolicy, v: Verdicts) -> None:
        tally, pending = self.preference.head_to_head(canary, stable, policy.min_raters)
        if pending:
            names = ", ".join(f"{r.dataset}@{r.version[:12]}" for r in pending)
            v.waiting.append(
                f"human A/B round(s) comparing {canary} and {stable} still being judged: {names}"
            )
        elif tally.n == 0:
            v.passed.append(f"no human A/B round compares {canary} and {stable}: not required")
        else:
            lo, _ = wilson(tally.wins + tally.ties / 2, tally.n)
            rate = (tally.wins + tally.ties / 2) / tally.n
            text = (
                f"human win rate {rate:.3f} vs {stable} ({tally.wins} wins, {tally.ties} ties, "
                f"{tally.losses} losses), Wilson 95% lower bound {lo:.3f}"
            )
            (v.passed if lo > 0.5 else v.failed).append(text + (" > 0.5" if lo > 0.5 else " <= 0.5"))

    def evaluate(self, deployment: str) -> dict[str, Any]:
        """Check ``deployment``'s canary now and act: promote, roll back, or record the wait."""
        rec = self.rollouts.read(deployment)
        if rec is None:
            raise NotFound(f"deployment {deployment!r} has no rollout yet")
        if not rec.canary or rec.policy is None:
            raise Conflict(f"deployment {deployment!r} has no canary with a policy to evaluate")
        try:
            policy = RolloutPolicy.model_validate(rec.policy)
        except ValidationError as exc:
            raise Conflict(f"deployment {deployment!r}: its stored policy is not valid: {exc}") from exc
        decision, reasons = self.check(rec, policy)
        applied = False
        out: dict[str, Any] | None = None
        try:
            if decision == "promote":
                out = self.rollouts.gate_write(rec, "promote", rec.canary, decision, reasons, GATE_ACTOR)
                applied = True
            elif decision == "rollback":
                out = self.rollouts.gate_write(rec, "rollback", rec.current, decision, reasons, GATE_ACTOR)
                applied = True
            else:
                applied = self._record_wait(rec, reasons)
        except Conflict:
            log.info("rollout %s changed while the gate decided; the newer record stands", deployment)
        self.on_decision(deployment, decision, applied)
        log.info(
            "rollout gate %s revision %d: %s (%s)", deployment, rec.revision, decision, "; ".join(reasons)
        )
        return {
            "deployment": deployment,
            "revision": rec.revision,
            "decision": decision,
            "reasons": reasons,
            "applied": applied,
            "rollout": out if out is not None else self.rollouts.get(deployment),
        }

    def _record_wait(self, rec: RolloutRecord, reasons: list[str]) -> bool:
        """Append a wait to the history of the same revision, unless the last entry says the same."""
        last = rec.history[-1] if rec.history else None
        if last is not None and last.decision == "wait" and last.reasons == reasons:
            return False
        event = RolloutEvent(
            revision=rec.revision,
            action="gate",
            current=rec.current,
            canary=rec.canary,
            canary_percent=rec.canary_percent,
            updated_at=self.rollouts.clock(),
            actor=GATE_ACTOR,
            decision="wait",
            reasons=reasons,
        )
        key = rollout_key(rec.deployment)
        try:
            data, etag = self.store.get_json_with_etag(key)
        except ObjectNotFound:
            return False
        stored = RolloutRecord.model_validate(data)
        if stored != rec or etag is None:
            return False  # changed since it was read: the next check decides on the new record
        new = rec.model_copy(update={"history": [*rec.history, event][-MAX_ROLLOUT_HISTORY:]})
        try:
            self.store.put_json(key, new.model_dump(mode="json"), if_match=etag)
        except PreconditionFailed:
            return False
        return True

    def evaluate_all(self) -> None:
        """One pass of the background loop: every deployment whose canary has a policy."""
        for name in self.rollouts.names():
            try:
                rec = read_rollout(self.store, name)
                if rec is not None and rec.canary and rec.policy is not None:
                    self.evaluate(name)
            except Exception:  # one bad rollout must not stop the others
                log.exception("rollout gate failed on %s", name)

    def start(self, stop: threading.Event, interval: float) -> threading.Thread:
        """The background loop (a daemon thread) until ``stop`` is set."""

        def run() -> None:
            while not stop.wait(interval):
                self.evaluate_all()

        thread = threading.Thread(target=run, name="huvidpo-rollout-gate", daemon=True)
        thread.start()
        return thread
