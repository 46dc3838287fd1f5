"""This replica's heartbeat record (``services.common.records.replicas``): what it serves, rewritten
every rollout poll, read by the control plane's rollout status (``GET /v1/rollouts/{name}``).

The writer is its own thread so a long model load or a store outage in the rollout follower does not
silence it (a replica still loading says so). A failed write is logged and retried on the next beat.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import UTC, datetime
from typing import Any, Protocol

from services.common.records.keys import replica_key
from services.common.records.replicas import ReplicaHeartbeat, ReplicaState, replica_id_from_host
from services.common.settings import InferenceSettings
from services.common.store import ObjectStore, StoreError

log = logging.getLogger(__name__)


class Served(Protocol):
    """What the heartbeat reports (``ModelManager``)."""

    @property
    def ready(self) -> bool: ...

    def rollout_view(self) -> dict[str, Any]: ...


def replica_id(settings: InferenceSettings) -> str:
    """``HUVIDPO_INFERENCE_REPLICA_ID``, else the pod name (``HOSTNAME``), else the host name."""
    return settings.replica_id or replica_id_from_host(os.environ.get("HOSTNAME") or socket.gethostname())


class Heartbeat:
    def __init__(self, settings: InferenceSettings, store: ObjectStore, served: Served) -> None:
        self.store = store
        self.served = served
        self.deployment = settings.deployment
        self.poll_seconds = settings.poll_seconds
        self.replica = replica_id(settings)
        self.key = replica_key(self.deployment, self.replica)
        self.draining = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one write at a time (the beat thread, drain, stop)
        self._thread: threading.Thread | None = None

    def state(self) -> ReplicaState:
        if self._stop.is_set():
            return "stopped"
        if self.draining:
            return "draining"
        return "serving" if self.served.ready else "loading"

    def record(self) -> ReplicaHeartbeat:
        view = self.served.rollout_view()
        return ReplicaHeartbeat(
            deployment=self.deployment,
            replica=self.replica,
            state=self.state(),
            revision=view["revision"],
            current=view["current"] or None,
            canary=view["canary"] or None,
            canary_percent=view["canary_percent"],
            poll_seconds=self.poll_seconds,
            updated_at=datetime.now(UTC),
            traffic=view.get("traffic", []),
        )

    def beat(self) -> None:
        """Write the record now (a store error is logged; the next beat retries)."""
        with self._lock:
            try:
                self.store.put_json(self.key, self.record().model_dump(mode="json"))
            except StoreError as exc:
                log.warning("heartbeat %s not written: %s", self.key, exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="huvidpo-heartbeat", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Report ``draining`` at once (the replica no longer takes requests)."""
        self.draining = True
        self.beat()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop beating and write ``stopped`` last, so readers drop this replica at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.beat()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception:  # never let one bad beat end the heartbeat
                log.exception("heartbeat failed; retrying in %.1fs", self.poll_seconds)
            self._stop.wait(self.poll_seconds)
