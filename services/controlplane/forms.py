"""The forms the API's string patterns stand for, in words, for the 422 a person reads.

The OpenAPI schema declares each pattern the server enforces (params.py, schemas.py); pydantic's own
message for a value outside one is the regular expression ("String should match pattern
'^ckpt-[a-z0-9-]{1,63}-[0-9]{1,10}$'"), which says what is wrong only to someone who reads regexes. The
problem handler replaces it with the form below and the value that was sent. A test checks that every
pattern in the OpenAPI document has its words here.
"""

from __future__ import annotations

from typing import Any

from services.controlplane.domain.names import (
    DIGEST_PATTERN,
    NAME_PATTERN,
    RELATIVE_PATH_PATTERN,
    VERSION_PATTERN,
)
from services.controlplane.domain.util import PAGE_TOKEN_PATTERN
from services.controlplane.params import (
    CHECKPOINT_ID_PATTERN,
    EVALUATION_ID_PATTERN,
    NAME_FORM,
    OBJECT_KEY_PATTERN,
    RATING_ID_PATTERN,
    UPLOAD_ID_PATTERN,
)
from services.controlplane.schemas import CHECKPOINT_PATTERN, DATASET_FILE_PATTERN, SERVED_PATTERN

_CHECKPOINT = "a checkpoint id, ckpt-<fine-tune id>-<step> (`huvidpo checkpoints list` shows them)"
_SERVED = f"`base` or {_CHECKPOINT}"

FORMS: dict[str, str] = {
    NAME_PATTERN: NAME_FORM,
    VERSION_PATTERN: "a dataset version: its id (64 lower-case hex digits) or its digest (sha256:<id>); "
    "`huvidpo datasets show NAME` lists them",
    DIGEST_PATTERN: "64 lower-case hex digits",
    CHECKPOINT_ID_PATTERN: _CHECKPOINT,
    CHECKPOINT_PATTERN: _CHECKPOINT,
    SERVED_PATTERN: _SERVED,
    f"^(base|{CHECKPOINT_ID_PATTERN.strip('^$')})$": _SERVED,
    EVALUATION_ID_PATTERN: "an evaluation id as the API returned it, ev-<hex>",
    UPLOAD_ID_PATTERN: "an upload session id as the API returned it, up-<id>",
    RATING_ID_PATTERN: "a rating id as the API returned it",
    RELATIVE_PATH_PATTERN: "a relative path of at most 8 parts of letters, digits, '.', '_' and '-', "
    "none starting with '.'",
    DATASET_FILE_PATTERN: "a relative path of at most 8 parts of letters, digits, '.', '_' and '-', none "
    "starting with '.', ending in a dataset file type (.mp4, .webm, .mov, .mkv, .avi, .gif, .json, .jsonl)",
    OBJECT_KEY_PATTERN: "an object key as the presigned URL the API issued names it",
    PAGE_TOKEN_PATTERN: "the next_page_token of the previous page, unchanged",
    r"^[0-9]{1,9}$": "the next_page_token of the previous page, unchanged",
    r"^[^\x00-\x1f\x7f]+$": "text without control characters",
    r"^imports/[A-Za-z0-9_-][A-Za-z0-9._/-]*$": "a store prefix under imports/ (letters, digits, '.', '_', "
    "'-' and '/')",
    r"^sha256:[0-9a-f]{64}$": "sha256:<64 lower-case hex digits>",
}

MAX_ECHO = 64  # characters of the sent value repeated in the message


def pattern_mismatch(pattern: str, value: Any) -> str | None:
    """The message for ``value`` outside ``pattern``: the form expected and what was sent; None when the
    pattern has no words here (the caller keeps pydantic's message)."""
    form = FORMS.get(pattern)
    if form is None:
        return None
    sent = (
        repr(value) if not isinstance(value, str) or len(value) <= MAX_ECHO else repr(value[:MAX_ECHO]) + "…"
    )
    return f"expected {form}; got {sent}"
