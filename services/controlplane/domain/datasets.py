"""Datasets: uploads staged in the store, committed into immutable versions named by their digest.

Store layout (bucket root)::

    datasets/{name}/dataset.json                      the dataset (name, description, created_at)
    datasets/{name}/uploads/{upload_id}/session.json  an open upload session
    datasets/{name}/uploads/{upload_id}/files/{path}  staged files (multipart upload, or moved here from
                                                      presigned/ at commit); a committed upload keeps the
                                                      videos its version references (and committed.json
                                                      instead of session.json)
    datasets/{name}/uploads/{upload_id}/presigned/{path}  where presigned PUT URLs write: no version ever
                                                      references a key here, so a URL still valid after
                                                      the commit cannot change a version
    datasets/{name}/ratings/{rating_id}.json          rating/choice records (id = digest of the record)
    datasets/{name}/{digest}/data/{path}              an immutable version's own files (its JSON(L) records)
    datasets/{name}/{digest}/manifest.json            written LAST: files (each with its "key" when it lies
                                                      elsewhere: a staged video, a base version's file),
                                                      digests, counts
    datasets/{name}/{digest}/validation.json          the background validation's result (videos decoded)
    datasets/{name}/compiled/{digest}/{options}/      compiled pairs + report
    datasets/{name}/refs/{finetune_id}.json           a fine-tune that uses a version (blocks deletion)

A version's digest is the sha256 of its sorted ``path, sha256, size`` lines (where a file lies is not
part of it), so the same content always gets the same version and a commit can be retried safely.
Commit moves no video byte: see :meth:`DatasetService.commit_upload`.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from services.common.publish import write_manifest
from services.common.records import keys
from services.common.records.keys import dataset_prefix
from services.common.records.lineage import DatasetVersionManifest, FileEntry, content_digest
from services.common.store import CHUNK_SIZE, ObjectInfo, ObjectStore, sha256_file
from services.common.store.errors import ChecksumMismatch, ObjectNotFound, PreconditionFailed
from services.controlplane.domain.errors import Conflict, InvalidRequest, NotFound
from services.controlplane.domain.names import validate_digest, validate_name, validate_relative_path
from services.controlplane.domain.util import (
    Clock,
    iso,
    new_id,
    paginate,
    read_json,
    read_json_or_none,
    utcnow,
)

RATING_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,80}$")
ALLOWED_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".json", ".jsonl"})
MANIFEST = "manifest.json"
VALIDATION = "validation.json"  # next to the manifest: the background validation's result
COMMITTED = "committed.json"  # in an upload whose staged files a version references
PRESIGNED = "presigned/"  # in an upload: what presigned PUT URLs write (moved to files/ at commit)
_PRESIGNED_KEY = re.compile(r"^datasets/([^/]+)/uploads/([^/]+)/presigned/")
RECORD_SUFFIXES = frozenset({".json", ".jsonl"})
# A record file (manifest, ratings) is read whole at commit: far above any real manifest (a million
# records of ~200 bytes), far below what would hurt the control plane.
MAX_RECORD_FILE_BYTES = 256 * 2**20
PENDING: Mapping[str, Any] = {"state": "pending", "video_stats": None, "problems": []}
log = logging.getLogger(__name__)


version_prefix = keys.dataset_version_prefix


def check_file_type(path: str, field: str = "filename") -> None:
    """Only dataset files: videos and JSON(L) manifests. Raises ``UnsupportedMediaType`` otherwise."""
    from services.controlplane.domain.errors import UnsupportedMediaType

    suffix = Path(path).suffix.lower()
    if suffix not in ALLOWED_EXTENSIONS:
        raise UnsupportedMediaType(
            f"{path!r}: only {', '.join(sorted(ALLOWED_EXTENSIONS))} files belong in a dataset", field=field
        )


@dataclass(frozen=True)
class PairOptions:
    """Options of the ratings-to-pairs compiler (see ``huvidpo.data.compile_pairs``)."""

    tie_policy: str = "drop"
    min_margin: float = 0.0
    margin_weighting: bool = False
    # Decides the direction of kept ties; the training default (``huvidpo.training.config``'s
    # ``seed``), so a preview with default options shows the pairs a default fine-tune trains on.
    seed: int = 33
    # Whole prompts held out for evaluation (``heldout.jsonl``); a fine-tune with ``holdout_fraction``
    # (by prompt) and ``seed`` S compiles with ``holdout_seed`` S.
    holdout_fraction: float = 0.0
    holdout_seed: int = 33

    def as_dict(self) -> dict[str, Any]:
        """The options as recorded (report, fine-tune spec); the hold-out's only when there is one, so
        options without a hold-out read, and are keyed, as they were before it existed."""
        options = dataclasses.asdict(self)
        if not self.holdout_fraction:
            del options["holdout_fraction"], options["holdout_seed"]
        return options

    def key(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class DatasetService:
    """Datasets, uploads, ratings and versions over an ``ObjectStore``. Knows nothing of HTTP."""

    def __init__(
        self,
        store: ObjectStore,
        cache_dir: Path,
        clock: Clock = utcnow,
        runner: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        """``runner(fn)`` runs a version's validation (default: on a daemon thread)."""
        self.store = store
        self.cache_dir = Path(cache_dir)
        self.clock = clock
        self._runner = runner or _thread_runner
        self._lock = threading.Lock()
        self._validating: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------------------- datasets
    def create(self, name: str, description: str = "") -> dict[str, Any]:
        validate_name(name)
        key = dataset_prefix(name) + "dataset.json"
        if self.store.exists(key):
            raise Conflict(f"dataset {name!r} already exists", field="name")
        record = {"name": name, "description": description, "created_at": iso(self.clock())}
        self.store.put_json(key, record)
        return record

    def get(self, name: str) -> dict[str, Any]:
        validate_name(name, "dataset")
        record = read_json(self.store, dataset_prefix(name) + "dataset.json", f"dataset {name!r}")
        return {**record, "versions": [v["id"] for v in self.manifests(name)]}

    def list(
        self, page_size: int = 50, page_token: str | None = None
    ) -> tuple[builtins.list[dict[str, Any]], str | None]:
        names = [d[len(keys.DATASETS) : -1] for d in self.store.list_dirs(keys.DATASETS)]
        page, token = paginate(sorted(names), lambda n: n, page_size, page_token)
        out = []
        for n in page:
            rec = read_json_or_none(self.store, dataset_prefix(n) + "dataset.json")
            if rec is not None:
                out.append({**rec, "versions": [v["id"] for v in self.manifests(n)]})
        return out, token

    def delete(self, name: str, holds: Callable[[str], str | None] | None = None) -> None:
        """Delete the dataset with every version, rating and upload. ``holds(finetune_id)`` says why a
        fine-tune that references the dataset still holds it (``None``: it no longer does; see
        ``domain/retention.py``); without it every reference holds. Raises ``Conflict`` naming them."""
        self.get(name)
        held = _holders(self.references(name), holds)
        if held:
            raise Conflict(f"dataset {name!r} is still in use and cannot be deleted: {'; '.join(held)}")
        self.store.delete_prefix(dataset_prefix(name))

    # ------------------------------------------------------------------------------- references
    def add_reference(self, name: str, digest: str, finetune_id: str) -> None:
        self.store.put_json(
            dataset_prefix(name) + f"refs/{finetune_id}.json", {"version": digest, "finetune_id": finetune_id}
        )

    def remove_reference(self, name: str, finetune_id: str) -> None:
        self.store.delete(dataset_prefix(name) + f"refs/{finetune_id}.json")

    def references(self, name: str, digest: str | None = None) -> dict[str, str]:
        """``{finetune_id: version}`` of the fine-tunes that use this dataset (or one version of it)."""
        out = {}
        for obj in self.store.list(dataset_prefix(name) + "refs/", recursive=False):
            ref = read_json_or_none(self.store, obj.key)
            if ref and (digest is None or ref.get("version") == digest):
                out[str(ref["finetune_id"])] = str(ref["version"])
        return out

    # ------------------------------------------------------------------------------- uploads
    def start_upload(self, name: str) -> dict[str, Any]:
        self.get(name)
        upload_id = new_id("up")
        session = {"id": upload_id, "dataset": name, "created_at": iso(self.clock())}
        self.store.put_json(self._upload_prefix(name, upload_id) + "session.json", session)
        return session

    def _upload_prefix(self, name: str, upload_id: str) -> str:
        return dataset_prefix(name) + f"uploads/{upload_id}/"

    def get_upload(self, name: str, upload_id: str) -> dict[str, Any]:
        validate_name(name, "dataset")
        if not upload_id.startswith("up-") or not upload_id[3:].isalnum():
            raise NotFound(f"upload {upload_id!r} not found")
        session = read_json(
            self.store, self._upload_prefix(name, upload_id) + "session.json", f"upload {upload_id!r}"
        )
        prefix = self._upload_prefix(name, upload_id)
        files = {
            o.key[len(prefix + sub) :]: {"size": o.size, "sha256": o.sha256}
            for sub in ("files/", PRESIGNED)  # a file sent both ways: the presigned PUT's
            for o in self.store.list(prefix + sub)
        }
        return {**session, "files": files}

    def discard_upload(self, name: str, upload_id: str) -> None:
        """Delete an upload session and its staged files (idempotent). The files of a committed
        upload belong to its version and stay."""
        if self.store.exists(self._upload_prefix(name, upload_id) + COMMITTED):
            return
        self.store.delete_prefix(self._upload_prefix(name, upload_id))

    def staged_key(self, name: str, upload_id: str, path: str) -> str:
        validate_relative_path(path)
        check_file_type(path)
        return self._upload_prefix(name, upload_id) + "files/" + path

    def stage_stream(
        self, name: str, upload_id: str, path: str, stream: BinaryIO, content_type: str | None = None
    ) -> ObjectInfo:
        """Stream one file into the upload session (memory bounded; the store computes its sha256)."""
        key = self.staged_key(name, upload_id, path)
        return self.store.put_stream(key, stream, None, content_type or "application/octet-stream")

    def presign_upload(
        self, name: str, upload_id: str, paths: Iterable[str], expires, base_url: str | None = None
    ) -> dict[str, str]:  # type: ignore[no-untyped-def]
        """PUT URLs for ``paths``, writing under the upload's ``presigned/`` (see :meth:`commit_upload`)."""
        self.get_upload(name, upload_id)
        out = {}
        for p in paths:
            key = self.staged_key(name, upload_id, p).replace("/files/", "/" + PRESIGNED, 1)
            out[p] = self.store.presigned_put_url(key, expires, base_url)
        return out

    def accepts_presigned_put(self, key: str) -> bool:
        """Whether a presigned PUT to ``key`` may still write: not into an upload that was committed or
        discarded (its URLs die with it). Other keys: yes."""
        m = _PRESIGNED_KEY.match(key)
        if m is None:
            return True
        return self.store.exists(self._upload_prefix(m.group(1), m.group(2)) + "session.json")

    def _adopt_presigned(self, name: str, upload_id: str) -> None:
        """Move the files presigned PUTs wrote into ``files/``, hashing them as they stream (the only
        bytes a commit copies). A URL still valid afterwards writes under ``presigned/`` again, where
        no version looks; the commit deletes what is there when it ends."""
        prefix = self._upload_prefix(name, upload_id)
        for obj in self.store.list(prefix + PRESIGNED):
            path = obj.key[len(prefix + PRESIGNED) :]
            with self.store.open_read(obj.key) as reader:
                self.store.put_stream(prefix + "files/" + path, reader, None)  # type: ignore[arg-type]
            self.store.delete(obj.key)

    def commit_upload(
        self, name: str, upload_id: str, include_ratings: bool = True, created_by: str = ""
    ) -> dict[str, Any]:
        """Publish the staged files as an immutable version without moving a video byte.

        Only the JSON(L) files (the manifest: small) are read back and validated; every other file is
        referenced where it was staged, with the sha256 and size recorded while it streamed in (a file
        sent by presigned PUT, which the store may hold without a digest, is moved from ``presigned/``
        into ``files/`` and hashed on the way: those files only, so no presigned URL names a key a
        version references). Checks that need decoding run afterwards in the background
        (:meth:`validate_version`)."""
        self.get_upload(name, upload_id)
        self._adopt_presigned(name, upload_id)
        session = self.get_upload(name, upload_id)
        if not session["files"]:
            raise InvalidRequest(
                "the upload has no files; upload the manifest and the videos first", field="upload"
            )
        staged = self._upload_prefix(name, upload_id) + "files/"
        with tempfile.TemporaryDirectory(prefix="huvidpo-commit-") as tmp:
            data = Path(tmp) / "data"
            objects: dict[str, dict[str, Any]] = {}
            for path, meta in sorted(session["files"].items()):
                key = staged + path
                if _is_record_file(path):
                    size = meta.get("size")
                    if size is None:  # a presigned PUT: the store knows the size
                        info = self.store.stat(key)
                        size = info.size if info is not None else 0
                    if size > MAX_RECORD_FILE_BYTES:
                        raise InvalidRequest(
                            f"{path} is {size} bytes; a JSON(L) record file may have at most "
                            f"{MAX_RECORD_FILE_BYTES} bytes (split the ratings into several files)",
                            field="files",
                        )
                    self.store.get_file(key, data / path)
                else:
                    sha = meta["sha256"] or self._staged_sha256(key)
                    objects[path] = {"sha256": sha, "size": meta["size"], "key": key}
            version = self._publish(
                name, data, objects, {"upload_id": upload_id}, include_ratings, created_by=created_by
            )
        if any(str(f.get("key", "")).startswith(staged) for f in version["files"].values()):
            # The staged videos are the version's now: the session ends, they stay. The records were
            # copied into the version (ratings may have been added): their staged copies go.
            self.store.put_json(self._upload_prefix(name, upload_id) + COMMITTED, {"version": version["id"]})
            self.store.delete(self._upload_prefix(name, upload_id) + "session.json")
            for path in session["files"]:
                if _is_record_file(path):
                    self.store.delete(staged + path)
            self.store.delete_prefix(self._upload_prefix(name, upload_id) + PRESIGNED)
        else:  # the same content was committed before: this staging is not needed
            self.store.delete_prefix(self._upload_prefix(name, upload_id))
        return version

    def _staged_sha256(self, key: str) -> str:
        """The recorded sha256 of a staged object, or (a presigned PUT the store holds without one) the
        sha256 of its bytes, streamed (memory bounded)."""
        info = self.store.stat(key)
        if info is not None and info.sha256:
            return info.sha256
        h = hashlib.sha256()
        with self.store.open_read(key) as reader:
            for chunk in reader.iter_chunks(CHUNK_SIZE):
                h.update(chunk)
        return h.hexdigest()

    def derive_version(
        self, name: str, base: str, include_ratings: bool = True, created_by: str = ""
    ) -> dict[str, Any]:
        """A new version: the files of ``base`` (its videos by reference) plus the dataset's rating records.

        A missing dataset is ``NotFound``; a ``base`` it lacks is ``InvalidRequest`` naming ``base`` (the
        dataset exists, a value in the body is wrong: as a fine-tune's ``version``)."""
        self.get(name)
        try:
            manifest = self.manifest(name, base)
        except NotFound as exc:
            raise InvalidRequest(f"dataset {name!r} has no version {base}", field="base") from exc
        base = manifest["id"]
        with tempfile.TemporaryDirectory(prefix="huvidpo-derive-") as tmp:
            data = Path(tmp) / "data"
            objects: dict[str, dict[str, Any]] = {}
            for rel, meta in manifest["files"].items():
                path = rel[len("data/") :]
                key = self.object_key(name, base, rel, meta)
                if _is_record_file(path):
                    self.store.get_file(key, data / path, expected_sha256=meta["sha256"])
                else:
                    objects[path] = {"sha256": meta["sha256"], "size": meta["size"], "key": key}
            return self._publish(name, data, objects, {"base": base}, include_ratings, created_by=created_by)

    def publish_version(
        self, name: str, data: Path, source: dict[str, Any], include_ratings: bool, created_by: str = ""
    ) -> dict[str, Any]:
        """Publish the dataset directory ``data`` (plus the dataset's rating records when
        ``include_ratings``) as an immutable version named by its content digest, manifest last; the
        same content returns the existing version. ``source`` is recorded as the version's lineage; a
        file equal (sha256) to one of ``source["base"]``'s is referenced, not uploaded again. Raises
        ``InvalidRequest`` naming the file and field of a bad dataset."""
        reuse: dict[str, dict[str, Any]] = {}
        if source.get("base"):
            base = self.manifest(name, str(source["base"]))
            for rel, meta in base["files"].items():
                if not _is_record_file(rel):
                    key = self.object_key(name, base["id"], rel, meta)
                    reuse[meta["sha256"]] = {"sha256": meta["sha256"], "size": meta["size"], "key": key}
        return self._publish(name, data, {}, source, include_ratings, reuse, created_by=created_by)

    def _publish(
        self,
        name: str,
        data: Path,
        objects: Mapping[str, Mapping[str, Any]],
        source: dict[str, Any],
        include_ratings: bool,
        reuse: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        created_by: str = "",
    ) -> dict[str, Any]:
        """Publish ``data`` plus ``objects`` (``{path: {sha256, size, key}}``: files already in the
        store, referenced by key, never read) as a version. Validates the records without decoding
        videos; decoding is :meth:`validate_version`'s, in the background."""
        from huvidpo.data import DatasetError, load_dataset, reference_problems

        for path in objects:  # empty stand-ins: the records are checked against the file names
            validate_relative_path(path)
            _mkdir((data / path).parent)
            (data / path).write_bytes(b"")
        try:
            # The files as sent first, so a problem names the caller's own file and line.
            ds = load_dataset(data, check_videos=False)
        except DatasetError as exc:
            raise InvalidRequest(user_message(exc, data), field="files") from exc
        prompts = {vid: v.prompt for vid, v in ds.videos.items()}
        ratings: builtins.list[dict[str, Any]] = []
        skipped: builtins.list[dict[str, str]] = []
        for rid, record in self._rating_records(name) if include_ratings else []:
            # A stored record that does not fit these videos (one stored before records were checked,
            # or one of a video this upload dropped) is reported, never fatal: delete it to silence it.
            problems = reference_problems(record, prompts)
            if problems:
                skipped.append({"id": rid, "reason": "; ".join(msg for _, msg in problems)})
            else:
                ratings.append(record)
        if ratings:
            _append_records(data, ratings)
            try:
                ds = load_dataset(data, check_videos=False)
            except DatasetError as exc:
                raise InvalidRequest(
                    "the dataset's stored ratings do not fit this version: " + user_message(exc, data),
                    field="ratings",
                ) from exc
        files: dict[str, dict[str, Any]] = {}
        for p in sorted(q for q in data.rglob("*") if q.is_file()):
            path = p.relative_to(data).as_posix()
            if path in objects:
                files["data/" + path] = dict(objects[path])
                continue
            digest, size = sha256_file(p)
            ref = (reuse or {}).get(digest)
            files["data/" + path] = dict(ref) if ref else {"sha256": digest, "size": size}
        digest = content_digest(files)
        prefix = version_prefix(name, digest)
        existing = read_json_or_none(self.store, prefix + MANIFEST)
        if existing is not None:  # same content: the same immutable version
            return {**self._view(existing), "skipped_ratings": skipped}
        for rel, meta in files.items():
            if "key" not in meta:
                self.store.put_file(prefix + rel, data / rel[len("data/") :])
        typed = DatasetVersionManifest(
            id=digest,
            dataset=name,
            digest="sha256:" + digest,
            files={rel: FileEntry.model_validate(meta) for rel, meta in files.items()},
            videos=len(ds.videos),
            prompts=len(ds.prompts),
            raters=len(ds.raters),
            rating_records=len(ratings),
            size=sum(f["size"] for f in files.values()),
            source=source,
            created_at=iso(self.clock()),
            created_by=created_by,  # a token name; the same content later keeps its first creator
        )
        try:
            write_manifest(self.store, prefix, typed, if_none_match=True)  # last: the version exists now
        except PreconditionFailed:
            # Another commit of the same content published it between the check above and here: that
            # version is this one (its files are the ones referenced; this caller's staging goes).
            existing = read_json(self.store, prefix + MANIFEST, f"version {digest} of dataset {name!r}")
            return {**self._view(existing), "skipped_ratings": skipped}
        manifest = typed.model_dump(mode="json")
        # A new version has no validation yet: start it (no read of a result that cannot be there).
        ran = self._schedule_validation(name, digest)
        view = self._view(manifest) if ran else {**manifest, "validation": dict(PENDING), "video_stats": None}
        # What was left out is an answer to this build, not part of the immutable version.
        return {**view, "skipped_ratings": skipped}

    def object_key(self, name: str, digest: str, rel: str, meta: Mapping[str, Any]) -> str:
        """The store key of a version's file: its own (``{version}/data/...``) or the one it references
        (a staged upload, a base version's file), which must lie inside the dataset."""
        key = meta.get("key")
        if key is None:
            return version_prefix(name, digest) + rel
        if not isinstance(key, str) or not key.startswith(dataset_prefix(name)) or ".." in key.split("/"):
            raise InvalidRequest(
                f"version {digest} of dataset {name!r}: {rel} names a bad key", field="version"
            )
        return key

    # ------------------------------------------------------------------------------- validation
    def _view(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The version as the API answers it: the manifest plus its validation (scheduled if pending)."""
        validation = self.validation(manifest["dataset"], manifest["id"], manifest)
        stats = validation["video_stats"] if validation["state"] == "passed" else None
        shown = {k: v for k, v in validation.items() if k != "motion"}  # per video: the pairs report's
        return {**manifest, "validation": shown, "video_stats": stats}

    def validation(self, name: str, digest: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """``{state: pending|passed|failed, video_stats, problems}`` of a version; schedules the
        validation when none is recorded and none runs in this process (e.g. after a restart)."""
        key = version_prefix(name, digest) + VALIDATION
        recorded = read_json_or_none(self.store, key)
        if isinstance(recorded, dict) and recorded.get("state") in ("passed", "failed"):
            return recorded
        if self._schedule_validation(name, digest):  # ran inline: its result is there now
            recorded = read_json_or_none(self.store, key)
            if isinstance(recorded, dict) and recorded.get("state") in ("passed", "failed"):
                return recorded
        return dict(PENDING)

    def _schedule_validation(self, name: str, digest: str) -> bool:
        """Start the version's validation unless it runs already; True when the runner returned
        after it finished (the inline runner)."""
        with self._lock:
            if (name, digest) in self._validating:
                return False
            self._validating.add((name, digest))
        done = threading.Event()

        def run() -> None:
            try:
                self.validate_version(name, digest)
            except Exception:  # a later read schedules it again
                log.exception("validating version %s of dataset %r failed", digest, name)
            finally:
                with self._lock:
                    self._validating.discard((name, digest))
                done.set()

        self._runner(run)
        return done.is_set()

    def validate_version(self, name: str, digest: str) -> dict[str, Any]:
        """Decode every video of a version (frame counts, sizes) and record the result as the
        version's ``validation``. A bad video fails the validation (``problems`` names it); the
        version stays, and a fine-tune of it is refused by the trainer (exit 2)."""
        from huvidpo.data import DatasetError, load_dataset
        from huvidpo.data.stats import video_stats

        result: dict[str, Any]
        try:
            data = self.fetch_version(name, digest)
        except (ChecksumMismatch, ObjectNotFound) as exc:
            # e.g. a presigned PUT URL still valid after the commit overwrote a staged video
            problem = f"a file of this version is missing or altered in the store: {exc}"
            result = {"state": "failed", "video_stats": None, "problems": [problem]}
        else:
            try:
                ds = load_dataset(data)
                # Each video's motion, measured by this decode, so compiling pairs never decodes again.
                motion = {vid: v.motion for vid, v in sorted(ds.videos.items()) if v.motion is not None}
                result = {"state": "passed", "video_stats": video_stats(ds), "problems": [], "motion": motion}
            except DatasetError as exc:
                problems = [user_message(Exception(str(i)), data) for i in exc.issues]
                result = {"state": "failed", "video_stats": None, "problems": problems}
        prefix = version_prefix(name, digest)
        if self.store.exists(prefix + MANIFEST):  # not for a version deleted meanwhile
            self.store.put_json(prefix + VALIDATION, {**result, "validated_at": iso(self.clock())})
        return result

    # ------------------------------------------------------------------------------- versions
    def list_versions(self, name: str) -> builtins.list[dict[str, Any]]:
        return [self._view(m) for m in self.manifests(name)]

    def manifests(self, name: str) -> builtins.list[dict[str, Any]]:
        out = []
        for d in self.store.list_dirs(dataset_prefix(name)):
            seg = d[len(dataset_prefix(name)) : -1]
            if len(seg) == 64:
                m = read_json_or_none(self.store, d + MANIFEST)
                if m is not None:
                    out.append(m)
        return sorted(out, key=lambda m: (m["created_at"], m["id"]))

    def get_version(self, name: str, digest: str) -> dict[str, Any]:
        """The version's manifest with its ``validation`` (and ``video_stats`` once that passed)."""
        return self._view(self.manifest(name, digest))

    def manifest(self, name: str, digest: str) -> dict[str, Any]:
        validate_name(name, "dataset")
        digest = validate_digest(digest)
        manifest: dict[str, Any] = read_json(
            self.store, version_prefix(name, digest) + MANIFEST, f"version {digest} of dataset {name!r}"
        )
        return manifest

    def delete_version(
        self, name: str, digest: str, holds: Callable[[str], str | None] | None = None
    ) -> None:
        """Delete one version (and its compiled pairs); ``holds`` as for :meth:`delete`."""
        manifest = self.manifest(name, digest)
        digest = manifest["id"]
        held = _holders(self.references(name, digest), holds)
        if held:
            raise Conflict(f"version {digest} is still in use and cannot be deleted: {'; '.join(held)}")
        # manifest first: the version stops existing before its files go
        self.store.delete(version_prefix(name, digest) + MANIFEST)
        # Its own files and the staged files it referenced, unless another version references them.
        kept = {
            self.object_key(name, m["id"], rel, meta)
            for m in self.manifests(name)
            for rel, meta in m["files"].items()
        }
        for obj in self.store.list(version_prefix(name, digest)):
            if obj.key not in kept:
                self.store.delete(obj.key)
        uploads = set()
        for rel, meta in manifest["files"].items():
            key = self.object_key(name, digest, rel, meta)
            if key not in kept:
                self.store.delete(key)
            if key.startswith(dataset_prefix(name) + "uploads/"):
                uploads.add(key.split("/files/", 1)[0] + "/")
        for upload in uploads:  # an upload none of whose files is referenced any more goes
            if not self.store.list(upload + "files/"):
                self.store.delete_prefix(upload)
        with contextlib.suppress(Exception):
            self.store.delete_prefix(dataset_prefix(name) + f"compiled/{digest}/")

    def fetch_version(self, name: str, digest: str) -> Path:
        """A verified local copy of a version's dataset directory (cached by digest)."""
        manifest = self.manifest(name, digest)
        digest = manifest["id"]
        dest = self.cache_dir / "datasets" / name / digest
        if (dest / ".complete").exists():
            return dest / "data"
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=_mkdir(dest.parent)))
        try:
            for rel, meta in manifest["files"].items():
                self.store.get_file(
                    self.object_key(name, digest, rel, meta), tmp / rel, expected_sha256=meta["sha256"]
                )
            (tmp / "data").mkdir(exist_ok=True)
            (tmp / ".complete").write_text(digest)
            try:
                tmp.rename(dest)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)  # another request fetched it first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest / "data"

    # ------------------------------------------------------------------------------- ratings
    def add_ratings(self, name: str, records: builtins.list[dict[str, Any]]) -> builtins.list[str]:
        """Store rating/choice records, one object each; the id is the record's digest (idempotent).

        Every record must name videos of the dataset's current version (a choice: two of one prompt);
        otherwise nothing is stored and ``InvalidRequest`` names the first bad field (``records[i].video_id``)."""
        from huvidpo.data import reference_problems

        self.get(name)
        version, prompts = self.current_prompts(name)
        bad = [
            (f"records[{i}].{fld}", msg)
            for i, rec in enumerate(records)
            for fld, msg in reference_problems(rec, prompts)
        ]
        if bad:
            where = (
                f"the current version {version} of dataset {name!r}"
                if version
                else f"dataset {name!r}: it has no version yet; upload one first"
            )
            lines = "\n  ".join(f"{fld}: {msg}" for fld, msg in bad)
            raise InvalidRequest(
                f"no rating stored: every record must name videos of {where}:\n  {lines}", field=bad[0][0]
            )
        ids = []
        for rec in records:
            blob = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
            rid = "r-" + hashlib.sha256(blob).hexdigest()[:24]
            self.store.put_json(dataset_prefix(name) + f"ratings/{rid}.json", {"id": rid, "record": rec})
            ids.append(rid)
        return ids

    def list_ratings(
        self, name: str, page_size: int = 100, page_token: str | None = None
    ) -> tuple[builtins.list[dict[str, Any]], str | None]:
        self.get(name)
        objs = self.store.list(dataset_prefix(name) + "ratings/", recursive=False)
        page, token = paginate(objs, lambda o: o.key, page_size, page_token)
        return [self.store.get_json(o.key) for o in page], token

    def _rating_records(self, name: str) -> builtins.list[tuple[str, dict[str, Any]]]:
        """``[(rating_id, record)]`` of the dataset's stored rating and choice records."""
        out = []
        for o in self.store.list(dataset_prefix(name) + "ratings/", recursive=False):
            obj = self.store.get_json(o.key)
            out.append((str(obj.get("id", o.key.rsplit("/", 1)[-1].removesuffix(".json"))), obj["record"]))
        return out

    def current_prompts(self, name: str) -> tuple[str | None, dict[str, str]]:
        """``(version, {video_id: prompt})`` of the dataset's current (latest) version; ``(None, {})``
        while it has none. Read without validating: the version was valid when it was published, and
        one published before a rule was added must still answer."""
        versions = self.manifests(name)
        if not versions:
            return None, {}
        version = str(versions[-1]["id"])
        prompts = {}
        for r in self.version_records(name, version):
            if isinstance(r, dict) and r.get("type", "video") == "video" and "file" in r and "id" in r:
                prompts[str(r["id"])] = str(r.get("prompt", r.get("category")))
        return version, prompts

    def version_records(self, name: str, version: str) -> builtins.list[Any]:
        """The records of a version's manifest file (``manifest.jsonl`` or ``manifest.json``), read from
        the store alone and checked against the version's digest: no video is fetched."""
        manifest = self.manifest(name, version)
        for rel in ("data/manifest.jsonl", "data/manifest.json"):
            meta = manifest["files"].get(rel)
            if meta is None:
                continue
            data = self.store.get_bytes(self.object_key(name, manifest["id"], rel, meta))
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise InvalidRequest(
                    f"version {manifest['id']} of dataset {name!r}: {rel[len('data/') :]} differs from "
                    "its recorded digest",
                    field="version",
                )
            text = data.decode("utf-8-sig")
            if rel.endswith(".jsonl"):
                return [json.loads(ln) for ln in text.splitlines() if ln.strip()]
            records = json.loads(text)
            return records if isinstance(records, list) else []
        return []

    def delete_rating(self, name: str, rating_id: str) -> None:
        """Delete one stored rating, choice or tie record; ``NotFound`` when there is none."""
        self.get(name)
        if not RATING_ID_RE.match(rating_id or ""):
            raise NotFound(f"rating {rating_id!r} not found in dataset {name!r}")
        keys = [dataset_prefix(name) + f"{sub}/{rating_id}.json" for sub in ("ratings", "ties")]
        found = [k for k in keys if self.store.exists(k)]
        if not found:
            raise NotFound(f"rating {rating_id!r} not found in dataset {name!r}")
        for k in found:
            self.store.delete(k)

    # ------------------------------------------------------------------------------- pairs
    def pairs_prefix(self, name: str, digest: str, options: PairOptions) -> str:
        """Where the pairs of version ``digest`` compiled with ``options`` live (``pairs.jsonl``,
        ``report.json``, and ``heldout.jsonl`` with a hold-out); ``digest`` in its stored (64-hex) form."""
        return dataset_prefix(name) + f"compiled/{digest}/{options.key()}/"

    def compile_pairs(self, name: str, digest: str, options: PairOptions) -> dict[str, Any]:
        """Compile a version's ratings into DPO pairs; stores pairs.jsonl and the report; returns the report.

        Reads the version's record files only, never a video: the pairs come from the records, and
        the report's motion check uses the motion the version's validation measured when it decoded
        the videos. Compiled before that validation passed, the report says the check is pending and
        is compiled again (same pairs, same digest) once it has passed."""
        from huvidpo.data import DatasetError, compile_pairs, load_dataset, write_pairs

        manifest = self.manifest(name, digest)
        digest = manifest["id"]
        prefix = self.pairs_prefix(name, digest, options)
        recorded = read_json_or_none(self.store, version_prefix(name, digest) + VALIDATION) or {}
        motion = recorded.get("motion") if recorded.get("state") == "passed" else None
        cached = read_json_or_none(self.store, prefix + "report.json")
        if cached is not None and (cached.get("motion_measured", True) or motion is None):
            return dict(cached)
        with tempfile.TemporaryDirectory(prefix="huvidpo-pairs-") as tmp:
            data = self._records_only(name, manifest, Path(tmp) / "data")
            try:
                ds = load_dataset(data, check_videos=False)
                for vid, score in (motion or {}).items():
                    if vid in ds.videos:
                        ds.videos[vid].motion = float(score)
                pairset = compile_pairs(
                    ds,
                    options.tie_policy,
                    options.min_margin,
                    options.margin_weighting,
                    seed=options.seed,
                    motion_check=motion is not None,
                    holdout_fraction=options.holdout_fraction,
                    holdout_seed=options.holdout_seed,
                )
            except DatasetError as exc:
                raise InvalidRequest(user_message(exc, data), field="version") from exc
            except ValueError as exc:
                field = "holdout_fraction" if "holdout_fraction" in str(exc) else "options"
                raise InvalidRequest(str(exc), field=field) from exc
            heldout_sha256 = None
            if options.holdout_fraction:  # before pairs.jsonl: a reader that finds the pairs finds both
                held = write_pairs(pairset.heldout, Path(tmp) / "heldout.jsonl")
                heldout_sha256 = self.store.put_file(
                    prefix + "heldout.jsonl", held, content_type="application/jsonl"
                ).sha256
            path = write_pairs(pairset, Path(tmp) / "pairs.jsonl")
            info = self.store.put_file(prefix + "pairs.jsonl", path, content_type="application/jsonl")
        text = pairset.report.format()
        if motion is None:
            text += "\nmotion check: pending (it runs on the motion the version's validation measures)"
        report = {
            "dataset": name,
            "version": digest,
            "options": options.as_dict(),
            "pairs": len(pairset.pairs),
            "pairs_sha256": info.sha256,
            "heldout": len(pairset.heldout),
            "heldout_sha256": heldout_sha256,
            "report": pairset.report.to_dict(),
            "text": text,
            "motion_measured": motion is not None,
        }
        self.store.put_json(prefix + "report.json", report)
        return report

    def _records_only(self, name: str, manifest: Mapping[str, Any], data: Path) -> Path:
        """The version's dataset directory at ``data`` with its record files (JSON(L), digest-checked)
        and an empty stand-in for each video: enough to read the records, nothing decoded."""
        for rel, meta in manifest["files"].items():
            if not rel.startswith("data/"):
                continue
            path = rel[len("data/") :]
            validate_relative_path(path)
            dest = data / path
            _mkdir(dest.parent)
            if _is_record_file(path):
                key = self.object_key(name, manifest["id"], rel, meta)
                self.store.get_file(key, dest, expected_sha256=meta["sha256"])
            else:
                dest.write_bytes(b"")
        _mkdir(data)
        return data


def _thread_runner(fn: Callable[[], None]) -> None:
    # Not a daemon: an exit waits for the validation rather than killing a decoder mid-frame (a
    # validation cut short, e.g. by SIGKILL, is scheduled again by the next read of the version).
    threading.Thread(target=fn, name="dataset-validation").start()


def run_inline(fn: Callable[[], None]) -> None:
    """A ``DatasetService`` runner that validates in the calling thread (no background threads)."""
    fn()


def _is_record_file(path: str) -> bool:
    """A JSON(L) file (manifest, ratings, lineage): small, read at commit. Every other file is a video."""
    return Path(path).suffix.lower() in RECORD_SUFFIXES


def _holders(refs: Mapping[str, str], holds: Callable[[str], str | None] | None) -> builtins.list[str]:
    """The reasons the referencing fine-tunes still hold what they reference (at most five named)."""
    reasons = [r for ft in sorted(refs) if (r := f"fine-tune {ft}" if holds is None else holds(ft))]
    return reasons[:5] + ([f"and {len(reasons) - 5} more"] if len(reasons) > 5 else [])


def user_message(exc: Exception, root: Path) -> str:
    """``exc``'s message with the server's copy of the dataset (a temporary or cache directory) taken
    out, so file names read as the caller sent them (``manifest.jsonl: line 3``, ``videos/a.mp4``)."""
    text = str(exc)
    for r in sorted({str(root), str(root.absolute()), str(root.resolve())}, key=len, reverse=True):
        text = text.replace(r + "/", "").replace(r, "the upload")
    return text


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _append_records(data: Path, records: builtins.list[dict[str, Any]]) -> None:
    """Append rating/choice records to the dataset's manifest (a JSON list becomes JSONL)."""
    from huvidpo.data import find_manifest

    manifest = find_manifest(data)
    if manifest.name == "manifest.json":
        try:
            existing = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InvalidRequest(f"manifest.json is not valid JSON: {exc}", field="files") from exc
        if not isinstance(existing, list):
            raise InvalidRequest("manifest.json must be a JSON list of records", field="files")
        lines = [json.dumps(r) for r in existing]
        manifest.unlink()
        manifest = data / "manifest.jsonl"
    else:
        lines = [ln for ln in manifest.read_text(encoding="utf-8").splitlines() if ln.strip()]
    # Records already in the manifest (e.g. a version derived from one that took them) are not repeated.
    seen = set()
    for ln in lines:
        with contextlib.suppress(ValueError):
            seen.add(json.dumps(json.loads(ln), sort_keys=True))
    lines += [c for c in (json.dumps(r, sort_keys=True) for r in records) if c not in seen]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")


__all__ = [
    "ALLOWED_EXTENSIONS",
    "CHUNK_SIZE",
    "DatasetService",
    "PairOptions",
    "check_file_type",
    "content_digest",
    "run_inline",
]
