"""Health (process alive), readiness (store and executor reachable) and Prometheus metrics. No auth."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from services.controlplane.deps import Context, ctx
from services.controlplane.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> dict[str, object]:
    return {"status": "ok", "checks": {}}


@router.get("/readyz", response_model=Health, responses={503: {"model": Health, "description": "not ready"}})
async def readyz(c: Context = Depends(ctx)) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        await run_in_threadpool(c.store.check)
        checks["store"] = "ok"
    except Exception as exc:
        checks["store"] = f"unavailable: {type(exc).__name__}"
    try:
        ok = await run_in_threadpool(c.executor.ready)
        checks["executor"] = "ok" if ok else "unavailable"
    except Exception as exc:
        checks["executor"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(c: Context = Depends(ctx)) -> Response:
    return Response(generate_latest(c.metrics.registry), media_type=CONTENT_TYPE_LATEST)
