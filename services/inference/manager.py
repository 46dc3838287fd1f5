"""``ModelManager``: owns the base model, the LoRA checkpoints loaded over it, their verification,
hot swap and canary routing. Its parts: ``fetch`` downloads and verifies files into the cache,
``routing`` decides (pure) which model serves a request and which role each model holds after a
rollout, ``follow`` polls the rollout record ``rollouts/{deployment}.json`` and calls ``apply_rollout``.

Threads: the model thread (``Batcher``) calls ``run_batch``; the follower thread loads the base model,
then polls the rollout record; the event loop calls ``resolve``/``release`` and the read-only views.
``_model_lock`` serializes everything that touches the UNet (a generation, adding or deleting an
adapter, a smoke generation); ``_state_lock`` guards the routing table and is never held for long.

Swapping loses no request: a request resolves its checkpoint when it is admitted and holds a
reference until it ends; a checkpoint replaced by a rollout becomes ``retiring`` and its adapter is
deleted only once no request holds it.
"""

from __future__ import annotations

import copy
import logging
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from huvidpo.lora import load_lora
from huvidpo.models import directory_digest
from huvidpo.pipeline import GenerationConfig, GenerationResult, HuViDPOPipeline
from huvidpo.precision import compile_unet, resolve_dtype
from services.common.publish import RolloutRecord
from services.common.records import keys
from services.common.settings import InferenceSettings
from services.common.store import ObjectStore
from services.inference.batcher import Job, ProgressFn, StopFn
from services.inference.errors import CheckpointRefused, ModelNotReady, UnknownCheckpoint
from services.inference.fetch import fetch_base_model, fetch_checkpoint
from services.inference.follow import RolloutFollower
from services.inference.heartbeat import Heartbeat
from services.inference.metrics import InferenceMetrics
from services.inference.routing import BASE_ID, RoutingTable, canary_arm, roles_after, route

# A smoke video whose brightest pixel is this dark is black: its first frame is a mid-grey colour.
BLACK_LEVEL = 2

__all__ = [
    "BASE_ID",
    "CanaryRouter",
    "LoadedModel",
    "ModelManager",
    "adapter_name",
]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """One model the service can generate with: the base model, or a LoRA adapter over it."""

    id: str
    role: str
    adapter: str | None  # peft adapter name; None for the base model
    digest: str
    source: str
    manifest_sha256: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    refs: int = 0


class CanaryRouter:
    """The routing draws: a seeded RNG (``routing_seed``) that the event loop's requests share."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def draw(self) -> float:
        """A uniform draw in [0, 1)."""
        with self._lock:
            return self._rng.random()

    def choose(self, current: str, canary: str | None, percent: int) -> str:
        """The canary with probability ``percent``/100, else ``current``; draws only when it splits."""
        if canary is None or percent <= 0:
            return current
        return canary_arm(current, canary, percent, self.draw())


def adapter_name(checkpoint_id: str) -> str:
    """A peft adapter name for a checkpoint id (module-dict keys must not contain '.')."""
    return "ckpt_" + re.sub(r"\W", "_", checkpoint_id)


# gRPC status codes a request ends with that are the client's doing, not the model's.
CLIENT_CODES = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED"})


class ModelManager:
    def __init__(
        self,
        settings: InferenceSettings,
        store: ObjectStore,
        metrics: InferenceMetrics,
        router: CanaryRouter | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.router = router or CanaryRouter(settings.routing_seed)
        self.pipeline: HuViDPOPipeline | None = None
        self._validation_tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self.base_digest = ""
        self._model_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        # None until the base model is loaded; then what serves requests that name no checkpoint.
        self._table: RoutingTable | None = None
        self._rollout: RolloutRecord | None = None
        # Finished Generate calls per checkpoint since this replica applied the rollout's revision:
        # [requests, server-side errors]; the heartbeat reports them per role for the rollout gate.
        self._traffic: dict[str, list[int]] = {}
        self._ready = False
        self._on_ready: Callable[[bool], None] | None = None
        self.cache_dir = Path(settings.cache_dir)
        self.follower = RolloutFollower(self, store, settings.deployment, settings.poll_seconds)
        self.heartbeat = Heartbeat(settings, store, self)

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def base_loaded(self) -> bool:
        return self.pipeline is not None

    def start(self, on_ready: Callable[[bool], None] | None = None) -> None:
        """Load in the background (the server answers health checks meanwhile), then follow rollouts."""
        self._on_ready = on_ready
        self.follower.start()
        self.heartbeat.start()

    def stop(self) -> None:
        self.follower.stop()
        self.heartbeat.stop()

    def set_ready(self, ready: bool) -> None:
        self._ready = ready
        self.metrics.ready.set(1 if ready else 0)
        if self._on_ready is not None:
            self._on_ready(ready)

    # -- loading -----------------------------------------------------------------------------------
    def load_base(self) -> None:
        """Load the base model from a local directory or a ``models/{id}`` publication in the store."""
        src = self.settings.base_model
        model_dir = fetch_base_model(self.store, src, self.cache_dir)
        device = self.settings.device
        pipe = HuViDPOPipeline.from_pretrained(
            model_dir, device=device, dtype=resolve_dtype(self.settings.dtype, device)
        )
        compile_unet(pipe.components.unet, self.settings.compile)  # compiled by the smoke run below
        digest = directory_digest(model_dir)
        with self._model_lock:
            self._smoke(pipe, None, BASE_ID)
        self._validation_tokenizer = copy.deepcopy(pipe.components.tokenizer)
        self.pipeline = pipe
        self.base_digest = digest
        with self._state_lock:
            self._models[BASE_ID] = LoadedModel(BASE_ID, "base", None, digest, src)
            self._table = RoutingTable(BASE_ID)
        self._publish_info()
        log.info("base model loaded from %s (digest %s)", src, digest[:12])

    def load_pinned(self) -> None:
        for ckpt in self.settings.checkpoints:
            try:
                self.load_checkpoint(ckpt, role="pinned")
            except CheckpointRefused as exc:
                self._refused(exc, "pinned")

    def load_checkpoint(self, checkpoint_id: str, role: str) -> LoadedModel:
        """Fetch, verify (sha256, file types, strict load, smoke generation) and add a checkpoint.

        Raises ``CheckpointRefused``; on refusal nothing of the checkpoint stays loaded."""
        with self._state_lock:
            existing = self._models.get(checkpoint_id)
        if existing is not None:
            return existing
        if checkpoint_id == BASE_ID:
            raise CheckpointRefused(checkpoint_id, f"{BASE_ID!r} is reserved for the base model", "fetch")
        pipe = self.pipeline
        if pipe is None:
            raise ModelNotReady("the base model is not loaded")
        fetched = fetch_checkpoint(self.store, checkpoint_id, self.cache_dir)
        adapter_dir, manifest = fetched.adapter_dir, fetched.manifest
        name = adapter_name(checkpoint_id)
        unet = pipe.components.unet
        with self._model_lock:
            try:
                load_lora(unet, adapter_dir, adapter=name)
                # peft adds the new LoRA modules (with their dropout) in training mode: without this,
                # every generation with the adapter would apply dropout and be non-deterministic.
                unet.eval()
            except Exception as exc:
                if name in getattr(unet, "peft_config", {}):
                    unet.delete_adapters(name)
                raise CheckpointRefused(checkpoint_id, str(exc), "load") from exc
            try:
                self._smoke(pipe, name, checkpoint_id)
            except CheckpointRefused:
                unet.delete_adapters(name)
                raise
        lineage = manifest.get("lineage") if isinstance(manifest.get("lineage"), dict) else {}
        model = LoadedModel(
            id=checkpoint_id,
            role=role,
            adapter=name,
            digest=directory_digest(adapter_dir),
            source=keys.checkpoint_prefix(checkpoint_id),
            manifest_sha256=fetched.manifest_sha256,
            lineage=dict(lineage or {}),
            created_at=str(manifest["created_at"]) if manifest.get("created_at") else None,
        )
        with self._state_lock:
            self._models[checkpoint_id] = model
        self._publish_info()
        log.info(
            "checkpoint %s verified and loaded as %s (digest %s)", checkpoint_id, role, model.digest[:12]
        )
        return model

    def _select(self, pipe: HuViDPOPipeline, adapter: str | None) -> None:
        """(model lock held) Make ``adapter`` the active one, or run the bare base model for None."""
        unet = pipe.components.unet
        loaded = getattr(unet, "peft_config", {}) or {}
        if adapter is None:
            if loaded:
                unet.disable_adapters()
            return
        unet.enable_adapters()
        unet.set_adapter(adapter)

    def _smoke(self, pipe: HuViDPOPipeline, adapter: str | None, model_id: str) -> None:
        """(model lock held) One short generation; its latents must be finite."""
        s = self.settings
        try:
            self._select(pipe, adapter)
            image = Image.new("RGB", (s.smoke_size, s.smoke_size), (128, 96, 64))
            cfg = GenerationConfig(
                num_frames=s.smoke_frames,
                height=s.smoke_size,
                width=s.smoke_size,
                steps=s.smoke_steps,
                seed=0,
            )
            result = pipe.generate_batch(["smoke test"], [image], cfg)[0]
        except Exception as exc:
            raise CheckpointRefused(model_id, f"smoke generation failed: {exc}", "smoke") from exc
        if not torch.isfinite(result.latents).all():
            raise CheckpointRefused(
                model_id, "smoke generation produced non-finite latents (NaN/inf weights?)", "smoke"
            )
        if (
            result.frames.shape != (s.smoke_frames, s.smoke_size, s.smoke_size, 3)
            or result.frames.dtype != np.uint8
        ):
            raise CheckpointRefused(
                model_id, f"smoke generation returned frames {result.frames.shape}", "smoke"
            )
        if int(result.frames.max()) <= BLACK_LEVEL:  # the smoke's first frame is not black
            raise CheckpointRefused(
                model_id, "smoke generation decoded black frames (a VAE overflow or broken weights?)", "smoke"
            )

    # -- rollouts ----------------------------------------------------------------------------------
    def _refused(self, exc: CheckpointRefused, role: str) -> None:
        self.metrics.rollout_outcomes.labels("refused", role, exc.stage).inc()
        log.error(
            "REFUSED %s checkpoint %s at %s: %s (the previous model keeps serving)",
            role,
            exc.checkpoint_id,
            exc.stage,
            exc.reason,
        )

    def apply_rollout(self, record: RolloutRecord) -> None:
        """Load and verify the record's checkpoints, then swap the routing table and the roles.

        A checkpoint that fails verification is refused and the previous one keeps its role; a
        ``StoreError`` other than a refusal (e.g. ``StoreUnavailable``) propagates, so the follower
        retries the revision on its next poll."""
        wanted = RoutingTable.wanted(record)
        with self._state_lock:
            before = self._table or RoutingTable()
        new_current = before.current
        new_canary: str | None = None
        if wanted.current == BASE_ID or self._try_load(wanted.serving, "current"):
            new_current = wanted.current
        if wanted.canary is not None and self._try_load(wanted.canary, "canary"):
            new_canary = wanted.canary
        after = RoutingTable(new_current, new_canary, record.canary_percent if new_canary else 0)
        old = {before.current, before.canary}
        with self._state_lock:
            roles = roles_after(
                {mid: m.role for mid, m in self._models.items()}, before, after, self.settings.checkpoints
            )
            for mid, role in roles.items():
                self._models[mid].role = role
            self._table = after
            if self._rollout is None or self._rollout.revision != record.revision:
                self._traffic = {}
            self._rollout = record
        if new_current == wanted.current and new_current not in old:
            self.metrics.rollout_outcomes.labels("applied", "current", "serving").inc()
        if new_canary is not None and new_canary not in old:
            self.metrics.rollout_outcomes.labels("applied", "canary", "serving").inc()
        self._publish_info()
        self.retire_idle()

    def _try_load(self, checkpoint_id: str, role: str) -> bool:
        try:
            self.load_checkpoint(checkpoint_id, role)
            return True
        except CheckpointRefused as exc:
            self._refused(exc, role)
            return False

    def retire_idle(self) -> None:
        """Delete the adapters of retiring checkpoints that no request holds any more."""
        with self._state_lock:
            idle = [m for m in self._models.values() if m.role == "retiring" and m.refs == 0]
            for m in idle:
                del self._models[m.id]
        if not idle or self.pipeline is None:
            return
        with self._model_lock:
            for m in idle:
                if m.adapter and m.adapter in (
                    getattr(self.pipeline.components.unet, "peft_config", {}) or {}
                ):
                    self.pipeline.components.unet.delete_adapters(m.adapter)
                self.metrics.forget_checkpoint(m.id)
                log.info("retired checkpoint %s", m.id)
        self._publish_info()

    def _publish_info(self) -> None:
        gauge = self.metrics.loaded_checkpoint
        gauge.clear()
        with self._state_lock:
            for m in self._models.values():
                gauge.labels(m.id, m.role, m.digest[:16]).set(1)

    # -- serving -----------------------------------------------------------------------------------
    def resolve(self, requested: str) -> str:
        """The checkpoint a request runs on (``""``: current rollout, with canary routing); holds a
        reference until ``release``."""
        with self._state_lock:
            table = self._table
            if not self._ready or table is None:
                raise ModelNotReady("no model is loaded yet; retry shortly")
            # Draw only for a request the canary split decides, so a seeded router gives the same
            # sequence of arms whatever pinned requests come in between.
            draw = self.router.draw() if not requested and table.splits else 0.0
            chosen = route(table, self._models, requested, draw)
            self._models[chosen].refs += 1
            return chosen

    def count_outcome(self, checkpoint_id: str, code: str) -> None:
        """One finished request on ``checkpoint_id`` with gRPC status ``code`` (its name); a server-side
        code (not OK, INVALID_ARGUMENT, NOT_FOUND or CANCELLED, as the error-ratio alert counts) is an error."""
        with self._state_lock:
            counts = self._traffic.setdefault(checkpoint_id, [0, 0])
            counts[0] += 1
            counts[1] += code not in CLIENT_CODES

    def release(self, checkpoint_id: str) -> None:
        with self._state_lock:
            model = self._models.get(checkpoint_id)
            if model is not None:
                model.refs = max(0, model.refs - 1)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` (with start/end) by a private copy of the tokenizer: a fast tokenizer
        must not be used from two threads at once, and the model thread uses the pipeline's."""
        tok = self._validation_tokenizer
        if tok is None:
            raise ModelNotReady("no model is loaded yet; retry shortly")
        with self._tokenizer_lock:
            return len(tok(text).input_ids)

    @property
    def max_tokens(self) -> int:
        pipe = self.pipeline
        if pipe is None:
            raise ModelNotReady("no model is loaded yet; retry shortly")
        # The text encoder's position table is the real limit; a saved tokenizer may not carry its
        # model_max_length (the tiny model's comes back as 77 while its encoder holds 16 positions).
        limits = [int(pipe.components.tokenizer.model_max_length)]
        positions = getattr(pipe.components.text_encoder.config, "max_position_embeddings", None)
        if positions:
            limits.append(int(positions))
        return min(limits)

    def run_batch(self, jobs: list[Job], progress: ProgressFn, should_stop: StopFn) -> list[GenerationResult]:
        """(model thread) Generate one batch of compatible jobs in one ``generate_batch`` call."""
        pipe = self.pipeline
        if pipe is None:
            raise ModelNotReady("no model is loaded")
        with self._state_lock:
            adapter = self._models[jobs[0].checkpoint_id].adapter
        first = jobs[0].spec
        cfg = GenerationConfig(
            num_frames=first.frames,
            height=first.height,
            width=first.width,
            steps=first.steps,
            guidance_scale=first.guidance_scale,
            seed=first.seed,
        )
        with self._model_lock:
            self._select(pipe, adapter)
            return pipe.generate_batch(
                [j.spec.prompt for j in jobs],
                [j.spec.image for j in jobs],
                cfg,
                progress=progress,
                should_stop=should_stop,
                seeds=[j.spec.seed for j in jobs],
                negative_prompts=[j.spec.negative_prompt for j in jobs],
            )

    # -- views -------------------------------------------------------------------------------------
    def models(self) -> list[LoadedModel]:
        with self._state_lock:
            return [LoadedModel(**{**m.__dict__}) for m in self._models.values()]

    def get(self, model_id: str) -> LoadedModel:
        with self._state_lock:
            m = self._models.get(model_id)
            if m is None:
                raise UnknownCheckpoint(f"model {model_id!r} is not loaded; loaded: {sorted(self._models)}")
            return LoadedModel(**{**m.__dict__})

    def rollout_view(self) -> dict[str, Any]:
        with self._state_lock:
            r = self._rollout
            table = self._table or RoutingTable()
            return {
                "deployment": self.settings.deployment,
                "revision": r.revision if r else 0,
                "current": table.current or "",
                "canary": table.canary or "",
                "canary_percent": table.canary_percent,
                "traffic": [
                    {"role": role, "checkpoint": ckpt, "requests": c[0], "errors": c[1]}
                    for role, ckpt in (("current", table.current), ("canary", table.canary))
                    if ckpt and (c := self._traffic.get(ckpt, [0, 0]))
                ],
            }
