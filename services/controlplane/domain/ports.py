"""Ports the domain talks through besides the ``ObjectStore``: the executor that runs trainer (and
evaluator) Jobs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Phase = Literal["pending", "running", "succeeded", "failed", "missing"]


@dataclass(frozen=True)
class JobSpec:
    """What an executor needs to start the trainer for one fine-tune (or the evaluator for one
    evaluation: ``role`` "evaluator", ``finetune_id`` then holds the evaluation's id).

    The trainer reads everything else (dataset, base model, hyperparameters) from the fine-tune record
    in the object store; ``lineage`` is copied into labels/annotations so the Job is traceable.
    The evaluator is the same image with another command (``python -m services.evaluator``) reading
    ``evaluations/{id}/spec.json``.
    """

    finetune_id: str
    lineage: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # The fine-tune's shape (world size = nodes x gpus_per_node trainer processes) and which attempt
    # of it this is: a multi-process group that lost a member is restarted whole, as a new attempt.
    nodes: int = 1
    gpus_per_node: int = 1
    attempt: int = 1
    role: Literal["trainer", "evaluator"] = "trainer"

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


# The variable that tells each role's entrypoint which record it runs.
ID_ENV = {"trainer": "HUVIDPO_TRAINER_FINETUNE_ID", "evaluator": "HUVIDPO_EVALUATOR_EVALUATION_ID"}


@dataclass(frozen=True)
class ExecStatus:
    """An executor's view of one fine-tune's Job. ``reason`` is a short machine word, ``message`` says more."""

    phase: Phase
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None
    job: dict[str, str] = field(default_factory=dict)
    # Which attempt this Job is (None: the executor does not tell); ``retryable``: it failed as a
    # whole group whose restart is the control plane's to start (a new attempt), not its own.
    attempt: int | None = None
    retryable: bool = False


class Executor(Protocol):
    """Runs the trainer entrypoint for a fine-tune (a Kubernetes Job, or a local process)."""

    kind: str

    def submit(self, spec: JobSpec) -> dict[str, str]:
        """Start the trainer for ``spec.finetune_id`` unless already started (idempotent); returns a job ref."""
        ...

    def status(self, finetune_id: str) -> ExecStatus:
        """The Job's phase now (``missing`` when there is none)."""
        ...

    def cancel(self, finetune_id: str) -> None:
        """Stop the trainer and remove its Job (idempotent)."""
        ...

    def logs(self, finetune_id: str, follow: bool = False) -> Iterator[bytes]:
        """The trainer's output so far; with ``follow``, keep yielding until it ends."""
        ...

    def ready(self) -> bool:
        """Whether the executor's backend can take work now (readiness)."""
        ...
