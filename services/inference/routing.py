"""Which loaded model serves a request, and which role each model holds after a rollout.

Pure functions over values: no I/O, no threads, no clock, no randomness of their own (the canary split
takes its uniform draw as an argument). ``ModelManager`` holds the state and the locks and calls these;
the tests call them directly (tests/unit/test_inference_routing.py).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from services.common.publish import RolloutRecord
from services.common.records.keys import BASE_MODEL
from services.inference.errors import UnknownCheckpoint

BASE_ID = BASE_MODEL


@dataclass(frozen=True)
class RoutingTable:
    """What serves a request that names no checkpoint: ``current`` (None or ``"base"``: the base
    model), and ``canary`` for ``canary_percent`` percent of those requests."""

    current: str | None = None
    canary: str | None = None
    canary_percent: int = 0

    @classmethod
    def wanted(cls, record: RolloutRecord) -> RoutingTable:
        """The table a rollout record asks for (before any checkpoint is verified)."""
        canary = record.canary if record.canary and record.canary_percent > 0 else None
        return cls(record.current or BASE_ID, canary, record.canary_percent if canary else 0)

    @property
    def serving(self) -> str:
        """The model that serves requests outside the canary."""
        return self.current or BASE_ID

    @property
    def splits(self) -> bool:
        """Whether a request needs a draw to choose between current and canary."""
        return self.canary is not None and self.canary_percent > 0


def canary_arm(current: str, canary: str | None, percent: int, draw: float) -> str:
    """``canary`` when ``draw`` (uniform in [0, 1)) falls in its ``percent``, else ``current``."""
    if canary is None or percent <= 0:
        return current
    return canary if draw * 100.0 < percent else current


def route(table: RoutingTable, loaded: Collection[str], requested: str = "", draw: float = 0.0) -> str:
    """The id of the model that serves a request.

    ``requested`` (the request's ``checkpoint_id``; ``""`` for none) wins when it is loaded and is
    refused with ``UnknownCheckpoint`` when it is not; otherwise the table decides, with ``draw``
    (uniform in [0, 1)) choosing between current and canary.
    """
    if requested:
        if requested not in loaded:
            raise UnknownCheckpoint(
                f"checkpoint {requested!r} is not loaded; loaded: {sorted(loaded)} "
                "(leave checkpoint_id empty for the current rollout)"
            )
        return requested
    return canary_arm(table.serving, table.canary, table.canary_percent, draw)


def roles_after(
    roles: Mapping[str, str],
    before: RoutingTable,
    after: RoutingTable,
    pinned: Collection[str],
) -> dict[str, str]:
    """Each loaded model's role once ``after`` replaces ``before``.

    The new current and canary take their roles; a model that held one of those roles and lost it
    goes back to ``pinned`` if the settings pin it, else becomes ``retiring`` (its adapter is
    deleted once no request holds it). The base model stays ``base``.
    """
    old = {before.current, before.canary}
    out: dict[str, str] = {}
    for mid, role in roles.items():
        if mid == BASE_ID:
            out[mid] = role
        elif mid == after.current:
            out[mid] = "current"
        elif mid == after.canary:
            out[mid] = "canary"
        elif mid in old or role in ("current", "canary"):
            out[mid] = "pinned" if mid in pinned else "retiring"
        else:
            out[mid] = role
    return out
