"""``rollouts/{deployment}/replicas/{replica_id}.json``: what one inference replica serves.

Each replica (``services.inference.heartbeat``) rewrites its record every rollout poll; the control
plane (``GET /v1/rollouts/{name}``) reads them to show desired vs served per replica and whether the
rollout is ready (every live replica serves the record's revision), as KServe's InferenceService
status does. A replica that dies writes nothing more: its record counts as live only until
``HEARTBEAT_TTL_POLLS`` of its poll intervals have passed since ``updated_at``. A replica that shuts
down writes ``state: stopped`` last, and drops out at once.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A record not refreshed for this many of its writer's poll intervals belongs to a gone replica.
HEARTBEAT_TTL_POLLS = 3
REPLICA_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")

ReplicaState = Literal["loading", "serving", "draining", "stopped"]


def replica_id_from_host(host: str) -> str:
    """A replica id (a store key segment) from a host name: the pod name in Kubernetes (``HOSTNAME``)
    as it is; elsewhere lower-cased, other characters replaced by ``-``."""
    rid = re.sub(r"[^a-z0-9.-]+", "-", host.lower()).strip("-.")[:253]
    return rid or "replica"


class RoleTraffic(BaseModel):
    """Finished requests of one served role since the replica applied the heartbeat's ``revision``."""

    model_config = ConfigDict(extra="ignore")

    role: str  # "current" (the stable checkpoint) or "canary"
    checkpoint: str
    requests: int = Field(default=0, ge=0)
    # Requests that ended with a server-side gRPC status (not OK, INVALID_ARGUMENT, NOT_FOUND, CANCELLED).
    errors: int = Field(default=0, ge=0)


class ReplicaHeartbeat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    deployment: str
    replica: str
    state: ReplicaState
    # The rollout revision the replica has applied (0: none yet) and what it serves since: the
    # record's checkpoints, or the previous ones where it refused a checkpoint.
    revision: int = Field(default=0, ge=0)
    current: str | None = None
    canary: str | None = None
    canary_percent: int = Field(default=0, ge=0, le=100)
    poll_seconds: float = Field(gt=0)
    updated_at: datetime
    # Per role, since ``revision`` was applied (absent from replicas older than the rollout gate).
    traffic: list[RoleTraffic] = Field(default_factory=list)

    @field_validator("replica")
    @classmethod
    def _replica(cls, value: str) -> str:
        if not REPLICA_ID_RE.match(value):
            raise ValueError(f"replica id {value!r} is not a lower-case DNS name")
        return value

    @property
    def expires_at(self) -> datetime:
        return self.updated_at + timedelta(seconds=HEARTBEAT_TTL_POLLS * self.poll_seconds)

    def live(self, now: datetime | None = None) -> bool:
        """Whether this replica counts: not stopped, and refreshed within its TTL."""
        return self.state != "stopped" and (now or datetime.now(UTC)) < self.expires_at
