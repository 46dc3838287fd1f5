"""Domain errors of the inference service, mapped once to gRPC status codes in the servicer."""

from __future__ import annotations


class InferenceError(Exception):
    """Base class; the message is safe to show to the client."""


class InvalidRequest(InferenceError, ValueError):
    """The request cannot be run as given; the message names the field and what to fix."""


class QueueFull(InferenceError):
    """The bounded request queue is full; the client should retry later."""


class ModelNotReady(InferenceError):
    """No model is loaded yet."""


class Draining(InferenceError):
    """This replica is shutting down (SIGTERM): it refuses new requests, and those it could not
    finish before its drain deadline, so the client retries them on another replica (UNAVAILABLE)."""


class UnknownCheckpoint(InferenceError, LookupError):
    """The request names a checkpoint that is not loaded."""


class Cancelled(InferenceError):
    """The client went away or its deadline passed; generation stopped. ``deadline_exceeded`` says
    which (the servicer maps it to DEADLINE_EXCEEDED or CANCELLED; the message is for people)."""

    def __init__(self, message: str, *, deadline_exceeded: bool = False) -> None:
        super().__init__(message)
        self.deadline_exceeded = deadline_exceeded


class CheckpointRefused(InferenceError):
    """A checkpoint failed verification (checksum, file types, loading or the smoke generation)."""

    def __init__(self, checkpoint_id: str, reason: str, stage: str) -> None:
        super().__init__(f"checkpoint {checkpoint_id} refused at {stage}: {reason}")
        self.checkpoint_id = checkpoint_id
        self.reason = reason
        self.stage = stage
