"""Rating endpoints of the rating UI: upserted scores and A/B choices, rating sessions with progress,
authenticated video files, and compiling the ratings into a new dataset version with lineage.

``GET``/``POST /v1/datasets/{name}/ratings`` (append records as given) live in ``routers/datasets.py``;
the endpoints here are the ones a person rating in a browser needs: one judgment per rater and video
(or pair), replaced when they change their mind.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from services.common.auth import Principal
from services.controlplane import problems
from services.controlplane.auth import needs
from services.controlplane.deps import Context, ctx
from services.controlplane.domain.datasets import PairOptions
from services.controlplane.domain.errors import InvalidRequest
from services.controlplane.domain.names import VERSION_PATTERN
from services.controlplane.domain.ratings import SESSION_MAX_PAGE_SIZE, SESSION_PAGE_SIZE, RatingService
from services.controlplane.params import NamePath, RelativePathPath, VersionPath
from services.controlplane.schemas import DatasetVersion, PairsReport, Strict, VersionRef

router = APIRouter(prefix="/v1/datasets", tags=["ratings"])

RaterId = Field(
    default=None,
    min_length=1,
    max_length=256,
    pattern=r"^[^\x00-\x1f\x7f]+$",
    description="optional: the rater is the token's name; a different id is refused (403)",
)
VideoId = Field(min_length=1, max_length=256)
VIDEO_MEDIA = {".mp4": "video/mp4", ".webm": "video/webm", ".gif": "image/gif", ".mov": "video/quicktime"}


class ScorePut(Strict):
    """A rater's absolute score of one video of a version (replaces their earlier score)."""

    version: VersionRef
    rater_id: str | None = RaterId
    video_id: str = VideoId
    score: float = Field(ge=0, le=10)


class ChoicePut(Strict):
    """A rater's A/B judgment of two videos of one prompt (replaces their earlier judgment)."""

    version: VersionRef
    rater_id: str | None = RaterId
    left: str = VideoId
    right: str = VideoId
    winner: Literal["left", "right", "tie"]


class StoredJudgment(BaseModel):
    id: str
    record: dict[str, Any] | None = None
    tie: dict[str, Any] | None = None
    version: str


class CompileRequest(Strict):
    base: VersionRef | None = Field(
        default=None, description="version to add the ratings to (default: latest)"
    )
    tie_policy: Literal["drop", "keep"] = "drop"
    min_margin: float = Field(default=0.0, ge=0, le=10)
    margin_weighting: bool = False


class DroppedJudgment(BaseModel):
    id: str
    reason: str


class CompileResult(BaseModel):
    version: DatasetVersion
    lineage: dict[str, Any]
    pairs: PairsReport
    dropped: list[DroppedJudgment] = Field(
        default_factory=list,
        description="every stored judgment not compiled, and why (superseded, or names a video the base lacks)",
    )


class Progress(BaseModel):
    done: int
    total: int


class SessionVideo(BaseModel):
    id: str
    prompt: str
    file: str
    score: float | None
    time: str | None


class PairSide(BaseModel):
    id: str
    file: str


class SessionPair(BaseModel):
    key: str
    prompt: str
    first_frame: str | None
    on_policy: bool
    left: PairSide
    right: PairSide
    choice: Literal["left", "right", "tie"] | None
    time: str | None


class RatingSession(BaseModel):
    dataset: str
    version: str
    rater_id: str
    videos: list[SessionVideo]
    pairs: list[SessionPair] = Field(description="one page of the A/B pairs, from index pairs_offset")
    pairs_offset: int = 0
    next_page_token: str | None = Field(default=None, description="the next page of pairs (page_token)")
    progress: dict[str, Progress]
    resume: dict[str, int]


def _rater(who: Principal, given: str | None) -> str:
    """The rater id: the token's name. A different ``rater_id`` is refused, so nobody rates in
    another's name; only the open dev mode (no token at all) takes the id the page sends."""
    if who.anonymous:
        if not given:
            raise InvalidRequest(
                "rater_id is required when the service runs without tokens", field="rater_id"
            )
        return given
    if given is not None and given != who.name:
        raise HTTPException(
            403,
            f"token '{who.name}' rates as '{who.name}'; rater_id '{given}' is someone else "
            "(leave rater_id out, or sign in with that rater's token)",
        )
    return who.name


def _svc(c: Context) -> RatingService:
    return RatingService(c.datasets, c.datasets.clock)


@router.get(
    "/{name}/rating-session",
    response_model=RatingSession,
    responses=problems.common_responses(401, 404, 422),
    summary="Videos, A/B pairs, this rater's judgments, progress and where to resume",
)
def rating_session(
    name: NamePath,
    rater_id: str | None = Query(None, min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$"),
    version: str | None = Query(None, pattern=VERSION_PATTERN),
    page_size: int = Query(
        SESSION_PAGE_SIZE, ge=1, le=SESSION_MAX_PAGE_SIZE, description="A/B pairs per page"
    ),
    page_token: str | None = Query(
        None, pattern=r"^[0-9]{1,9}$", description="the `next_page_token` of the previous page"
    ),
    c: Context = Depends(ctx),
    who: Principal = needs("rate"),
) -> dict[str, Any]:
    return _svc(c).session(name, version, _rater(who, rater_id), page_size, page_token)


@router.put(
    "/{name}/ratings/score",
    response_model=StoredJudgment,
    responses=problems.common_responses(401, 403, 404, 422),
    summary="Set a rater's 0-10 score of a video (an update when they rated it before)",
)
def put_score(
    name: NamePath, body: ScorePut, c: Context = Depends(ctx), who: Principal = needs("rate")
) -> dict[str, Any]:
    return _svc(c).put_score(name, body.version, _rater(who, body.rater_id), body.video_id, body.score)


@router.put(
    "/{name}/ratings/choice",
    response_model=StoredJudgment,
    responses=problems.common_responses(401, 403, 404, 422),
    summary="Set a rater's A/B judgment (left, right or tie) of two videos of one prompt",
)
def put_choice(
    name: NamePath, body: ChoicePut, c: Context = Depends(ctx), who: Principal = needs("rate")
) -> dict[str, Any]:
    rater = _rater(who, body.rater_id)
    return _svc(c).put_choice(name, body.version, rater, body.left, body.right, body.winner)


@router.post(
    "/{name}/ratings/compile",
    status_code=201,
    response_model=CompileResult,
    responses=problems.common_responses(401, 403, 404, 409, 422),
    summary="Compile the ratings into a new dataset version (with lineage) and its DPO pairs",
)
def compile_ratings(
    name: NamePath,
    body: CompileRequest | None = None,
    c: Context = Depends(ctx),
    who: Principal = needs("data"),
) -> dict[str, Any]:
    body = body or CompileRequest()
    options = PairOptions(body.tie_policy, body.min_margin, body.margin_weighting)
    return _svc(c).compile(name, body.base, options, created_by=who.name)


@router.get(
    "/{name}/versions/{version}/files/{path:path}",
    dependencies=[needs("read", "rate")],
    response_class=FileResponse,
    responses={
        200: {"content": {m: {} for m in (*VIDEO_MEDIA.values(), "application/octet-stream")}},
        **problems.common_responses(401, 404, 422),
    },
    summary="One video file of a version (for the rating page; supports Range requests)",
)
def get_video(
    name: NamePath, version: VersionPath, path: RelativePathPath, c: Context = Depends(ctx)
) -> FileResponse:
    local = _svc(c).video_file(name, version, path)
    return FileResponse(
        local,
        media_type=VIDEO_MEDIA.get(local.suffix.lower(), "application/octet-stream"),
        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )
