"""Path and query parameters shared by the routers, each declaring in the OpenAPI schema the constraint
the server enforces (pattern, length, bounds), so generated clients know it and a value outside it is
refused before the route runs (422 ``validation-error`` naming ``path:<name>`` or ``query:<name>``).

New routes take their parameters from here (``name: NamePath``, ``page_size: PageSize = 50``,
``page_token: PageToken = None``) rather than a bare ``str``: a bare ``str`` documents "any string" and
the domain then refuses most of them, which the schema did not say.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from services.common.records.keys import CHECKPOINT_ID_RE
from services.controlplane.domain.names import (
    MAX_PATH_LEN,
    NAME_PATTERN,
    RELATIVE_PATH_PATTERN,
    VERSION_PATTERN,
)
from services.controlplane.domain.util import MAX_PAGE_SIZE, PAGE_TOKEN_MAX_LEN, PAGE_TOKEN_PATTERN

# Keys of the objects a presigned URL names: '/'-separated segments of letters, digits, '.', '_' and
# '-', none starting with '.' (the store refuses '.', '..', empty and reserved segments).
OBJECT_KEY_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$"
EVALUATION_ID_PATTERN = r"^ev-[a-z0-9]{1,40}$"
UPLOAD_ID_PATTERN = r"^up-[A-Za-z0-9]{1,64}$"
RATING_ID_PATTERN = r"^[A-Za-z0-9]*-[A-Za-z0-9-]*$"
NAME_FORM = "1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"

NamePath = Annotated[
    str, Path(pattern=NAME_PATTERN, min_length=1, max_length=63, description=f"a resource name: {NAME_FORM}")
]
"""A dataset, deployment or base-model name in the path."""

VersionPath = Annotated[
    str,
    Path(
        pattern=VERSION_PATTERN,
        description="a dataset version: its `id` (64 lower-case hex) or its `digest` (`sha256:<id>`)",
    ),
]

FineTuneIdPath = Annotated[
    str,
    Path(
        pattern=NAME_PATTERN,
        min_length=1,
        max_length=63,
        description="a fine-tune id as the API returned it (`ft-<hex>`)",
        examples=["ft-0123456789abcdef0123"],
    ),
]

CHECKPOINT_ID_PATTERN = CHECKPOINT_ID_RE.pattern.replace("?P<finetune>", "").replace("?P<step>", "")
CheckpointIdPath = Annotated[
    str,
    Path(
        pattern=CHECKPOINT_ID_PATTERN,
        max_length=80,
        description="a checkpoint id: `ckpt-<finetune_id>-<step>`",
        examples=["ckpt-ft-0123456789abcdef0123-100"],
    ),
]

EvaluationIdPath = Annotated[
    str,
    Path(
        pattern=EVALUATION_ID_PATTERN,
        description="an evaluation id as the API returned it (`ev-<hex>`)",
        examples=["ev-0123456789abcdef0123"],
    ),
]

UploadIdPath = Annotated[
    str,
    Path(
        pattern=UPLOAD_ID_PATTERN,
        description="an upload session id as the API returned it (`up-<hex>`)",
        examples=["up-0123456789abcdef"],
    ),
]

# Ids the API issues (``r-<hex>``, ``u<hex>-s<hex>``, ``u<hex>-c<hex>``) hold a '-': so ``score``,
# ``choice`` and ``compile``, sibling routes under ``ratings/``, are never rating ids.
RatingIdPath = Annotated[
    str,
    Path(
        pattern=RATING_ID_PATTERN,
        max_length=80,
        description="a stored rating's id as the API returned it",
        examples=["r-0123456789abcdef01234567"],
    ),
]

RelativePathPath = Annotated[
    str,
    Path(
        pattern=RELATIVE_PATH_PATTERN,
        max_length=MAX_PATH_LEN,
        description="a file's path inside the dataset version, as listed in its `files`",
    ),
]

ObjectKeyPath = Annotated[
    str,
    Path(
        pattern=OBJECT_KEY_PATTERN,
        max_length=1024,
        description="the object's key, as in the presigned URL the API issued",
    ),
]

PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="items per page")]

PageToken = Annotated[
    str | None,
    Query(
        pattern=PAGE_TOKEN_PATTERN,
        min_length=1,
        max_length=PAGE_TOKEN_MAX_LEN,
        description="the `next_page_token` of the previous page, unchanged (opaque); a token this API "
        "did not issue is refused with 422",
    ),
]
