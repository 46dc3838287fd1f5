"""Every store key the services share, and the checkpoint id format (docs/CONTRACTS.md, "Store layout").

The keys are a contract between the control plane, the trainer and the inference service: build them
here, never with an f-string at the call site. Prefixes end with ``/``; functions take ids that their
callers have already validated (the store rejects unsafe keys on its own).
"""

from __future__ import annotations

import re

DATASETS = "datasets/"
MODELS = "models/"
# Files put in the store to be registered as a base model (``POST /v1/models`` with ``from_prefix``).
IMPORTS = "imports/"
FINETUNES = "finetunes/"
CHECKPOINTS = "checkpoints/"
ROLLOUTS = "rollouts/"
GENERATIONS = "generations/"
EVALUATIONS = "evaluations/"
IDEMPOTENCY_FINETUNES = "idempotency/finetunes/"
MANIFEST = "manifest.json"
# The name a rollout gives the base model itself, in place of a checkpoint id (REST, the rollout record
# and the inference service agree on it).
BASE_MODEL = "base"

# ``ckpt-<finetune_id>-<step>``: the fine-tune id may hold dashes, so the step is the last dash's tail.
CHECKPOINT_ID_RE = re.compile(r"^ckpt-(?P<finetune>[a-z0-9-]{1,63})-(?P<step>[0-9]{1,10})$")


# ------------------------------------------------------------------------------------- checkpoints
def checkpoint_id(finetune_id: str, step: int) -> str:
    """The id of ``finetune_id``'s checkpoint at optimizer step ``step``."""
    return f"ckpt-{finetune_id}-{step}"


def parse_checkpoint_id(checkpoint_id: str) -> tuple[str, int] | None:
    """``(finetune_id, step)`` of a checkpoint id, or None when it is not one."""
    m = CHECKPOINT_ID_RE.match(checkpoint_id or "")
    return None if m is None else (m.group("finetune"), int(m.group("step")))


def checkpoint_prefix(checkpoint_id: str) -> str:
    return f"{CHECKPOINTS}{checkpoint_id}/"


def checkpoint_manifest_key(checkpoint_id: str) -> str:
    return checkpoint_prefix(checkpoint_id) + MANIFEST


# --------------------------------------------------------------------------------------- fine-tunes
def finetune_prefix(finetune_id: str) -> str:
    return f"{FINETUNES}{finetune_id}/"


def finetune_spec_key(finetune_id: str) -> str:
    """The fine-tune's spec: written once at create, the trainer's only input."""
    return finetune_prefix(finetune_id) + "spec.json"


def finetune_status_key(finetune_id: str) -> str:
    """The fine-tune's status: written only by the control plane, always compare-and-swap."""
    return finetune_prefix(finetune_id) + "status.json"


def finetune_record_key(finetune_id: str) -> str:
    """The single record older stores hold (spec and status in one); read when ``spec.json`` is absent."""
    return finetune_prefix(finetune_id) + "record.json"


def progress_key(finetune_id: str) -> str:
    return finetune_prefix(finetune_id) + "progress.jsonl"


def idempotency_key(key_digest: str) -> str:
    """The record of an ``Idempotency-Key`` on fine-tune creates (``key_digest``: its sha256 hex)."""
    return f"{IDEMPOTENCY_FINETUNES}{key_digest}.json"


# ------------------------------------------------------------------------------ datasets and models
def dataset_prefix(name: str) -> str:
    return f"{DATASETS}{name}/"


def dataset_version_prefix(name: str, digest: str) -> str:
    return f"{DATASETS}{name}/{digest}/"


def model_prefix(model_id: str) -> str:
    return f"{MODELS}{model_id}/"


def model_manifest_key(model_id: str) -> str:
    return model_prefix(model_id) + MANIFEST


# -------------------------------------------------------------------------------------- inference
def rollout_key(deployment: str) -> str:
    return f"{ROLLOUTS}{deployment}.json"


def replicas_prefix(deployment: str) -> str:
    """The heartbeat records of ``deployment``'s inference replicas (``records.replicas``)."""
    return f"{ROLLOUTS}{deployment}/replicas/"


def replica_key(deployment: str, replica_id: str) -> str:
    """One inference replica's heartbeat: what it serves, refreshed every poll (``ReplicaHeartbeat``)."""
    return f"{replicas_prefix(deployment)}{replica_id}.json"


def generation_key(deployment: str, request_id: str, ext: str) -> str:
    """A video too large to return inline (``ext``: ``mp4`` or ``gif``)."""
    return f"{GENERATIONS}{deployment}/{request_id}.{ext}"


# ------------------------------------------------------------------------------------- evaluations
def evaluation_key(evaluation_id: str) -> str:
    """The evaluation's record (``records.evaluation.EvaluationRecord``)."""
    return f"{EVALUATIONS}{evaluation_id}.json"


def evaluation_prefix(evaluation_id: str) -> str:
    """The evaluation's other objects: ``spec.json`` (the Job's input) and ``comparison.png``."""
    return f"{EVALUATIONS}{evaluation_id}/"


def evaluation_spec_key(evaluation_id: str) -> str:
    return evaluation_prefix(evaluation_id) + "spec.json"


def evaluation_plot_key(evaluation_id: str) -> str:
    return evaluation_prefix(evaluation_id) + "comparison.png"
