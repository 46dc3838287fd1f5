"""Following a deployment's rollout record ``rollouts/{deployment}.json`` from the store.

``RolloutFollower`` runs one background thread: it has the base model (and the pinned checkpoints)
loaded first, then polls the record every ``poll_seconds`` and hands each new revision to its
target (the ``ModelManager``) to load, swap and retire. It decides nothing about routing or
verification; it only says when, and keeps retrying through store outages and missing models.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from services.common.publish import NotPublished, RolloutRecord, read_rollout
from services.common.store import ObjectStore, StoreError

log = logging.getLogger(__name__)


class FollowTarget(Protocol):
    """What the follower drives (``ModelManager``)."""

    @property
    def ready(self) -> bool: ...

    @property
    def base_loaded(self) -> bool: ...

    def load_base(self) -> None: ...

    def load_pinned(self) -> None: ...

    def apply_rollout(self, record: RolloutRecord) -> None: ...

    def retire_idle(self) -> None: ...

    def set_ready(self, ready: bool) -> None: ...


class RolloutFollower:
    def __init__(
        self, target: FollowTarget, store: ObjectStore, deployment: str, poll_seconds: float
    ) -> None:
        self.target = target
        self.store = store
        self.deployment = deployment
        self.poll_seconds = poll_seconds
        self.applied_revision: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="huvidpo-rollout", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def sync(self) -> None:
        """Hand the rollout record to the target if its revision changed since the last one applied.

        An error while applying (e.g. ``StoreUnavailable``) propagates and leaves the revision
        unapplied, so the next poll retries it; a refused checkpoint is the target's to report."""
        record = read_rollout(self.store, self.deployment)
        if record is None or record.revision == self.applied_revision:
            return
        log.info(
            "rollout %s revision %d: current=%s canary=%s (%d%%)",
            record.deployment,
            record.revision,
            record.current,
            record.canary,
            record.canary_percent,
        )
        self.target.apply_rollout(record)
        self.applied_revision = record.revision

    def poll_once(self) -> None:
        """One round: load the base model if needed, apply the record, turn ready, retire idle models."""
        target = self.target
        if not target.base_loaded:
            target.load_base()
            target.load_pinned()
        # Ready only once the rollout record has been read (a store outage right after the base
        # model loaded keeps the service NOT_SERVING until the next successful poll).
        self.sync()
        if not target.ready:
            target.set_ready(True)
        target.retire_idle()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except (NotPublished, FileNotFoundError) as exc:
                log.warning("model not available yet: %s; retrying in %.1fs", exc, self.poll_seconds)
            except StoreError as exc:
                log.warning("object store error: %s; retrying in %.1fs", exc, self.poll_seconds)
            except Exception:
                log.exception("rollout follower failed; retrying in %.1fs", self.poll_seconds)
            self._stop.wait(self.poll_seconds)
