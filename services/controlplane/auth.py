"""Bearer-token auth: the settings hold sha256 digests of accepted tokens, never the tokens.

``tokens`` may read and write; ``read_tokens`` may only read (a write gets 403). With no token
configured at all, auth is off (the embedded single-user default; the app logs a warning at start).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request
from starlette.exceptions import HTTPException

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class TokenTable:
    write: tuple[str, ...]
    read: tuple[str, ...]

    @property
    def enabled(self) -> bool:
        return bool(self.write or self.read)

    def role(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        # compare against every entry (constant time per entry, no early exit on a match)
        is_write = any([hmac.compare_digest(digest, d) for d in self.write])
        is_read = any([hmac.compare_digest(digest, d) for d in self.read])
        return "write" if is_write else "read" if is_read else None


def hash_token(token: str) -> str:
    """The digest to put in ``HUVIDPO_CONTROLPLANE_TOKENS`` for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def require_auth(request: Request) -> str:
    """FastAPI dependency: 401 without a valid bearer token, 403 for a read-only token on a write."""
    table: TokenTable = request.app.state.tokens
    if not table.enabled:
        return "write"
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="huvidpo"'}
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            401, "a bearer token is required (Authorization: Bearer <token>)", headers=challenge
        )
    role = table.role(token.strip())
    if role is None:
        raise HTTPException(
            401,
            "the bearer token is not valid",
            headers={**challenge, "WWW-Authenticate": 'Bearer realm="huvidpo", error="invalid_token"'},
        )
    if role == "read" and request.method in WRITE_METHODS:
        raise HTTPException(403, "this token may only read; writes need a read-write token")
    return role
