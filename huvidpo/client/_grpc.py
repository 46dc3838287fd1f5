"""The gRPC side of the SDK: a channel to the inference service (bearer token, round_robin, retries of
calls refused with UNAVAILABLE before any answer) and the streamed ``Generate`` call."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from huvidpo.client.errors import GenerationError
from services.inference.gen import inference_pb2 as pb
from services.inference.gen import inference_pb2_grpc as pb_grpc

DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"


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


def service_config(attempts: int) -> str:
    """gRPC's own retry of a call refused with UNAVAILABLE before any response (a replica that is
    draining or still loading): with round_robin, the next try goes to the next replica."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": "huvidpo.v1.VideoGenerationService"}],
                    "retryPolicy": {
                        "maxAttempts": max(2, min(attempts, 5)),
                        "initialBackoff": "0.2s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def channel(address: str, token: str | None = None, attempts: int = 4) -> grpc.Channel:
    """A channel to the inference service; with ``token`` every call carries it. In a cluster pass
    ``dns:///huvidpo-inference-headless:50051`` so round_robin spreads calls over every replica."""
    ch = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.service_config", service_config(attempts)),
        ],
    )
    return grpc.intercept_channel(ch, _Bearer(token)) if token else ch


def stub(ch: grpc.Channel) -> pb_grpc.VideoGenerationServiceStub:
    return pb_grpc.VideoGenerationServiceStub(ch)


def as_generation_error(exc: grpc.RpcError) -> GenerationError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return GenerationError(code, details or "")


@dataclass
class Generation:
    """A finished generation: the saved video (``path``, None when not saved), its bytes' size and
    the service's result (checkpoint that made it, seed, request id, timings)."""

    path: Path | None
    video: bytes
    result: pb.GenerationResult

    @property
    def checkpoint_id(self) -> str:
        return str(self.result.checkpoint_id)

    @property
    def request_id(self) -> str:
        return str(self.result.request_id)

    @property
    def seed(self) -> int:
        return int(self.result.seed)


def run_generate(
    s: pb_grpc.VideoGenerationServiceStub,
    request: pb.GenerateRequest,
    on_progress: Callable[[pb.Progress], None] | None,
    timeout: float,
) -> pb.GenerationResult:
    """One streamed Generate call; ``on_progress`` sees every progress event; returns the result.
    Raises ``grpc.RpcError`` (the caller maps and retries it)."""
    result = None
    stream: Iterator[pb.GenerateResponse] = s.Generate(request, timeout=timeout)
    for event in stream:
        if event.HasField("progress"):
            if on_progress is not None:
                on_progress(event.progress)
        elif event.HasField("result"):
            result = event.result
    if result is None:
        raise GenerationError(grpc.StatusCode.INTERNAL, "the Generate stream ended without a result")
    return result
