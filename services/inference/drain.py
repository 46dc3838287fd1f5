"""Graceful drain of an inference replica on SIGTERM (``python -m services.inference``).

Kubernetes ends a pod by running its ``preStop`` hook (a short sleep, while the endpoint removal
reaches every client and proxy), then sending SIGTERM, then SIGKILL once
``terminationGracePeriodSeconds`` have passed since the hook began. On SIGTERM the replica:

1. reports NOT_SERVING on ``grpc.health.v1`` (every service name; the model thread cannot turn it
   back) so readiness fails and health-checking clients go elsewhere, and ``draining`` in its
   heartbeat record (services/inference/heartbeat.py);
2. refuses new ``Generate`` calls with UNAVAILABLE, saying the replica is draining (retryable:
   a client with ``round_robin`` retries on another replica);
3. lets the running batch and every queued request finish, up to ``grace_seconds``
   (``HUVIDPO_INFERENCE_GRACE_SECONDS``); what is still queued or running then ends with UNAVAILABLE;
4. stops the gRPC server (the last results stream out), the model thread and the metrics server,
   and the process exits 0.

A second SIGTERM/SIGINT during the drain cuts it short (an operator's second Ctrl-C).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.inference.server import InferenceServer

log = logging.getLogger(__name__)

# Seconds the gRPC server still gives finished requests to stream their results out after the queue
# is empty (encoding the video happens after the model thread is done with it).
FLUSH_SECONDS = 5.0


@dataclass(frozen=True)
class DrainOutcome:
    """How a drain ended: ``idle`` when every accepted request finished before the deadline."""

    idle: bool
    seconds: float
    left_queued: int


async def drain_and_stop(
    server: InferenceServer, grace_seconds: float, interrupted: asyncio.Event | None = None
) -> DrainOutcome:
    """Drain ``server`` (steps 1 to 4 of the module docstring) and stop it."""
    t0 = time.monotonic()
    deadline = t0 + grace_seconds
    batcher = server.batcher
    batcher.drain()
    await server.health.enter_graceful_shutdown()
    await asyncio.to_thread(server.manager.heartbeat.drain)
    log.info(
        "draining: NOT_SERVING, refusing new requests; %d queued, finishing them within %.0fs",
        batcher.queued,
        grace_seconds,
    )
    while not batcher.idle and time.monotonic() < deadline:
        if interrupted is not None and interrupted.is_set():
            log.warning("drain interrupted by a second signal")
            break
        await asyncio.to_thread(batcher.wait_idle, min(0.2, max(0.0, deadline - time.monotonic())))
    idle = batcher.idle
    left = batcher.queued
    if not idle:
        log.warning("drain deadline reached with %d request(s) queued; ending them with UNAVAILABLE", left)
        await asyncio.to_thread(batcher.stop)
    # Requests whose generation is done may still be encoding and streaming their result.
    await server.stop(grace=max(FLUSH_SECONDS, deadline - time.monotonic()) if idle else FLUSH_SECONDS)
    outcome = DrainOutcome(idle=idle, seconds=time.monotonic() - t0, left_queued=left)
    log.info(
        "drained in %.1fs (%s)",
        outcome.seconds,
        "every accepted request finished" if idle else f"{left} queued request(s) refused at the deadline",
    )
    return outcome
