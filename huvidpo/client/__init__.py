"""The HuViDPO Python SDK: ``from huvidpo.client import Client``.

It talks to a deployed system only through its public interfaces (the control plane's REST API, the
inference service's gRPC API) and needs the ``client`` extra (``pip install "huvidpo[client]"``: httpx,
grpcio, protobuf). Nothing else in ``huvidpo`` imports it. See docs/client.md.
"""

from __future__ import annotations

from huvidpo.client.client import TERMINAL, Client, ready_condition
from huvidpo.client.errors import (
    ApiError,
    Conflict,
    ConnectionFailed,
    ExitCode,
    Forbidden,
    GenerationError,
    HuViDPOError,
    InvalidInput,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    UploadInterrupted,
    WaitTimeout,
    exit_code,
)

__all__ = [
    "TERMINAL",
    "ApiError",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "ExitCode",
    "Forbidden",
    "GenerationError",
    "HuViDPOError",
    "InvalidInput",
    "NotFound",
    "RateLimited",
    "ServerError",
    "Unauthorized",
    "UploadInterrupted",
    "WaitTimeout",
    "exit_code",
    "ready_condition",
]
