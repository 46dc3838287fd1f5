"""Rollouts: which checkpoint each inference deployment serves, with an optional canary.

The record is ``services.common.publish.RolloutRecord`` at ``rollouts/{deployment}.json``, the
one the inference service follows. Every change increments ``revision`` and appends to ``history``;
a caller may pass the revision it read (``expected_revision``) and gets a conflict if someone
changed the rollout meanwhile. Several control-plane replicas may serve these calls at once: the
write is a compare-and-swap on the stored record's etag (``write_rollout``), so of two changes made
from the same revision one is stored and the other is answered ``Conflict``, never silently lost.

``current`` may be ``"base"``: the inference service then serves the base model without an adapter
(rolling back past every fine-tune). A deployment is created only by a caller that asks for it
(``create``), so a mistyped name is a 404, not a new record nobody follows.

``get`` adds the deployment's ``status`` (as KServe's InferenceService does): what each live inference
replica serves, from its heartbeat (``rollouts/{deployment}/replicas/``, ``records.replicas``), against
what the record asks for, and a ``Ready`` condition: True when at least one replica takes requests and
every replica that does serves the record's revision and checkpoints.
"""

from __future__ import annotations

import builtins
from typing import Any

from services.common.publish import RevisionConflict, RolloutRecord, read_rollout, write_rollout
from services.common.records.keys import BASE_MODEL, ROLLOUTS, replicas_prefix
from services.common.records.replicas import ReplicaHeartbeat
from services.common.store import ObjectNotFound, ObjectStore
from services.controlplane.domain.checkpoints import CheckpointService
from services.controlplane.domain.errors import Conflict, InvalidRequest, NotFound
from services.controlplane.domain.names import validate_name
from services.controlplane.domain.util import Clock, paginate, utcnow


class RolloutService:
    def __init__(self, store: ObjectStore, checkpoints: CheckpointService, clock: Clock = utcnow) -> None:
        self.store = store
        self.checkpoints = checkpoints
        self.clock = clock

    def _read(self, deployment: str) -> RolloutRecord | None:
        validate_name(deployment, "deployment")
        return read_rollout(self.store, deployment)

    def get(self, deployment: str) -> dict[str, Any]:
        """The rollout record with its ``status`` (served per replica, the ``Ready`` condition)."""
        rec = self._get(deployment)
        return {**rec.model_dump(mode="json"), "status": self.status(rec)}

    def _heartbeats(self, deployment: str) -> builtins.list[ReplicaHeartbeat]:
        now = self.clock()
        beats = []
        for obj in self.store.list(replicas_prefix(deployment), recursive=False):
            if not obj.key.endswith(".json"):
                continue
            try:
                beat = ReplicaHeartbeat.model_validate(self.store.get_json(obj.key))
            except (ObjectNotFound, ValueError):
                continue  # deleted meanwhile, or not a heartbeat: not a replica to report
            if beat.deployment == deployment and beat.live(now):
                beats.append(beat)
        return sorted(beats, key=lambda b: b.replica)

    def status(self, rec: RolloutRecord) -> dict[str, Any]:
        """Desired (the record) vs served (each live replica's heartbeat), and the Ready condition."""
        canary = rec.canary if rec.canary and rec.canary_percent > 0 else None
        desired = {
            "revision": rec.revision,
            "current": rec.current or BASE_MODEL,
            "canary": canary,
            "canary_percent": rec.canary_percent if canary else 0,
        }
        replicas: builtins.list[dict[str, Any]] = []
        for b in self._heartbeats(rec.deployment):
            served = {
                "revision": b.revision,
                "current": b.current or BASE_MODEL,
                "canary": b.canary,
                "canary_percent": b.canary_percent if b.canary else 0,
            }
            replicas.append(
                {
                    "replica": b.replica,
                    "state": b.state,
                    **served,
                    "updated_at": b.updated_at.isoformat(),
                    "up_to_date": b.state == "serving" and served == desired,
                }
            )
        taking = [r for r in replicas if r["state"] != "draining"]
        behind = [r["replica"] for r in taking if not r["up_to_date"]]
        if not taking:
            ready = ("False", "NoReplicas", "no live inference replica reports for this deployment")
        elif behind:
            ready = (
                "False",
                "ReplicasNotUpToDate",
                f"{len(behind)} of {len(taking)} replicas do not serve revision {rec.revision} yet: "
                + ", ".join(behind),
            )
        else:
            ready = ("True", "UpToDate", f"all {len(taking)} replicas serve revision {rec.revision}")
        return {
            "desired": desired,
            "replicas": replicas,
            "conditions": [{"type": "Ready", "status": ready[0], "reason": ready[1], "message": ready[2]}],
        }

    def _get(self, deployment: str) -> RolloutRecord:
        rec = self._read(deployment)
        if rec is None:
            raise NotFound(f"deployment {deployment!r} has no rollout yet")
        return rec

    def list(
        self, page_size: int = 50, page_token: str | None = None
    ) -> tuple[builtins.list[dict[str, Any]], str | None]:
        names = self._names()
        page, token = paginate(names, lambda n: n, page_size, page_token)
        out = []
        for n in page:
            try:
                rec = read_rollout(self.store, n)
            except ValueError:
                continue  # a name the record model refuses: not ours
            if rec is not None:
                out.append(rec.model_dump(mode="json"))
        return out, token

    def _names(self) -> builtins.list[str]:
        return sorted(
            o.key[len(ROLLOUTS) : -len(".json")]
            for o in self.store.list(ROLLOUTS, recursive=False)
            if o.key.endswith(".json")
        )

    def _servable(self, checkpoint_id: str) -> bool:
        return checkpoint_id == BASE_MODEL or self.checkpoints.exists(checkpoint_id)

    def _require_checkpoint(self, checkpoint_id: str, field: str, base_ok: bool = True) -> None:
        if checkpoint_id == BASE_MODEL:
            if not base_ok:
                raise InvalidRequest(f"{BASE_MODEL!r} is the base model, not a checkpoint", field=field)
            return
        if not self.checkpoints.exists(checkpoint_id):
            raise InvalidRequest(
                f"checkpoint {checkpoint_id!r} does not exist (or is not published)", field=field
            )

    def _write(
        self,
        deployment: str,
        prev: RolloutRecord | None,
        action: str,
        current: str | None,
        canary: str | None,
        percent: int,
        expected_revision: int | None,
        actor: str = "",
        policy: dict[str, Any] | None = None,
        decision: str | None = None,
        reasons: builtins.list[str] | None = None,
    ) -> dict[str, Any]:
        base = prev or RolloutRecord(deployment=deployment)
        if expected_revision is not None and expected_revision != base.revision:
            raise Conflict(
                f"rollout of {deployment!r} is at revision {base.revision}, not {expected_revision}; re-read and retry",
                field="expected_revision",
            )
        rec = base.next(
            action,
            current=current,
            canary=canary,
            canary_percent=percent,
            now=self.clock(),
            actor=actor,
            policy=policy,
            decision=decision,
            reasons=reasons,
        )
        try:
            write_rollout(self.store, rec)
        except RevisionConflict as exc:
            raise Conflict(str(exc), field="expected_revision") from exc
        return rec.model_dump(mode="json")

    def set_current(
        self,
        deployment: str,
        checkpoint: str,
        expected_revision: int | None = None,
        create: bool = False,
        actor: str = "",
    ) -> dict[str, Any]:
        """Serve ``checkpoint`` (or ``"base"``, the base model) to all traffic (drops any canary).
        A deployment without a rollout record is created only with ``create``."""
        prev = self._read(deployment)
        self._require_checkpoint(checkpoint, "checkpoint")
        if prev is None and not create:
            raise NotFound(
                f"deployment {deployment!r} has no rollout (existing: {self._names()}); "
                "to start a new deployment, repeat the request with ?create=true"
            )
        return self._write(deployment, prev, "set_current", checkpoint, None, 0, expected_revision, actor)

    def set_canary(
        self,
        deployment: str,
        checkpoint: str,
        percent: int,
        expected_revision: int | None = None,
        actor: str = "",
        policy: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send ``percent`` of requests to ``checkpoint``; the rest keep the current one. With a
        ``policy`` the rollout gate (``domain/gate.py``) promotes or rolls the canary back."""
        if not 0 < percent <= 100:
            raise InvalidRequest("percent must be in [1, 100]", field="percent")
        prev = self._read(deployment)
        if prev is None or not prev.current:
            raise Conflict(
                f"deployment {deployment!r} has no current checkpoint to canary against; set one first"
            )
        self._require_checkpoint(checkpoint, "checkpoint", base_ok=False)
        if checkpoint == prev.current:
            raise InvalidRequest("the canary must differ from the current checkpoint", field="checkpoint")
        return self._write(
            deployment,
            prev,
            "set_canary",
            prev.current,
            checkpoint,
            percent,
            expected_revision,
            actor,
            policy=policy,
        )

    def promote(
        self, deployment: str, expected_revision: int | None = None, actor: str = ""
    ) -> dict[str, Any]:
        """The canary becomes the current checkpoint for all traffic."""
        prev = self._get(deployment)
        if not prev.canary:
            raise Conflict(f"deployment {deployment!r} has no canary to promote")
        return self._write(deployment, prev, "promote", prev.canary, None, 0, expected_revision, actor)

    def rollback(
        self, deployment: str, expected_revision: int | None = None, actor: str = ""
    ) -> dict[str, Any]:
        """Drop the canary if there is one; otherwise go back to the previous current checkpoint."""
        prev = self._get(deployment)
        if prev.canary:
            return self._write(deployment, prev, "rollback", prev.current, None, 0, expected_revision, actor)
        for event in reversed(prev.history):
            if event.current and event.current != prev.current and self._servable(event.current):
                return self._write(
                    deployment, prev, "rollback", event.current, None, 0, expected_revision, actor
                )
        raise Conflict(f"deployment {deployment!r} has no earlier checkpoint to roll back to")

    # -- for the rollout gate (domain/gate.py) -------------------------------------------------
    def read(self, deployment: str) -> RolloutRecord | None:
        return self._read(deployment)

    def heartbeats(self, deployment: str) -> builtins.list[ReplicaHeartbeat]:
        """The live replicas' heartbeats."""
        return self._heartbeats(deployment)

    def names(self) -> builtins.list[str]:
        return self._names()

    def gate_write(
        self,
        rec: RolloutRecord,
        action: str,
        current: str | None,
        decision: str,
        reasons: builtins.list[str],
        actor: str,
    ) -> dict[str, Any]:
        """The gate's promote or rollback of ``rec``'s canary (``Conflict`` if ``rec`` is stale)."""
        return self._write(
            rec.deployment,
            rec,
            action,
            current,
            None,
            0,
            rec.revision,
            actor,
            decision=decision,
            reasons=reasons,
        )

    def history(self, deployment: str) -> builtins.list[dict[str, Any]]:
        return [e.model_dump(mode="json") for e in self._get(deployment).history]
