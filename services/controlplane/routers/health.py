"""Health (process alive), readiness and Prometheus metrics. No auth.

Readiness follows the executor only (this pod can start and watch trainer Jobs). The store is shared
by every replica: were readiness to follow it, a store restart would drop every replica from the
Service at once, turning the API's own 503 problems into connection errors. So the store's state is
reported in the body ("degraded" while it is down) and the pod stays ready; liveness checks nothing.
"""

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
    if checks["executor"] != "ok":
        status = "unavailable"
    else:
        status = "ok" if checks["store"] == "ok" else "degraded"
    return JSONResponse(
        {"status": status, "checks": checks}, status_code=503 if status == "unavailable" else 200
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(c: Context = Depends(ctx)) -> Response:
    return Response(generate_latest(c.metrics.registry), media_type=CONTENT_TYPE_LATEST)
