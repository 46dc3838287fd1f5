"""Ratings collected by people (the rating UI): upserted judgments, rating sessions, and compiling the
judgments into a new dataset version with lineage.

Store layout (next to what :mod:`~services.controlplane.domain.datasets` keeps)::

    datasets/{name}/ratings/{rating_id}.json   {"id", "record", "version"}: one rating or choice record
    datasets/{name}/ties/{rating_id}.json      {"id", "tie", "version"}: an A/B judgment "neither is better"

``record`` is a record of the dataset manifest format (``huvidpo.data``): ``{"type": "rating",
"video_id", "rater_id", "score", "time"}`` or ``{"type": "choice", "chosen", "rejected", "rater_id",
"time"}``. One object per record, so concurrent raters never write the same object.

A judgment's id is derived from *who judged what* (rater and video, or rater and the unordered pair),
not from its content: the same rater rating the same video again overwrites its record (an update,
never a duplicate). A tie and a choice of one rater on one pair share an id, and writing one removes
the other. Records posted through the generic ``POST /ratings`` endpoint (content-digest ids) are
honoured too: when one rater has several records for one video (or pair), the latest ``time`` wins.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.controlplane.domain.datasets import DatasetService, PairOptions, dataset_prefix
from services.controlplane.domain.errors import Conflict, InvalidRequest, NotFound
from services.controlplane.domain.names import validate_digest, validate_name, validate_relative_path
from services.controlplane.domain.util import Clock, iso, read_json_or_none, utcnow

LINEAGE_FILE = "ratings-lineage.json"
"""Written into every compiled version's data: which rating records made it (part of its digest)."""

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"})
Winner = Literal["left", "right", "tie"]


# A/B pairs each video of a large prompt group meets (see ``ab_pairs``), and pairs per session page.
PAIRS_PER_VIDEO = 8
SESSION_PAGE_SIZE = 500
SESSION_MAX_PAGE_SIZE = 2000


def _h(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def score_id(rater_id: str, video_id: str) -> str:
    """The id of ``rater_id``'s score of ``video_id`` (stable: a re-rating overwrites it)."""
    return f"u{_h(rater_id)[:12]}-s{_h(video_id)[:20]}"


def pair_id(rater_id: str, a: str, b: str) -> str:
    """The id of ``rater_id``'s judgment of the unordered pair ``{a, b}`` (choice or tie)."""
    lo, hi = sorted((a, b))
    return f"u{_h(rater_id)[:12]}-c{_h(lo, hi)[:20]}"


def pair_key(a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"{lo}|{hi}"


@dataclass
class Judgment:
    """One stored judgment, normalised: ``kind`` score/choice/tie, the rater, what it is about."""

    id: str
    kind: Literal["score", "choice", "tie"]
    rater_id: str
    target: str  # video id (score) or pair key (choice, tie)
    time: str
    record: dict[str, Any]  # the manifest record (score/choice) or the tie object

    @property
    def slot(self) -> tuple[str, str, str]:
        """What the judgment is about; a later judgment in the same slot supersedes this one."""
        return ("score" if self.kind == "score" else "pair", self.rater_id, self.target)


@dataclass
class Resolved:
    """The effective judgments (latest per rater and video/pair) and what they superseded."""

    effective: list[Judgment] = field(default_factory=list)
    superseded: list[Judgment] = field(default_factory=list)


def resolve(judgments: Iterable[Judgment]) -> Resolved:
    """Keep, per rater and video (or pair), the judgment with the latest time (ties broken by id)."""
    best: dict[tuple[str, str, str], Judgment] = {}
    out = Resolved()
    for j in sorted(judgments, key=lambda j: (j.time, j.id)):
        old = best.get(j.slot)
        if old is not None:
            out.superseded.append(old)
        best[j.slot] = j
    out.effective = sorted(best.values(), key=lambda j: (j.time, j.id))
    return out


def _time_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else f"{float(value):020.6f}"


def _parse(obj: dict[str, Any], tie: bool) -> Judgment | None:
    """A stored object as a :class:`Judgment` (``None`` for something not recognisable)."""
    rid = str(obj.get("id", ""))
    if tie:
        t = obj.get("tie")
        if not isinstance(t, dict) or not isinstance(t.get("videos"), list) or len(t["videos"]) != 2:
            return None
        a, b = (str(v) for v in t["videos"])
        return Judgment(rid, "tie", str(t.get("rater_id")), pair_key(a, b), _time_text(t.get("time")), t)
    rec = obj.get("record")
    if not isinstance(rec, dict):
        return None
    rater = str(rec.get("rater_id"))
    if rec.get("type") == "choice" or "chosen" in rec:
        key = pair_key(str(rec.get("chosen")), str(rec.get("rejected")))
        return Judgment(rid, "choice", rater, key, _time_text(rec.get("time")), rec)
    if rec.get("type", "rating") == "rating" and "video_id" in rec:
        return Judgment(rid, "score", rater, str(rec["video_id"]), _time_text(rec.get("time")), rec)
    return None


@dataclass(frozen=True)
class VideoInfo:
    """A video of a dataset version as the rating page needs it."""

    id: str
    prompt: str
    file: str
    checkpoint: str | None = None
    first_frame: str | None = None
    sample: int | None = None


class RatingService:
    """Judgments of the rating UI over the datasets' store; knows nothing of HTTP."""

    def __init__(self, datasets: DatasetService, clock: Clock = utcnow) -> None:
        self.datasets = datasets
        self.store = datasets.store
        self.clock = clock

    # ------------------------------------------------------------------------------ reading
    def latest_version(self, name: str) -> str:
        versions = self.datasets.manifests(name)
        if not versions:
            raise NotFound(f"dataset {name!r} has no version yet; upload one first")
        return str(versions[-1]["id"])

    def videos(self, name: str, version: str) -> list[VideoInfo]:
        """The videos of a version in manifest order, with the A/B fields of on-policy sample sets
        (``checkpoint``, ``first_frame``, ``sample``) when the manifest has them."""
        records = self.datasets.version_records(name, version)
        out: list[VideoInfo] = []
        for r in records:
            if not isinstance(r, dict) or "file" not in r or r.get("type", "video") != "video":
                continue
            prompt = r.get("prompt", r.get("category"))
            sample = r.get("sample")
            out.append(
                VideoInfo(
                    str(r["id"]),
                    str(prompt),
                    str(r["file"]),
                    None if r.get("checkpoint") is None else str(r["checkpoint"]),
                    None if r.get("first_frame") is None else str(r["first_frame"]),
                    sample if isinstance(sample, int) and not isinstance(sample, bool) else None,
                )
            )
        return out

    def judgments(self, name: str) -> list[Judgment]:
        """Every stored judgment of the dataset (ratings, choices, ties)."""
        prefix = dataset_prefix(name)
        out = []
        for sub, tie in (("ratings/", False), ("ties/", True)):
            for o in self.store.list(prefix + sub, recursive=False):
                obj = read_json_or_none(self.store, o.key)
                j = _parse(obj, tie) if isinstance(obj, dict) else None
                if j is not None:
                    out.append(j)
        return out

    def video_file(self, name: str, version: str, path: str) -> Path:
        """The local path of one video file of a version (verified against the version's digests)."""
        validate_name(name, "dataset")
        version = validate_digest(version)
        validate_relative_path(path, "path")
        if Path(path).suffix.lower() not in VIDEO_EXTENSIONS:
            raise NotFound(f"{path!r} is not a video of version {version}")
        manifest = self.datasets.manifest(name, version)
        if "data/" + path not in manifest["files"]:
            raise NotFound(f"file {path!r} not found in version {version} of dataset {name!r}")
        return self.datasets.fetch_version(name, version) / path

    # ------------------------------------------------------------------------------ sessions
    def session(
        self,
        name: str,
        version: str | None,
        rater_id: str,
        page_size: int = SESSION_PAGE_SIZE,
        page_token: str | None = None,
    ) -> dict[str, Any]:
        """What a rater needs to rate a version: its videos with this rater's scores, one page of the
        A/B pairs (``page_size`` from ``page_token``; ``next_page_token`` names the next page) with
        this rater's choices, progress in both modes over all pairs, and where to resume (an index
        into all pairs)."""
        start = _page_start(page_token)
        self.datasets.get(name)
        version = validate_digest(version) if version else self.latest_version(name)
        videos = self.videos(name, version)
        mine = resolve(j for j in self.judgments(name) if j.rater_id == rater_id).effective
        scores = {j.target: j for j in mine if j.kind == "score"}
        choices = {j.target: j for j in mine if j.kind != "score"}
        items = [
            {
                "id": v.id,
                "prompt": v.prompt,
                "file": v.file,
                "score": scores[v.id].record["score"] if v.id in scores else None,
                "time": scores[v.id].time if v.id in scores else None,
            }
            for v in videos
        ]
        pairs: list[dict[str, Any]] = []
        for index, (left, right) in enumerate(ab_pairs(videos)):
            key = pair_key(left.id, right.id)
            j = choices.get(key)
            choice: str | None = None
            if j is not None:
                choice = "tie" if j.kind == "tie" else "left" if j.record["chosen"] == left.id else "right"
            if not start <= index < start + page_size:  # only what progress and resume need
                pairs.append({"choice": choice, "time": j.time if j is not None else None})
                continue
            pairs.append(
                {
                    "key": key,
                    "prompt": left.prompt,
                    "first_frame": left.first_frame,
                    "on_policy": left.checkpoint is not None and right.checkpoint is not None,
                    "left": {"id": left.id, "file": left.file},
                    "right": {"id": right.id, "file": right.file},
                    "choice": choice,
                    "time": j.time if j is not None else None,
                }
            )
        return {
            "dataset": name,
            "version": version,
            "rater_id": rater_id,
            "videos": items,
            "pairs": pairs[start : start + page_size],
            "pairs_offset": start,
            "next_page_token": str(start + page_size) if start + page_size < len(pairs) else None,
            "progress": {
                "absolute": {"done": sum(i["score"] is not None for i in items), "total": len(items)},
                "ab": {"done": sum(p["choice"] is not None for p in pairs), "total": len(pairs)},
            },
            "resume": {"absolute": resume_index(items, "score"), "ab": resume_index(pairs, "choice")},
        }

    # ------------------------------------------------------------------------------ writing
    def _body_videos(self, name: str, version: str) -> list[VideoInfo]:
        """The videos of ``version``, named in a request body: a version the (existing) dataset lacks
        is ``InvalidRequest`` naming ``version`` (the dataset exists, a value in the body is wrong)."""
        try:
            return self.videos(name, version)
        except NotFound as exc:
            raise InvalidRequest(f"dataset {name!r} has no version {version}", field="version") from exc

    def _check_video(self, name: str, version: str, *video_ids: str) -> None:
        known = {v.id for v in self._body_videos(name, version)}
        for vid in video_ids:
            if vid not in known:
                raise InvalidRequest(
                    f"video {vid!r} is not in version {version} of dataset {name!r}", field="video_id"
                )

    def put_score(
        self, name: str, version: str, rater_id: str, video_id: str, score: float
    ) -> dict[str, Any]:
        """Store (or replace) ``rater_id``'s score (0..10) of ``video_id``; returns the stored object."""
        self.datasets.get(name)
        version = validate_digest(version)
        self._check_video(name, version, video_id)
        rid = score_id(rater_id, video_id)
        record = {
            "type": "rating",
            "video_id": video_id,
            "rater_id": rater_id,
            "score": float(score),
            "time": iso(self.clock()),
        }
        obj = {"id": rid, "record": record, "version": version}
        self.store.put_json(dataset_prefix(name) + f"ratings/{rid}.json", obj)
        return obj

    def put_choice(
        self, name: str, version: str, rater_id: str, left: str, right: str, winner: Winner
    ) -> dict[str, Any]:
        """Store (or replace) ``rater_id``'s A/B judgment of ``left`` vs ``right``: a choice record, or
        a tie (kept apart from the manifest-format records). Returns the stored object."""
        self.datasets.get(name)
        if left == right:
            raise InvalidRequest("left and right are the same video", field="right")
        version = validate_digest(version)
        videos = {v.id: v for v in self._body_videos(name, version)}
        self._check_video(name, version, left, right)
        if videos[left].prompt != videos[right].prompt:
            raise InvalidRequest("an A/B judgment compares two videos of the same prompt", field="right")
        rid = pair_id(rater_id, left, right)
        now = iso(self.clock())
        prefix = dataset_prefix(name)
        if winner == "tie":
            obj: dict[str, Any] = {
                "id": rid,
                "tie": {"videos": sorted((left, right)), "rater_id": rater_id, "time": now},
                "version": version,
            }
            self.store.put_json(prefix + f"ties/{rid}.json", obj)
            self.store.delete(prefix + f"ratings/{rid}.json")
            return obj
        chosen, rejected = (left, right) if winner == "left" else (right, left)
        record = {"type": "choice", "chosen": chosen, "rejected": rejected, "rater_id": rater_id, "time": now}
        obj = {"id": rid, "record": record, "version": version}
        self.store.put_json(prefix + f"ratings/{rid}.json", obj)
        self.store.delete(prefix + f"ties/{rid}.json")
        return obj

    # ------------------------------------------------------------------------------ compiling
    def root_version(self, name: str, version: str) -> str:
        """The version a compiled version was made from (followed back), else ``version`` itself."""
        seen = set()
        while version not in seen:
            seen.add(version)
            src = self.datasets.manifest(name, version).get("source", {})
            base = src.get("ratings", {}).get("base") if isinstance(src.get("ratings"), dict) else None
            if not isinstance(base, str):
                return version
            version = base
        return version

    def compile(
        self, name: str, base: str | None, options: PairOptions, created_by: str = ""
    ) -> dict[str, Any]:
        """A new immutable version: ``base``'s files plus the effective rating and choice records, with
        ``ratings-lineage.json`` naming every record id used; then its pairs compiled with ``options``.

        ``base`` defaults to the latest version; a version that was itself compiled is followed back to
        the version it was made from, so records are never appended twice. The same ratings compile to
        the same version (its digest covers the files and the lineage, not the time)."""
        from huvidpo.data import reference_problems

        self.datasets.get(name)
        if base:
            base = validate_digest(base, "base")
            try:  # a base the (existing) dataset lacks is a wrong value in the body, as derive's
                self.datasets.manifest(name, base)
            except NotFound as exc:
                raise InvalidRequest(f"dataset {name!r} has no version {base}", field="base") from exc
        if not base:
            try:
                base = self.latest_version(name)
            except NotFound as exc:  # the dataset exists (checked above): its state refuses the request
                raise Conflict(exc.message) from exc
        base = self.root_version(name, base)
        prompts = {v.id: v.prompt for v in self.videos(name, base)}
        resolved = resolve(self.judgments(name))
        used: list[Judgment] = []
        skipped: list[Judgment] = []
        dropped: list[dict[str, str]] = []  # every judgment not compiled, with the reason
        for j in resolved.effective:
            if j.kind == "tie":
                problems = [
                    ("videos", f"tie names unknown video id {i!r}")
                    for i in j.target.split("|")
                    if i not in prompts
                ]
            else:
                problems = reference_problems(j.record, prompts)
            if problems:
                skipped.append(j)
                dropped.append({"id": j.id, "reason": "; ".join(msg for _, msg in problems)})
            else:
                used.append(j)
        latest = {j.slot: j for j in resolved.effective}
        for j in resolved.superseded:
            what = "video" if j.kind == "score" else "pair"
            dropped.append(
                {
                    "id": j.id,
                    "reason": f"superseded by {latest[j.slot].id}, a later judgment of the same rater and {what}",
                }
            )
        records = [j for j in used if j.kind != "tie"]
        ids_text = "".join(
            f"{j.id}\0{json.dumps(j.record, sort_keys=True, separators=(',', ':'))}\n"
            for j in sorted(used, key=lambda j: j.id)
        )
        lineage = {
            "base": base,
            "ratings_sha256": hashlib.sha256(ids_text.encode()).hexdigest(),
            "records": sorted(j.id for j in records),
            "ties": sorted(j.id for j in used if j.kind == "tie"),
            "superseded": sorted(j.id for j in resolved.superseded),
            "skipped_unknown_videos": sorted(j.id for j in skipped),
            "raters": sorted({j.rater_id for j in used}),
        }
        with tempfile.TemporaryDirectory(prefix="huvidpo-ratings-") as tmp:
            data = Path(tmp) / "data"
            shutil.copytree(self.datasets.fetch_version(name, base), data)
            _append(data, [j.record for j in records])
            (data / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1, sort_keys=True) + "\n")
            source = {
                "base": base,
                "ratings": {
                    "base": base,
                    "records": len(lineage["records"]),
                    "ties": len(lineage["ties"]),
                    "sha256": lineage["ratings_sha256"],
                    "lineage": "data/" + LINEAGE_FILE,
                },
            }
            version = self.datasets.publish_version(
                name, data, source, include_ratings=False, created_by=created_by
            )
        pairs = self.datasets.compile_pairs(name, version["id"], options)
        return {
            "version": version,
            "lineage": lineage,
            "pairs": pairs,
            "dropped": sorted(dropped, key=lambda d: d["id"]),
        }


def _append(data: Path, records: list[dict[str, Any]]) -> None:
    """Append records to the dataset's manifest in time order (a JSON list becomes JSONL), so the
    manifest's "last one wins" rule agrees with the judgments' times."""
    from huvidpo.data import find_manifest

    manifest = find_manifest(data)
    text = manifest.read_text(encoding="utf-8")
    if manifest.name == "manifest.json":
        lines = [json.dumps(r, sort_keys=True) for r in json.loads(text)]
        manifest.unlink()
        manifest = data / "manifest.jsonl"
    else:
        lines = [ln for ln in text.splitlines() if ln.strip()]
    lines += [json.dumps(r, sort_keys=True) for r in records]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _page_start(page_token: str | None) -> int:
    if page_token is None:
        return 0
    if not page_token.isdigit() or len(page_token) > 9:
        raise InvalidRequest("page_token is not one this API returned", field="page_token")
    return int(page_token)


def ab_pairs(videos: list[VideoInfo]) -> list[tuple[VideoInfo, VideoInfo]]:
    """The A/B comparisons of a version, in a fixed order.

    Videos are grouped by prompt and first frame. In a group whose videos come from exactly two
    checkpoints (an on-policy sample set), each sample of one checkpoint meets the same-numbered
    sample of the other; otherwise every two videos of the group meet once while the group has at
    most ``2 * PAIRS_PER_VIDEO + 1`` videos. A larger group is sampled, not squared: its videos in a
    fixed pseudo-random order (a hash of their ids) stand in a ring, and each meets the
    ``PAIRS_PER_VIDEO`` next ones (every video in ``2 * PAIRS_PER_VIDEO`` pairs; n videos give
    ``n * PAIRS_PER_VIDEO`` pairs, where all pairs would be ``n * (n - 1) / 2``). Which clip is shown
    left is fixed per pair by a hash, so neither checkpoint (nor manifest order) always sits on one side.
    """
    groups: dict[tuple[str, str | None], list[VideoInfo]] = {}
    for v in videos:
        groups.setdefault((v.prompt, v.first_frame), []).append(v)
    out: list[tuple[VideoInfo, VideoInfo]] = []
    for vs in groups.values():
        ckpts = sorted({v.checkpoint for v in vs if v.checkpoint is not None})
        raw: list[tuple[VideoInfo, VideoInfo]] = []
        if len(ckpts) == 2 and all(v.checkpoint is not None for v in vs):
            a = [v for v in vs if v.checkpoint == ckpts[0]]
            b = [v for v in vs if v.checkpoint == ckpts[1]]
            a.sort(key=lambda v: (v.sample if v.sample is not None else 0, v.id))
            b.sort(key=lambda v: (v.sample if v.sample is not None else 0, v.id))
            raw = list(zip(a, b, strict=False))
        elif len(vs) <= 2 * PAIRS_PER_VIDEO + 1:
            raw = [(vs[i], vs[j]) for i in range(len(vs)) for j in range(i + 1, len(vs))]
        else:
            ring = sorted(vs, key=lambda v: (_h(v.id), v.id))
            n = len(ring)
            raw = [(ring[i], ring[(i + d) % n]) for d in range(1, PAIRS_PER_VIDEO + 1) for i in range(n)]
        for x, y in raw:
            flip = int(_h(x.id, y.id)[:2], 16) % 2 == 1
            out.append((y, x) if flip else (x, y))
    return out


def resume_index(items: list[dict[str, Any]], done_key: str) -> int:
    """Where a rater resumes: the first undone item after the one they judged last (wrapping round);
    the last judged one when everything is done; 0 when nothing is."""
    done = [i for i, it in enumerate(items) if it.get(done_key) is not None]
    if not items or not done:
        return 0
    last = max(done, key=lambda i: (items[i].get("time") or "", i))
    n = len(items)
    for k in range(1, n + 1):
        i = (last + k) % n
        if items[i].get(done_key) is None:
            return i
    return last
