"""Small helpers shared by the domain modules: clocks, ids, pagination tokens, store JSON reads."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from services.common.store import ObjectNotFound, ObjectStore
from services.controlplane.domain.errors import InvalidRequest, NotFound

Clock = Callable[[], datetime]
T = TypeVar("T")

MAX_PAGE_SIZE = 200
# Page tokens are opaque to callers: unpadded base64url, as ``encode_page_token`` makes them.
PAGE_TOKEN_PATTERN = r"^[A-Za-z0-9_-]+$"
PAGE_TOKEN_MAX_LEN = 500


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def new_id(prefix: str, nbytes: int = 8) -> str:
    return f"{prefix}-{secrets.token_hex(nbytes)}"


def read_json(store: ObjectStore, key: str, what: str) -> Any:
    """``store.get_json(key)``, with a missing object turned into the domain's :class:`NotFound`."""
    try:
        return store.get_json(key)
    except ObjectNotFound as exc:
        raise NotFound(f"{what} not found") from exc


def read_json_or_none(store: ObjectStore, key: str) -> Any:
    try:
        return store.get_json(key)
    except ObjectNotFound:
        return None


def encode_page_token(last: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": last}).encode()).decode().rstrip("=")


def decode_page_token(token: str | None) -> str | None:
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after = data["after"]
        if not isinstance(after, str):
            raise ValueError
        return after
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidRequest("page_token is not a token this API returned", field="page_token") from exc


def paginate(
    items: Sequence[T],
    key: Callable[[T], str],
    page_size: int,
    page_token: str | None,
    descending: bool = False,
) -> tuple[list[T], str | None]:
    """One page of ``items`` (already sorted by ``key``, descending if so) after the token, and the next token.

    Tokens hold the last key seen, not an offset, so a page stays right when items are added meanwhile."""
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"page_size must be in [1, {MAX_PAGE_SIZE}]", field="page_size")
    after = decode_page_token(page_token)
    start = 0
    if after is not None:
        start = next(
            (i for i, it in enumerate(items) if (key(it) < after if descending else key(it) > after)),
            len(items),
        )
    page = list(items[start : start + page_size])
    more = start + page_size < len(items)
    return page, (encode_page_token(key(page[-1])) if more and page else None)
