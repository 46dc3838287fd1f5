"""Preference datasets on disk: a directory with a manifest and video files.

Layout::

    DATASET/
      manifest.jsonl      one JSON record per line (or manifest.json: a JSON list of the same records)
      videos/*.mp4        any relative paths under DATASET

Records (``type`` may be omitted when the record's keys say which it is):

``video``
    ``{"type": "video", "id": "v1", "file": "videos/v1.mp4", "prompt": "a cat turns to smile",
    "ratings": [{"rater_id": "alice", "score": 7.5, "time": "2026-01-02T10:00:00Z"}, ...]}``

    - ``id``: non-empty string, unique in the dataset.
    - ``file``: path relative to the dataset directory; it may not leave it (no ``..``, no absolute path).
    - ``prompt``: the text condition. ``category`` may stand in for it (the reference code used one fixed
      prompt per motion category); when both are given, ``prompt`` is the text and ``category`` is kept.
      Pairs are only ever made between videos with the same prompt text, because a DPO pair shares
      one text condition.
    - ``ratings`` (optional): absolute scores, each ``{"rater_id": str | int, "score": number in [0, 10],
      "time": str | number (optional, ``ts`` is accepted too)}``. A rater who rated a video twice counts
      once, with the rating that comes last in the manifest. A video's score is the mean over raters.
    - ``checkpoint``, ``first_frame``, ``sample``, ``seed`` (optional): how an on-policy A/B sample was
      made (``scripts/ab_samples.py``); ``meta`` (optional): anything of the user's own.
    - Any other key is an error naming the nearest known key (``"ratingz"``: did you mean ``ratings``?),
      so a misspelt key never silently drops data. Rating and choice records are checked the same way.

``rating``
    ``{"type": "rating", "video_id": "v1", "rater_id": "bob", "score": 3, "time": ...}``: one more
    score for a video defined anywhere in the manifest (what a rating service appends).

``choice``
    ``{"type": "choice", "chosen": "v1", "rejected": "v2", "rater_id": "bob", "time": ...}``: an
    explicit pairwise preference. Both ids must be videos of the same prompt.

Validation runs over the whole manifest and reports every problem at once in a :class:`DatasetError`
(a ``ValueError``) whose lines name the manifest file, the line and the field. Loading writes nothing;
:func:`write_manifest` validates first and then writes the manifest atomically (temporary file, then
rename), so a dataset directory never holds a half-written manifest.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAMES = ("manifest.jsonl", "manifest.json")
SCORE_MIN, SCORE_MAX = 0.0, 10.0
RATING_KEYS = frozenset({"rater_id", "score", "time", "ts"})
VIDEO_KEYS = frozenset(
    {
        "type",
        "id",
        "file",
        "prompt",
        "category",
        "ratings",
        "checkpoint",
        "first_frame",
        "sample",
        "seed",
        "meta",
    }
)
"""Keys a video record may have; any other key is an error (a typo would otherwise be ignored)."""
CHOICE_KEYS = frozenset({"type", "chosen", "rejected", "rater_id", "time", "ts"})
# Words people use for a known key that are too far from it for difflib to find.
_KEY_ALIASES = {
    "scores": "ratings",
    "score": "ratings",
    "text": "prompt",
    "path": "file",
    "rater": "rater_id",
}
_MAX_LISTED_ERRORS = 20


@dataclass(frozen=True)
class DatasetIssue:
    """One validation problem: where (file, line, field) and what."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: line {self.line}" if self.line is not None else self.file
        return f"{where}: field '{self.field}': {self.message}"


class DatasetError(ValueError):
    """A dataset (or pairs file) is invalid. ``issues`` lists every problem found; the message names the
    file, the line and the field of each."""

    def __init__(self, issues: list[DatasetIssue] | DatasetIssue | str) -> None:
        if isinstance(issues, str):
            issues = [DatasetIssue(issues, None, "-", "invalid")]
        elif isinstance(issues, DatasetIssue):
            issues = [issues]
        self.issues: list[DatasetIssue] = list(issues)
        lines = [str(i) for i in self.issues[:_MAX_LISTED_ERRORS]]
        if len(self.issues) > _MAX_LISTED_ERRORS:
            lines.append(f"... and {len(self.issues) - _MAX_LISTED_ERRORS} more problems")
        head = (
            "invalid dataset" if len(self.issues) == 1 else f"invalid dataset ({len(self.issues)} problems)"
        )
        super().__init__(head + ":\n  " + "\n  ".join(lines))


@dataclass(frozen=True)
class Rating:
    """One absolute score of one video by one rater (``score`` in [0, 10])."""

    rater_id: str
    score: float
    time: str | float | None = None


@dataclass(frozen=True)
class Choice:
    """An explicit pairwise preference: ``rater_id`` preferred ``chosen_id`` over ``rejected_id``."""

    chosen_id: str
    rejected_id: str
    rater_id: str
    time: str | float | None = None
    line: int | None = None


@dataclass
class VideoEntry:
    """One video of a dataset. ``path`` is absolute; ``num_frames``/``fps``/``motion`` are filled when the
    video was decoded during loading (``check_videos=True``), else ``None``."""

    id: str
    path: Path
    prompt: str
    ratings: list[Rating] = field(default_factory=list)
    file: str = ""
    category: str | None = None
    num_frames: int | None = None
    fps: float | None = None
    motion: float | None = None
    line: int | None = None

    @property
    def effective_ratings(self) -> list[Rating]:
        """One rating per rater: the last one given in the manifest."""
        last: dict[str, Rating] = {}
        for r in self.ratings:
            last.pop(r.rater_id, None)
            last[r.rater_id] = r
        return list(last.values())

    @property
    def mean_score(self) -> float | None:
        """Mean over raters of their score (0..10), ``None`` for an unrated video."""
        rs = self.effective_ratings
        return sum(r.score for r in rs) / len(rs) if rs else None


@dataclass
class PreferenceDataset:
    """A loaded, validated dataset. ``videos`` keeps manifest order."""

    root: Path
    manifest: Path
    videos: dict[str, VideoEntry]
    choices: list[Choice] = field(default_factory=list)

    @property
    def prompts(self) -> list[str]:
        """Distinct prompts, sorted."""
        return sorted({v.prompt for v in self.videos.values()})

    @property
    def raters(self) -> list[str]:
        """Distinct rater ids over ratings and choices, sorted."""
        ids = {r.rater_id for v in self.videos.values() for r in v.ratings}
        ids.update(c.rater_id for c in self.choices)
        return sorted(ids)


# -- parsing ---------------------------------------------------------------------------------------


def find_manifest(root: str | os.PathLike[str]) -> Path:
    """The manifest file of a dataset directory (``manifest.jsonl`` or ``manifest.json``)."""
    d = Path(root)
    if not d.is_dir():
        raise DatasetError(DatasetIssue(str(d), None, "-", "dataset directory not found"))
    found = [d / n for n in MANIFEST_NAMES if (d / n).is_file()]
    if not found:
        raise DatasetError(
            DatasetIssue(
                str(d), None, "-", f"no manifest: expected {' or '.join(MANIFEST_NAMES)} in the directory"
            )
        )
    if len(found) > 1:
        raise DatasetError(
            DatasetIssue(str(d), None, "-", "both manifest.jsonl and manifest.json exist; keep exactly one")
        )
    return found[0]


def _read_records(manifest: Path) -> tuple[list[tuple[int, Any]], list[DatasetIssue]]:
    """``[(line, record)]`` from a JSONL file or a JSON list, plus syntax problems."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as exc:
        return [], [DatasetIssue(str(manifest), None, "-", f"not UTF-8 text: {exc}")]
    records: list[tuple[int, Any]] = []
    issues: list[DatasetIssue] = []
    if manifest.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                issues.append(
                    DatasetIssue(str(manifest), n, "-", f"invalid JSON: {exc.msg} (column {exc.colno})")
                )
        return records, issues
    # A JSON list, decoded element by element so every record keeps its line number.
    dec = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        return [], [
            DatasetIssue(
                str(manifest), _line_of(text, pos), "-", "manifest.json must be a JSON list of records"
            )
        ]
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return [], []
    while True:
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            return records, [
                DatasetIssue(str(manifest), exc.lineno, "-", f"invalid JSON: {exc.msg} (column {exc.colno})")
            ]
        records.append((_line_of(text, pos), obj))
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]" and not text[pos + 1 :].strip():
            return records, []
        return records, [
            DatasetIssue(str(manifest), _line_of(text, pos), "-", "invalid JSON: expected ',' or ']'")
        ]


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _record_type(rec: Mapping[str, Any]) -> str | None:
    t = rec.get("type")
    if isinstance(t, str):
        return t
    if t is not None:
        return None
    if "chosen" in rec or "rejected" in rec:
        return "choice"
    if "video_id" in rec:
        return "rating"
    if "file" in rec or "id" in rec:
        return "video"
    return None


def unknown_key_message(key: str, known: Iterable[str], aliases: Mapping[str, str] = _KEY_ALIASES) -> str:
    """``unknown key 'x'; did you mean `y`?`` naming the nearest known key (or listing them all)."""
    known = sorted(known)
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    guess = near[0] if near else aliases.get(key.lower()) if aliases.get(key.lower()) in known else None
    if guess is not None:
        return f"unknown key {key!r}; did you mean `{guess}`?"
    return f"unknown key {key!r}; known keys are {', '.join(known)}"


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


class _Parser:
    def __init__(self, root: Path, manifest: Path) -> None:
        self.root = root
        self.root_resolved = root.resolve()
        self.manifest = manifest
        self.issues: list[DatasetIssue] = []
        self.videos: dict[str, VideoEntry] = {}
        self.choices: list[Choice] = []
        self.pending_ratings: list[tuple[int, str, Rating]] = []

    def err(self, line: int | None, fld: str, msg: str) -> None:
        self.issues.append(DatasetIssue(str(self.manifest), line, fld, msg))

    def rater_id(self, line: int, fld: str, value: Any) -> str | None:
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        self.err(
            line,
            fld,
            f"unknown rater format: 'rater_id' must be a non-empty string or integer, got {value!r}",
        )
        return None

    def time(self, line: int, fld: str, rec: Mapping[str, Any]) -> tuple[bool, str | float | None]:
        t = rec.get("time", rec.get("ts"))
        if t is None or isinstance(t, str) or _is_number(t):
            return True, t
        self.err(line, fld, f"'time' must be a string (ISO 8601) or a number, got {t!r}")
        return False, None

    def score(self, line: int, fld: str, value: Any) -> float | None:
        if not _is_number(value) or not math.isfinite(float(value)):
            self.err(line, fld, f"score must be a number in [0, 10], got {value!r} ({type(value).__name__})")
            return None
        if not SCORE_MIN <= float(value) <= SCORE_MAX:
            self.err(line, fld, f"score {value} is out of range [0, 10]")
            return None
        return float(value)

    def rating(
        self, line: int, prefix: str, rec: Any, *, extra: frozenset[str] = frozenset()
    ) -> Rating | None:
        """Parse one rating object; ``prefix`` is its place in the record (``ratings[2]``) or ``""``."""

        def fld(name: str) -> str:
            return f"{prefix}.{name}" if prefix else name

        if not isinstance(rec, dict):
            self.err(
                line,
                prefix or "ratings",
                "unknown rater format: a rating must be an object "
                f'{{"rater_id", "score", "time"}}, got {rec!r}',
            )
            return None
        known = RATING_KEYS | extra
        unknown = sorted(set(rec) - known, key=str)
        if "rater_id" not in rec:
            what = "; ".join(unknown_key_message(str(k), known) for k in unknown) or "missing 'rater_id'"
            self.err(
                line,
                fld("rater_id"),
                f'unknown rater format ({what}): expected {{"rater_id", "score", "time"}}',
            )
            return None
        if unknown:
            for k in unknown:
                self.err(line, fld(str(k)), unknown_key_message(str(k), known))
            return None
        rater = self.rater_id(line, fld("rater_id"), rec["rater_id"])
        if "score" not in rec:
            self.err(line, fld("score"), "missing 'score'")
            return None
        score = self.score(line, fld("score"), rec["score"])
        ok, t = self.time(line, fld("time"), rec)
        if rater is None or score is None or not ok:
            return None
        return Rating(rater, score, t)

    def video(self, line: int, rec: dict[str, Any]) -> None:
        unknown = sorted(set(rec) - VIDEO_KEYS, key=str)
        for k in unknown:
            self.err(line, str(k), unknown_key_message(str(k), VIDEO_KEYS) + " (in a video record)")
        vid = rec.get("id")
        if not isinstance(vid, str) or not vid.strip():
            self.err(line, "id", f"video id must be a non-empty string, got {vid!r}")
            return
        if vid in self.videos:
            first = self.videos[vid].line
            self.err(line, "id", f"duplicate video id {vid!r} (first defined on line {first})")
            return
        prompt, category = rec.get("prompt"), rec.get("category")
        for key, val in (("prompt", prompt), ("category", category)):
            if val is not None and (not isinstance(val, str) or not val.strip()):
                self.err(line, key, f"{key} must be a non-empty string, got {val!r}")
                return
        text = prompt if prompt is not None else category
        if text is None:
            self.err(line, "prompt", f"video {vid!r} needs a 'prompt' (or a 'category')")
            return
        path = self.file(line, vid, rec.get("file"))
        ratings_raw = rec.get("ratings", [])
        ratings: list[Rating] = []
        if not isinstance(ratings_raw, list):
            self.err(
                line, "ratings", f"ratings must be a list of rating objects, got {type(ratings_raw).__name__}"
            )
        else:
            for i, r in enumerate(ratings_raw):
                rating = self.rating(line, f"ratings[{i}]", r)
                if rating is not None:
                    ratings.append(rating)
        entry = VideoEntry(vid, path or self.root, text, ratings, str(rec.get("file")), category, line=line)
        self.videos[vid] = entry

    def file(self, line: int, vid: str, rel: Any) -> Path | None:
        if not isinstance(rel, str) or not rel.strip():
            self.err(line, "file", f"video {vid!r} needs 'file', a path relative to the dataset, got {rel!r}")
            return None
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts or "\\" in rel:
            self.err(
                line, "file", f"path {rel!r} of video {vid!r} must be relative and stay inside the dataset"
            )
            return None
        full = self.root / p
        try:
            full.resolve().relative_to(self.root_resolved)
        except ValueError:
            self.err(
                line, "file", f"path {rel!r} of video {vid!r} leaves the dataset directory (through a link)"
            )
            return None
        if not full.is_file():
            self.err(line, "file", f"video file not found: {rel!r} (video {vid!r}, looked for {full})")
            return None
        return full.absolute()

    def rating_record(self, line: int, rec: dict[str, Any]) -> None:
        vid = rec.get("video_id")
        if not isinstance(vid, str):
            self.err(line, "video_id", f"rating needs 'video_id', a video id string, got {vid!r}")
            return
        rating = self.rating(line, "", rec, extra=frozenset({"type", "video_id"}))
        if rating is not None:
            self.pending_ratings.append((line, vid, rating))

    def choice(self, line: int, rec: dict[str, Any]) -> None:
        unknown = sorted(set(rec) - CHOICE_KEYS, key=str)
        for k in unknown:
            self.err(line, str(k), unknown_key_message(str(k), CHOICE_KEYS) + " (in a choice record)")
        if unknown:
            return
        ids = []
        for key in ("chosen", "rejected"):
            v = rec.get(key)
            if not isinstance(v, str) or not v:
                self.err(line, key, f"choice needs '{key}', a video id string, got {v!r}")
                return
            ids.append(v)
        if "rater_id" not in rec:
            self.err(line, "rater_id", "unknown rater format: a choice needs 'rater_id'")
            return
        rater = self.rater_id(line, "rater_id", rec["rater_id"])
        ok, t = self.time(line, "time", rec)
        if rater is None or not ok:
            return
        if ids[0] == ids[1]:
            self.err(line, "rejected", f"chosen and rejected are the same video {ids[0]!r}")
            return
        self.choices.append(Choice(ids[0], ids[1], rater, t, line))

    def resolve_references(self) -> None:
        for line, vid, rating in self.pending_ratings:
            if vid not in self.videos:
                self.err(line, "video_id", f"rating of unknown video id {vid!r}")
            else:
                self.videos[vid].ratings.append(rating)
        for c in self.choices:
            missing = [
                (k, v)
                for k, v in (("chosen", c.chosen_id), ("rejected", c.rejected_id))
                if v not in self.videos
            ]
            for key, vid in missing:
                self.err(c.line, key, f"choice names unknown video id {vid!r}")
            if missing:
                continue
            pw, pl = self.videos[c.chosen_id].prompt, self.videos[c.rejected_id].prompt
            if pw != pl:
                self.err(
                    c.line,
                    "rejected",
                    f"a choice must compare videos of one prompt: {c.chosen_id!r} has "
                    f"{pw!r}, {c.rejected_id!r} has {pl!r}",
                )

    def parse(self, records: list[tuple[int, Any]]) -> None:
        for line, rec in records:
            if not isinstance(rec, dict):
                self.err(line, "-", f"a record must be a JSON object, got {type(rec).__name__}")
                continue
            kind = _record_type(rec)
            if kind == "video":
                self.video(line, rec)
            elif kind == "rating":
                self.rating_record(line, rec)
            elif kind == "choice":
                self.choice(line, rec)
            else:
                self.err(
                    line,
                    "type",
                    f"unknown record type {rec.get('type')!r}: expected 'video', 'rating' or "
                    "'choice' (or a video record with 'id' and 'file')",
                )
        self.resolve_references()


def reference_problems(record: Mapping[str, Any], prompts: Mapping[str, str]) -> list[tuple[str, str]]:
    """Why a ``rating`` or ``choice`` record cannot join a dataset whose videos are ``prompts`` (video
    id -> prompt text): ``[(field, message)]`` in the words :func:`load_dataset` uses, empty when it
    fits. A rating service checks a record with this before storing it, and again before appending a
    stored record to a new version."""
    kind = _record_type(record)
    if kind == "rating":
        vid = record.get("video_id")
        if isinstance(vid, str) and vid in prompts:
            return []
        return [("video_id", f"rating of unknown video id {vid!r}")]
    if kind != "choice":
        return [("type", f"not a rating or choice record (type {record.get('type')!r})")]
    ids = {k: record.get(k) for k in ("chosen", "rejected")}
    missing = [
        (k, f"choice names unknown video id {v!r}")
        for k, v in ids.items()
        if not isinstance(v, str) or v not in prompts
    ]
    if missing:
        return missing
    chosen, rejected = str(ids["chosen"]), str(ids["rejected"])
    if chosen == rejected:
        return [("rejected", f"chosen and rejected are the same video {chosen!r}")]
    if prompts[chosen] != prompts[rejected]:
        return [
            (
                "rejected",
                f"a choice must compare videos of one prompt: {chosen!r} has {prompts[chosen]!r}, "
                f"{rejected!r} has {prompts[rejected]!r}",
            )
        ]
    return []


def inspect_video(path: str | os.PathLike[str]) -> tuple[int, float, float]:
    """Decode a whole video within ``huvidpo.video_io.DEFAULT_VIDEO_LIMITS``, holding one frame at a
    time (and a small grey thumbnail of each): ``(frames, fps, motion)`` with motion as
    :func:`motion_score` gives it. Raises ``VideoDecodeError`` (``VideoTooLarge`` past a limit)."""
    from huvidpo.video_io import decode_frames

    thumbs: list[np.ndarray] = []
    n, fps = decode_frames(path, lambda frame: thumbs.append(_grey(frame, MOTION_SIZE)))
    return n, fps, _motion_of(thumbs, MOTION_SAMPLES)


def _check_videos(p: _Parser, min_frames: int) -> None:
    """Decode every video whose file exists (each file once, however many records name it); record
    frame count, fps and motion, or the problem."""
    from huvidpo.video_io import VideoDecodeError, VideoTooLarge

    seen: dict[Path, tuple[int, float, float] | Exception] = {}
    for v in p.videos.values():
        if v.path == p.root:  # its 'file' problem is already reported
            continue
        if v.path not in seen:
            try:
                seen[v.path] = inspect_video(v.path)
            except (VideoDecodeError, OSError) as exc:
                seen[v.path] = exc
        got = seen[v.path]
        if isinstance(got, VideoTooLarge):
            p.err(v.line, "file", f"video {v.file!r} (video {v.id!r}) is too large to decode: {got}")
            continue
        if isinstance(got, Exception):
            p.err(v.line, "file", f"undecodable video {v.file!r} (video {v.id!r}): {got}")
            continue
        n, fps, motion = got
        v.num_frames, v.fps, v.motion = n, fps, motion
        if n < min_frames:
            p.err(
                v.line,
                "file",
                f"too few frames in {v.file!r} (video {v.id!r}): {n} < min_frames {min_frames}",
            )


def load_dataset(
    root: str | os.PathLike[str], min_frames: int = 2, check_videos: bool = True
) -> PreferenceDataset:
    """Load and validate a dataset directory; raise :class:`DatasetError` listing every problem.

    With ``check_videos`` every video is decoded once: it must decode and have at least ``min_frames``
    frames; its frame count, fps and motion score are kept on the :class:`VideoEntry`. Files must
    exist either way. Nothing is written.
    """
    d = Path(root)
    manifest = find_manifest(d)
    records, syntax = _read_records(manifest)
    p = _Parser(d, manifest)
    p.issues.extend(syntax)
    p.parse(records)
    if check_videos:
        _check_videos(p, min_frames)
    if p.issues:
        raise DatasetError(p.issues)
    return PreferenceDataset(d.absolute(), manifest.absolute(), p.videos, p.choices)


# -- writing ---------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path``, fsync it, then rename it over ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def video_record(entry: VideoEntry) -> dict[str, Any]:
    """The manifest record of a video (ratings inline)."""
    rec: dict[str, Any] = {"type": "video", "id": entry.id, "file": entry.file, "prompt": entry.prompt}
    if entry.category is not None:
        rec["category"] = entry.category
    rec["ratings"] = [{"rater_id": r.rater_id, "score": r.score, "time": r.time} for r in entry.ratings]
    return rec


def choice_record(choice: Choice) -> dict[str, Any]:
    """The manifest record of a pairwise choice."""
    return {
        "type": "choice",
        "chosen": choice.chosen_id,
        "rejected": choice.rejected_id,
        "rater_id": choice.rater_id,
        "time": choice.time,
    }


def write_manifest(
    root: str | os.PathLike[str],
    records: Iterable[Mapping[str, Any] | VideoEntry | Choice],
    min_frames: int = 2,
    check_videos: bool = True,
) -> Path:
    """Validate ``records`` against the videos already in ``root`` and only then write
    ``root/manifest.jsonl`` atomically. Raises :class:`DatasetError` (writing nothing) when invalid."""
    d = Path(root)
    recs: list[dict[str, Any]] = []
    for r in records:
        if isinstance(r, VideoEntry):
            recs.append(video_record(r))
        elif isinstance(r, Choice):
            recs.append(choice_record(r))
        else:
            recs.append(dict(r))
    target = d / "manifest.jsonl"
    if (d / "manifest.json").exists():
        raise DatasetError(
            DatasetIssue(
                str(d / "manifest.json"),
                None,
                "-",
                "a manifest.json exists; refusing to add a manifest.jsonl next to it",
            )
        )
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in recs)
    p = _Parser(d, target)
    p.parse([(n, json.loads(line)) for n, line in enumerate(text.splitlines(), start=1)])
    if check_videos:
        _check_videos(p, min_frames)
    if p.issues:
        raise DatasetError(p.issues)
    return atomic_write_bytes(target, text.encode("utf-8"))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- motion ----------------------------------------------------------------------------------------

MOTION_SAMPLES = 8
MOTION_SIZE = 32


def motion_score(frames: np.ndarray, samples: int = MOTION_SAMPLES, size: int = MOTION_SIZE) -> float:
    """How much a clip moves, in 0..255 grey levels: ``samples`` evenly spaced frames at ``size x size``
    grey, mean absolute difference between frames half the sampled clip apart.

    Frames half a clip apart measure gross displacement. Neighbouring-frame differences would rank a
    flickering or jittering clip as "moving more" than a smoothly moving one, whereas the bias we look
    for is raters preferring clips in which little moves at all.
    """
    f = frames.shape[0]
    if f < 2:
        return 0.0
    return _motion_of([_grey(frames[i], size) for i in _motion_indices(f, samples)], samples, sampled=True)


def _motion_indices(f: int, samples: int) -> np.ndarray:
    return np.unique(np.linspace(0, f - 1, num=min(samples, f)).round().astype(int))


def _grey(frame: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(
        Image.fromarray(frame).convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32
    )


def _motion_of(greys: list[np.ndarray], samples: int, sampled: bool = False) -> float:
    """:func:`motion_score` from grey thumbnails: of every frame, or (``sampled``) of the sampled ones."""
    if len(greys) < 2 and not sampled:
        return 0.0
    picked = greys if sampled else [greys[i] for i in _motion_indices(len(greys), samples)]
    grey = np.stack(picked)
    gap = max(1, len(picked) // 2)
    return float(np.abs(grey[gap:] - grey[:-gap]).mean())
