"""The FastAPI application: wiring only. ``create_app`` takes every dependency explicitly.

The app is stateless: it holds no record of its own, only handles to the store and the executor,
so any number of replicas (or a restarted process) serve the same state.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from services.common.auth import load_table
from services.common.settings import ControlPlaneSettings
from services.common.store import (
    ChecksumMismatch,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    PresignedUrlInvalid,
    StoreAccessDenied,
    StoreUnavailable,
)
from services.controlplane import auth, openapi, problems
from services.controlplane.deps import Context
from services.controlplane.domain.checkpoints import CheckpointService
from services.controlplane.domain.datasets import DatasetService, run_inline
from services.controlplane.domain.evaluations import EvaluationService, dispatch
from services.controlplane.domain.finetunes import FineTuneService
from services.controlplane.domain.models import ModelService
from services.controlplane.domain.ports import Executor
from services.controlplane.domain.rollouts import RolloutService
from services.controlplane.domain.util import Clock, utcnow
from services.controlplane.limits import BodyLimitMiddleware, StreamSlots, body_limit
from services.controlplane.metrics import Metrics, MetricsMiddleware
from services.controlplane.routers import checkpoints, datasets, finetunes, health, objects, ratings, rollouts
from services.controlplane.routers import evaluations as evaluations_router
from services.controlplane.routers import models as models_router
from services.controlplane.routers import preference as preference_router
from services.controlplane.routers.rollouts import rollout_gate
from services.controlplane.ui import router as ui_router

log = logging.getLogger(__name__)

DOCS_ASSETS = "/docs/assets"
API_DESCRIPTION = """HuViDPO control plane: preference datasets, DPO fine-tunes run as Kubernetes Jobs,
checkpoints with lineage, and rollouts the inference service follows.

Errors are RFC 9457 `application/problem+json` with a stable `type` URI per kind of error."""


def create_app(
    settings: ControlPlaneSettings,
    store: ObjectStore,
    executor: Executor,
    clock: Clock = utcnow,
    background: bool = True,
) -> FastAPI:
    """Build the app over ``store`` and ``executor``. With ``background``, executors that watch
    (Kubernetes) run their watch loop for the app's lifetime, and a committed dataset version is
    validated (its videos decoded) on a thread; without, in the request that needs it."""
    metrics = Metrics()
    cache_dir = Path(settings.work_dir) / "cache"
    ds = DatasetService(store, cache_dir, clock, runner=None if background else run_inline)
    ckpts = CheckpointService(store, clock)
    fts = FineTuneService(
        store,
        executor,
        ds,
        clock,
        on_transition=lambda a, b: metrics.finetune_transitions.labels(a, b).inc(),
        shapes=settings.allowed_shapes(),
        max_attempts=settings.max_attempts,
    )
    metrics.watch_finetunes(fts.count_by_state)
    evs = EvaluationService(store, executor, ds, ckpts, clock)
    metrics.watch_evaluations(evs.count_by_state, evs.latest_by_checkpoint)
    context = Context(
        settings=settings,
        store=store,
        executor=executor,
        datasets=ds,
        finetunes=fts,
        checkpoints=ckpts,
        rollouts=RolloutService(store, ckpts, clock),
        metrics=metrics,
        cache_dir=cache_dir,
        models=ModelService(store, clock),
        evaluations=evs,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        watcher = None
        start_watch = getattr(executor, "start_watch", None)
        if background and start_watch is not None:
            watcher = start_watch(dispatch(fts.on_job_event, evs.on_job_event), stop)
        if background and settings.rollout_gate_seconds > 0:
            rollout_gate(context).start(stop, settings.rollout_gate_seconds)
        try:
            yield
        finally:
            stop.set()
            if watcher is not None:
                watcher.join(timeout=5)

    # /docs (Swagger UI) and /redoc with their scripts and styles served from /docs/assets/ by this
    # app (the fastapi-offline package ships them): no CDN, so they work on an air-gapped cluster.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        # Swagger UI would otherwise send the spec to validator.swagger.io for its badge.
        swagger_ui_parameters={"validatorUrl": None},
        title="HuViDPO control plane",
        version="1.0.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        responses=problems.common_responses(500),
    )
    app.state.ctx = context
    app.state.streams = StreamSlots(settings.max_streams_per_token)
    # fail closed: no token is an error (AuthConfigError) unless dev mode on a loopback host
    app.state.tokens = load_table(settings.auth_config(), settings.host, "huvidpo-controlplane")
    if app.state.tokens.open:
        log.warning("dev mode with no bearer token: the API on %s is open to local callers", settings.host)
    problems.install(app)
    _install_store_errors(app)
    for r in (
        health.router,
        datasets.router,
        models_router.router,
        finetunes.router,
        checkpoints.router,
        evaluations_router.router,
        rollouts.router,
        objects.router,
        ratings.router,
        preference_router.router,
        auth.router,
        ui_router,
    ):
        app.include_router(r)
    auth.document_auth(app)
    openapi.document_errors(app)  # after every router: the statuses the shared machinery answers
    # Bodies are bounded (and need a valid token) before a route reads them; the audit line, outside
    # it, records refused writes too.
    app.add_middleware(BodyLimitMiddleware, limit=lambda method, path: body_limit(settings, method, path))
    app.add_middleware(auth.AuditMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _install_store_errors(app: FastAPI) -> None:
    """Store errors that reach the edge (the domain lets them through) as problem+json."""

    def handler(status: int, kind: str, detail: str | None = None):  # type: ignore[no-untyped-def]
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            headers = {"Retry-After": "5"} if status == 503 else None
            if status >= 500:
                log.warning("store error on %s %s: %s", request.method, request.url.path, exc)
            return problems.problem_response(
                status, kind, detail or str(exc), instance=request.url.path, headers=headers
            )

        return handle

    handlers: dict[type[Exception], Any] = {
        StoreUnavailable: handler(503, "service-unavailable", "the object store is unavailable; retry later"),
        StoreAccessDenied: handler(
            503,
            "service-unavailable",
            "the object store refused the control plane's request (its key or its store policy); see the server log",
        ),
        ObjectNotFound: handler(404, "not-found", "not found"),
        InvalidKey: handler(422, "validation-error"),
        PresignedUrlInvalid: handler(403, "forbidden"),
        ChecksumMismatch: handler(
            500, "internal-error", "stored data failed its checksum; see the server log"
        ),
    }
    for exc_type, h in handlers.items():
        app.add_exception_handler(exc_type, h)
