"""gRPC side of the token table (``services.common.auth``): a server interceptor that checks the
``authorization: Bearer <token>`` metadata of every call against the same table and scopes as REST.

``Generate`` needs ``generate``; ``GetModel``/``ListModels`` need ``read``; health is open when
``HUVIDPO_INFERENCE_HEALTH_OPEN`` (probes carry no token); reflection, when enabled, needs a valid
token of any scope. A missing or unknown token is UNAUTHENTICATED, a missing scope PERMISSION_DENIED.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from services.common.auth import Principal, TokenTable, bearer

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."


def method_scopes(method: str, service: str) -> tuple[str, ...] | None:
    """The scopes a call of ``method`` (``/package.Service/Method``) accepts: ``()`` for any valid
    token, ``None`` for no token at all (open)."""
    name = method.rsplit("/", 1)[-1]
    if method.startswith(f"/{service}/"):
        return ("generate",) if name == "Generate" else ("read",)
    return ()


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call with ``code``."""

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort, **kw)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, table: TokenTable, service: str, health_open: bool = True) -> None:
        self.table = table
        self.service = service
        self.health_open = health_open

    def check(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | Principal | None:
        """The caller's principal, None for an open method, or the status and message to end with."""
        if self.health_open and method.startswith(HEALTH_PREFIX):
            return None
        scopes = method_scopes(method, self.service)
        if scopes is None:
            return None
        header = next((str(v) for k, v in (metadata or ()) if k == "authorization"), "")
        token = bearer(header)
        if token is None and not self.table.open:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "a bearer token is required (metadata 'authorization: Bearer <token>')",
            )
        principal = self.table.verify(token or "")
        if principal is None:
            return grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid"
        if not principal.allows(*scopes):
            name = method.rsplit("/", 1)[-1]
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name} needs the '{' or '.join(scopes)}' scope; token '{principal.name}' has "
                f"{sorted(principal.scopes)}",
            )
        return principal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        outcome = self.check(handler_call_details.method, handler_call_details.invocation_metadata)
        if isinstance(outcome, tuple):
            return _deny(handler, *outcome)
        return handler
