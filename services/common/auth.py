"""Bearer tokens with a name and scopes, shared by the REST control plane and gRPC inference.

The settings hold sha256 digests of accepted tokens, never the tokens. One table, one parser:

- ``HUVIDPO_TOKENS`` (and the lines of the file ``HUVIDPO_TOKENS_FILE``, e.g. a mounted Secret):
  entries ``name:scope[,scope...]:sha256hex`` separated by ``;``, newlines or spaces; ``#`` starts a
  comment in the file. Example: ``alice:rate:3b1f...;ci:read,train,rollout:9ac2...``.
- The older ``HUVIDPO_CONTROLPLANE_TOKENS`` (comma-separated plain digests) still reads: each is an
  ``admin`` token named ``token-<first 8 hex>``; ``HUVIDPO_CONTROLPLANE_READ_TOKENS`` gives ``read``
  tokens named the same way. ``HUVIDPO_TOKENS`` may use these plain digests too.

Scopes: ``read`` (every GET of the API), ``rate`` (the rating page only: list datasets and versions,
the rating session, video files, one's own scores and choices), ``data`` (create and upload datasets,
derive, compile pairs and ratings), ``train`` (start and cancel fine-tunes), ``rollout`` (change
rollouts), ``generate`` (gRPC ``Generate``), ``admin`` (everything, deletes included).

Fail closed: an empty table is a start-up error unless ``HUVIDPO_DEV_MODE`` is on and the service
listens on a loopback address; the well-known development token and store key are refused unless
dev mode is on. ``verify`` is the one check every transport calls.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Scope = Literal["read", "rate", "data", "train", "rollout", "generate", "admin"]
SCOPES: frozenset[str] = frozenset(get_args(Scope))

DEV_TOKEN = "huvidpo-dev-token"
DEV_TOKEN_DIGEST = hashlib.sha256(DEV_TOKEN.encode()).hexdigest()
DEV_STORE_ACCESS_KEY = "huvidpo-dev"
DEV_STORE_SECRET_KEY = "huvidpo-dev-secret-not-for-production"
# The public development store keys of deploy/overlays/cpu-dev/store-*.dev.env: root and one per component.
DEV_STORE_ACCESS_KEYS = frozenset(
    {DEV_STORE_ACCESS_KEY} | {f"huvidpo-dev-{c}" for c in ("controlplane", "trainer", "inference")}
)
DEV_STORE_SECRET_KEYS = frozenset(
    {DEV_STORE_SECRET_KEY}
    | {f"huvidpo-dev-{c}-secret-not-for-production" for c in ("controlplane", "trainer", "inference")}
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class AuthConfigError(ValueError):
    """The token table or dev-mode settings cannot be used; the message names the setting, never a
    token or a digest."""


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's name and its scopes (``admin`` holds every scope)."""

    name: str
    scopes: frozenset[str]
    # True only for the open, unauthenticated access of dev mode with no token configured.
    anonymous: bool = False

    def allows(self, *needed: str) -> bool:
        """Whether any one of ``needed`` is granted (``admin`` grants all; none needed: any token)."""
        return not needed or "admin" in self.scopes or any(s in self.scopes for s in needed)


DEV_PRINCIPAL = Principal("dev", frozenset({"admin"}), anonymous=True)


@dataclass(frozen=True)
class TokenEntry:
    name: str
    scopes: frozenset[str]
    digest: str


def hash_token(token: str) -> str:
    """The sha256 hex digest to put in a token table entry for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def _legacy(digest: str, scopes: frozenset[str], setting: str) -> TokenEntry:
    digest = digest.strip().lower()
    if not _HEX64.match(digest):
        raise AuthConfigError(f"{setting}: each token must be a sha256 hex digest (64 hex characters)")
    return TokenEntry(f"token-{digest[:8]}", scopes, digest)


def parse_entries(text: str, setting: str = "HUVIDPO_TOKENS") -> list[TokenEntry]:
    """Entries ``name:scope,scope:digest`` (or plain digests: ``admin``) separated by ``;``, newlines
    or spaces; ``#`` to the end of a line is a comment. Raises ``AuthConfigError`` naming ``setting``
    and the entry's position, never its digest."""
    entries: list[TokenEntry] = []
    lines = [line.split("#", 1)[0] for line in text.splitlines()]
    chunks = [c for line in lines for c in re.split(r"[;\s]+", line) if c]
    for n, chunk in enumerate(chunks, 1):
        if ":" not in chunk:  # legacy: comma-separated digests
            entries += [_legacy(d, frozenset({"admin"}), setting) for d in chunk.split(",") if d.strip()]
            continue
        parts = chunk.split(":")
        if len(parts) != 3:
            raise AuthConfigError(f"{setting}: entry {n} is not name:scope[,scope...]:sha256-digest")
        name, scope_text, digest = parts
        digest = digest.lower()
        if not _NAME.match(name):
            raise AuthConfigError(
                f"{setting}: entry {n} has an invalid name (letters, digits, . _ @ -; at most 64)"
            )
        scopes = frozenset(s.strip() for s in scope_text.split(",") if s.strip())
        unknown = sorted(scopes - SCOPES)
        if not scopes or unknown:
            raise AuthConfigError(
                f"{setting}: entry {n} ({name}) has unknown or no scopes {unknown}; known: {sorted(SCOPES)}"
            )
        if not _HEX64.match(digest):
            raise AuthConfigError(
                f"{setting}: entry {n} ({name}) needs a sha256 hex digest (64 hex characters)"
            )
        entries.append(TokenEntry(name, scopes, digest))
    return entries


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TokenTable:
    """The accepted tokens. ``verify`` hashes the presented token and compares it with every entry
    in constant time per entry (no early exit on a match)."""

    def __init__(self, entries: Iterable[TokenEntry], dev_mode: bool = False) -> None:
        self.entries = tuple(entries)
        self.dev_mode = dev_mode
        names = [e.name for e in self.entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise AuthConfigError(f"token names must be unique; repeated: {dupes}")
        digests = [e.digest for e in self.entries]
        if len(set(digests)) != len(digests):
            raise AuthConfigError("two token entries have the same digest")

    @property
    def open(self) -> bool:
        """No token configured (only allowed in dev mode on loopback): every caller is ``DEV_PRINCIPAL``."""
        return not self.entries

    def verify(self, token: str) -> Principal | None:
        """The principal of bearer ``token``, or None if it is not valid."""
        if self.open:
            return DEV_PRINCIPAL
        digest = hash_token(token)
        found: TokenEntry | None = None
        for e in self.entries:
            if hmac.compare_digest(digest, e.digest):
                found = e
        if found is None or (found.digest == DEV_TOKEN_DIGEST and not self.dev_mode):
            return None
        return Principal(found.name, found.scopes)


@dataclass(frozen=True)
class AuthConfig:
    """What the token table is built from (the service settings' auth fields)."""

    tokens: list[str]
    read_tokens: list[str]
    tokens_file: Path | None
    dev_mode: bool


def load_table(cfg: AuthConfig, host: str, service: str) -> TokenTable:
    """The token table of a service listening on ``host``, or ``AuthConfigError``: an empty table
    outside dev mode or off loopback, the dev token outside dev mode, a malformed entry."""
    entries: list[TokenEntry] = []
    for raw in cfg.tokens:
        entries += parse_entries(raw, "HUVIDPO_TOKENS")
    entries += [_legacy(d, frozenset({"read"}), "HUVIDPO_CONTROLPLANE_READ_TOKENS") for d in cfg.read_tokens]
    if cfg.tokens_file is not None:
        try:
            text = Path(cfg.tokens_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise AuthConfigError(f"HUVIDPO_TOKENS_FILE: cannot read {cfg.tokens_file}: {reason}") from None
        entries += parse_entries(text, "HUVIDPO_TOKENS_FILE")
    if not cfg.dev_mode and any(e.digest == DEV_TOKEN_DIGEST for e in entries):
        raise AuthConfigError(
            f"{service}: the token table holds the public development token (sha256 of {DEV_TOKEN!r}); "
            "replace it, or set HUVIDPO_DEV_MODE=1 on a development machine"
        )
    if not entries:
        if not cfg.dev_mode:
            raise AuthConfigError(
                f"{service}: no bearer token configured (HUVIDPO_TOKENS, HUVIDPO_TOKENS_FILE); "
                "set one, or HUVIDPO_DEV_MODE=1 to run open on a loopback address"
            )
        if not is_loopback(host):
            raise AuthConfigError(
                f"{service}: no bearer token configured and the service listens on {host}, not a loopback "
                "address; dev mode runs without tokens only on 127.0.0.1, ::1 or localhost"
            )
    return TokenTable(entries, dev_mode=cfg.dev_mode)


def check_store_key(access_key: str, secret_key: str, dev_mode: bool, service: str) -> None:
    """Refuse the public development store key outside dev mode."""
    if dev_mode:
        return
    if access_key in DEV_STORE_ACCESS_KEYS or secret_key in DEV_STORE_SECRET_KEYS:
        raise AuthConfigError(
            f"{service}: HUVIDPO_STORE_ACCESS_KEY/SECRET_KEY hold a public development store key "
            "(deploy/overlays/cpu-dev/store-*.dev.env); use the store's real credentials, or set "
            "HUVIDPO_DEV_MODE=1 on a development machine"
        )


def bearer(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
