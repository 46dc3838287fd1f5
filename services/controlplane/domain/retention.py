"""The retention rule: what may be deleted while other things still use it. The one place it lives.

- A **dataset version** may be deleted when no fine-tune that references it still holds it. A
  fine-tune holds the version it trained on while it is active (queued or running) and while any
  checkpoint of it still exists (a checkpoint's lineage names the version). A failed, cancelled or
  succeeded fine-tune whose checkpoints are all deleted holds nothing. A **dataset** may be deleted
  when each of its versions may.
- A **fine-tune** may be deleted when it is not active and has no checkpoint left; deleting it removes
  its record, its progress, its dataset reference (``datasets/{name}/refs/{id}.json``) and its
  Idempotency-Key. Its checkpoints are never deleted with it: each is deleted on its own.
- A **checkpoint** may be deleted when no rollout serves it (as ``current`` or ``canary`` of any
  deployment) and its fine-tune is not active (a retried trainer resumes from its latest checkpoint).
- A **base model** may be deleted when no fine-tune of it still holds it, as for a dataset version:
  its checkpoints are adapters of that model, useless (unservable, unevaluable) without it. The
  manifest goes first, so no reader sees a half-deleted model. What an inference service was started
  with (``HUVIDPO_INFERENCE_BASE_MODEL``) is outside the control plane's records: a replica that has
  it loaded keeps serving, one that restarts finds it gone.

Everything refused is a ``Conflict`` (409) that names what holds it.
"""

from __future__ import annotations

import builtins

from services.common.records.keys import parse_checkpoint_id
from services.controlplane.domain.checkpoints import CheckpointService
from services.controlplane.domain.errors import Conflict, NotFound
from services.controlplane.domain.finetunes import ACTIVE, FineTuneService
from services.controlplane.domain.models import ModelService
from services.controlplane.domain.rollouts import RolloutService


class Retention:
    """Deletes datasets, versions, fine-tunes, checkpoints and base models under the rule above."""

    def __init__(
        self,
        finetunes: FineTuneService,
        checkpoints: CheckpointService,
        rollouts: RolloutService,
        models: ModelService,
    ) -> None:
        self.finetunes = finetunes
        self.datasets = finetunes.datasets
        self.checkpoints = checkpoints
        self.rollouts = rollouts
        self.models = models

    def delete_dataset(self, name: str) -> None:
        self.datasets.delete(name, self.finetunes.holds)

    def delete_version(self, name: str, version: str) -> None:
        self.datasets.delete_version(name, version, self.finetunes.holds)

    def delete_finetune(self, finetune_id: str) -> None:
        self.finetunes.delete(finetune_id)

    def delete_model(self, model_id: str) -> None:
        self.models.get(model_id)  # NotFound first
        held: builtins.list[str] = []
        token: str | None = None
        while True:
            page, token = self.finetunes.list(base_model=model_id, page_size=200, page_token=token)
            held.extend(reason for reason in (self.finetunes.holds(v["id"]) for v in page) if reason)
            if token is None:
                break
        if held:
            raise Conflict(f"model {model_id} cannot be deleted: {'; '.join(held)}")
        self.models.delete(model_id)

    def checkpoint_holders(self, checkpoint_id: str) -> builtins.list[str]:
        """Why ``checkpoint_id`` may not be deleted now (empty: it may)."""
        reasons = []
        token: str | None = None
        while True:
            page, token = self.rollouts.list(page_size=200, page_token=token)
            for r in page:
                for role in ("current", "canary"):
                    if r.get(role) == checkpoint_id:
                        reasons.append(
                            f"it is the {role} checkpoint of deployment {r['deployment']!r} "
                            f"(rollout revision {r['revision']})"
                        )
            if token is None:
                break
        parsed = parse_checkpoint_id(checkpoint_id)
        if parsed is not None:
            finetune_id = parsed[0]
            try:
                state = self.finetunes.get(finetune_id)["state"]
            except NotFound:
                state = None
            if state in ACTIVE:
                reasons.append(f"its fine-tune {finetune_id} is {state} and may resume from it")
        return reasons

    def delete_checkpoint(self, checkpoint_id: str) -> None:
        self.checkpoints.manifest(checkpoint_id)  # NotFound first
        held = self.checkpoint_holders(checkpoint_id)
        if held:
            raise Conflict(f"checkpoint {checkpoint_id} cannot be deleted: {'; '.join(held)}")
        self.checkpoints.delete(checkpoint_id)
