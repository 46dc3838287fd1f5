"""Thin clients of the two public interfaces: the control plane's REST API and the inference gRPC API.

They speak only the wire protocols (HTTP + JSON/multipart, gRPC), so what works here works against a
deployed cluster too.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import httpx

from services.inference.gen import inference_pb2 as pb
from services.inference.gen import inference_pb2_grpc as pb_grpc

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(RuntimeError):
    """A REST call answered with an error status; ``problem`` is its problem+json body."""

    def __init__(self, status: int, problem: dict[str, Any], method: str, path: str) -> None:
        self.status = status
        self.problem = problem
        detail = problem.get("detail") or problem.get("title") or problem
        super().__init__(f"{method} {path} -> {status}: {detail}")


class ControlPlaneClient:
    """The REST API with a bearer token (``/v1/...``)."""

    def __init__(self, base_url: str, token: str | None, timeout: float = 120.0) -> None:
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, ok: tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        r = self.http.request(method, path, **kwargs)
        if r.status_code not in ok:
            try:
                body = r.json()
            except ValueError:
                body = {"detail": r.text[:500]}
            raise ApiError(r.status_code, body if isinstance(body, dict) else {"detail": body}, method, path)
        return r.json() if r.content else None

    # -------------------------------------------------------------------------------- datasets
    def ensure_dataset(self, name: str, description: str = "") -> dict[str, Any]:
        r = self.http.post("/v1/datasets", json={"name": name, "description": description})
        if r.status_code == 409:
            return dict(self.call("GET", f"/v1/datasets/{name}"))
        if r.status_code != 201:
            raise ApiError(r.status_code, r.json(), "POST", "/v1/datasets")
        return dict(r.json())

    def upload_version(self, name: str, directory: Path) -> dict[str, Any]:
        """Stream every file of ``directory`` as one multipart upload; returns the committed version."""
        paths = sorted(p for p in Path(directory).rglob("*") if p.is_file())
        with contextlib.ExitStack() as stack:
            files: list[tuple[str, tuple[str, BinaryIO, str]]] = []
            for p in paths:
                kind = "video/mp4" if p.suffix == ".mp4" else "application/octet-stream"
                files.append(
                    ("files", (p.relative_to(directory).as_posix(), stack.enter_context(open(p, "rb")), kind))
                )
            return dict(self.call("POST", f"/v1/datasets/{name}/versions", files=files))

    def compile_pairs(
        self, name: str, version: str, tie_policy: str = "drop", **options: Any
    ) -> dict[str, Any]:
        """``options``: the compile request's other fields (``seed``, ``holdout_fraction``, ...)."""
        body = {"tie_policy": tie_policy, **options}
        return dict(self.call("POST", f"/v1/datasets/{name}/versions/{version}/pairs", json=body))

    # -------------------------------------------------------------------------------- fine-tunes
    def create_finetune(
        self,
        dataset: str,
        version: str,
        base_model: str,
        hyperparameters: dict[str, Any],
        key: str | None = None,
    ) -> dict[str, Any]:
        body = {"dataset": dataset, "version": version, "base_model": base_model, "stage": "dpo"}
        body["hyperparameters"] = hyperparameters  # type: ignore[assignment]
        headers = {"Idempotency-Key": key or uuid.uuid4().hex}
        return dict(self.call("POST", "/v1/fine-tunes", json=body, headers=headers))

    def finetune(self, finetune_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/v1/fine-tunes/{finetune_id}"))

    def cancel_finetune(self, finetune_id: str) -> dict[str, Any]:
        return dict(self.call("POST", f"/v1/fine-tunes/{finetune_id}/cancel"))

    def wait_finetune(
        self,
        finetune_id: str,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        timeout: float = 900.0,
        until: Callable[[dict[str, Any]], bool] | None = None,
        interval: float = 1.0,
    ) -> dict[str, Any]:
        """Poll until the fine-tune ends (or ``until(view)`` holds); ``on_update`` sees every view."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.finetune(finetune_id)
            if on_update is not None:
                on_update(view)
            if (until(view) if until is not None else view["state"] in TERMINAL) or view["state"] in TERMINAL:
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"fine-tune {finetune_id} still {view['state']} after {timeout:.0f} s")
            time.sleep(interval)

    def checkpoint(self, checkpoint_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/v1/checkpoints/{checkpoint_id}"))

    # -------------------------------------------------------------------------------- rollouts
    def set_rollout(self, deployment: str, checkpoint_id: str, create: bool = False) -> dict[str, Any]:
        """Serve ``checkpoint_id`` (or ``"base"``); ``create`` starts a deployment that has no rollout yet."""
        params = {"create": "true"} if create else None
        return dict(
            self.call("PUT", f"/v1/rollouts/{deployment}", json={"checkpoint": checkpoint_id}, params=params)
        )

    def rollout(self, deployment: str) -> dict[str, Any]:
        """The rollout record with its status: served per replica and the ``Ready`` condition."""
        return dict(self.call("GET", f"/v1/rollouts/{deployment}"))

    def wait_rollout_ready(
        self, deployment: str, revision: int, timeout: float = 180.0, interval: float = 0.5
    ) -> dict[str, Any]:
        """Wait until every inference replica serves ``revision`` (or a later one) of the rollout:
        its ``Ready`` condition is True (the replicas' heartbeats, as KServe's status)."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.rollout(deployment)
            (cond,) = [c for c in view["status"]["conditions"] if c["type"] == "Ready"]
            if view["revision"] >= revision and cond["status"] == "True":
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rollout {deployment} revision {revision} not ready after {timeout:.0f} s: {cond['message']}"
                )
            time.sleep(interval)


# ------------------------------------------------------------------------------------ gRPC
class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer <token>`` to every call (the inference service checks it)."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


# A call refused with UNAVAILABLE before any response (a replica that is draining or still loading)
# is retried, on the next replica with round_robin. Only calls without a response yet are retried.
RETRY_UNAVAILABLE = {
    "methodConfig": [
        {
            "name": [{"service": "huvidpo.v1.VideoGenerationService"}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


def channel(address: str, token: str | None = None) -> grpc.Channel:
    """A channel to the inference service; with ``token``, every call carries it. In a cluster pass
    ``dns:///huvidpo-inference-headless:50051`` (the headless Service: every ready pod's address);
    ``round_robin`` then spreads the calls over all replicas instead of sending them all down one
    connection, and a call a draining replica refuses is retried on another (deploy/README.md)."""
    ch = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.service_config", json.dumps(RETRY_UNAVAILABLE)),
        ],
    )
    return grpc.intercept_channel(ch, _Bearer(token)) if token else ch


def stub(ch: grpc.Channel) -> pb_grpc.VideoGenerationServiceStub:
    return pb_grpc.VideoGenerationServiceStub(ch)


def generate(
    s: pb_grpc.VideoGenerationServiceStub,
    request: pb.GenerateRequest,
    on_progress: Callable[[pb.Progress], None] | None = None,
    timeout: float = 600.0,
) -> pb.GenerationResult:
    """One streamed Generate call; ``on_progress`` sees every progress event; returns the result."""
    result = None
    stream: Iterator[pb.GenerateResponse] = s.Generate(request, timeout=timeout)
    for event in stream:
        if event.HasField("progress"):
            if on_progress is not None:
                on_progress(event.progress)
        elif event.HasField("result"):
            result = event.result
    if result is None:
        raise RuntimeError("the Generate stream ended without a result")
    return result


def wait_serving_checkpoint(
    s: pb_grpc.VideoGenerationServiceStub, checkpoint_id: str, timeout: float = 180.0
) -> pb.ListModelsResponse:
    """Poll ListModels until the service's applied rollout serves ``checkpoint_id`` as current."""
    deadline = time.monotonic() + timeout
    while True:
        resp = s.ListModels(pb.ListModelsRequest(), timeout=10)
        if resp.rollout.current == checkpoint_id and any(
            m.id == checkpoint_id and m.role == pb.MODEL_ROLE_CURRENT for m in resp.models
        ):
            return resp
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the inference service did not start serving {checkpoint_id} in {timeout:.0f} s "
                f"(it serves {resp.rollout.current or 'the base model'})"
            )
        time.sleep(0.5)
