"""Committing an upload reads no video byte back from the store and writes none again; decoding
(frame counts, sizes, broken videos) is the background validation's, and its result is the version's."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from services.common.store import LocalStore, ObjectInfo, ObjectReader
from services.controlplane.domain.datasets import DatasetService


class CountingStore(LocalStore):
    """A local store that counts the bytes read and written per key; ``unhashed`` keys are listed
    and stat'ed without a sha256, as S3 holds a file sent by presigned PUT."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.read: Counter[str] = Counter()
        self.written: Counter[str] = Counter()
        self.unhashed: set[str] = set()

    def open_read(self, key: str) -> ObjectReader:
        reader = super().open_read(key)
        inner = reader._read  # type: ignore[attr-defined]

        def counted(n: int = -1) -> bytes:
            data = inner(n)
            self.read[key] += len(data)
            return data

        reader._read = counted  # type: ignore[attr-defined]
        return reader

    def put_stream(self, key, stream, length=None, content_type=None, metadata=None):  # type: ignore[no-untyped-def]
        info = super().put_stream(key, stream, length, content_type, metadata)
        self.written[key] += info.size
        return info

    def _hide(self, info: ObjectInfo) -> ObjectInfo:
        return dataclasses.replace(info, sha256=None) if info.key in self.unhashed else info

    def stat(self, key: str) -> ObjectInfo | None:
        info = super().stat(key)
        return None if info is None else self._hide(info)

    def list(self, prefix: str = "", recursive: bool = True) -> list[ObjectInfo]:
        return [self._hide(o) for o in super().list(prefix, recursive)]

    def video_bytes(self, counter: Counter[str]) -> int:
        return sum(n for k, n in counter.items() if not k.endswith((".json", ".jsonl")))


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from huvidpo.data import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("ds") / "d", n_prompts=1, videos_per_prompt=3, num_frames=4, size=32
    )


def _service(tmp_path: Path) -> tuple[DatasetService, CountingStore, list[Callable[[], None]]]:
    store = CountingStore(tmp_path / "store")
    deferred: list[Callable[[], None]] = []
    svc = DatasetService(store, tmp_path / "cache", runner=deferred.append)
    svc.create("cats")
    return svc, store, deferred


def _stage(svc: DatasetService, files: dict[str, bytes]) -> str:
    import io

    upload = svc.start_upload("cats")["id"]
    for path, data in files.items():
        svc.stage_stream("cats", upload, path, io.BytesIO(data))
    return str(upload)


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _reset(store: CountingStore) -> None:
    store.read.clear()
    store.written.clear()


def test_commit_reads_and_writes_no_video_bytes(tmp_path: Path, synthetic_dir: Path) -> None:
    svc, store, deferred = _service(tmp_path)
    files = _files(synthetic_dir)
    upload = _stage(svc, files)
    _reset(store)
    version = svc.commit_upload("cats", upload)
    assert store.video_bytes(store.read) == 0, store.read
    assert store.video_bytes(store.written) == 0, store.written
    staged_reads = sum(n for k, n in store.read.items() if "/files/" in k)
    assert staged_reads == sum(len(b) for p, b in files.items() if p.endswith((".json", ".jsonl")))
    assert version["validation"]["state"] == "pending" and version["video_stats"] is None
    # the upload session is over; its files are the version's
    assert svc.store.exists(f"datasets/cats/uploads/{upload}/committed.json")
    svc.discard_upload("cats", upload)  # a late discard does not take the version's files
    # the decoding runs afterwards (here: when the test runs the deferred job)
    assert len(deferred) == 1
    deferred.pop()()
    checked = svc.get_version("cats", version["id"])
    assert checked["validation"]["state"] == "passed"
    assert checked["video_stats"] == {"videos": 3, "min_frames": 4, "min_height": 32, "min_width": 32}
    # every reader still gets the bytes: the control plane's cache and the trainer's fetch
    data = svc.fetch_version("cats", version["id"])
    assert _files(data) == files
    from services.common.publish import fetch_published
    from services.common.records.keys import dataset_version_prefix

    fetch_published(store, dataset_version_prefix("cats", version["id"]), tmp_path / "trainer")
    assert _files(tmp_path / "trainer" / "data") == files


def test_the_same_content_is_the_same_version_however_it_was_sent(
    tmp_path: Path, synthetic_dir: Path
) -> None:
    svc, store, _ = _service(tmp_path)
    files = _files(synthetic_dir)
    first = svc.commit_upload("cats", _stage(svc, files), include_ratings=False)
    # as if every video came by presigned PUT to S3 (no sha256 recorded): commit hashes those only
    upload = _stage(svc, files)
    store.unhashed = {f"datasets/cats/uploads/{upload}/files/{p}" for p in files if p.endswith(".mp4")}
    _reset(store)
    again = svc.commit_upload("cats", upload, include_ratings=False)
    assert again["id"] == first["id"]
    assert store.video_bytes(store.read) == sum(len(b) for p, b in files.items() if p.endswith(".mp4"))
    # the second staging was not needed: it is gone, the first is the version's
    assert store.list(f"datasets/cats/uploads/{upload}/") == []


def test_a_bad_video_is_reported_by_validation_not_lost(tmp_path: Path) -> None:
    svc, _, deferred = _service(tmp_path)
    record = {"id": "a", "file": "videos/a.mp4", "prompt": "p"}
    upload = _stage(
        svc, {"manifest.jsonl": json.dumps(record).encode() + b"\n", "videos/a.mp4": b"not a video"}
    )
    version = svc.commit_upload("cats", upload)
    assert version["validation"]["state"] == "pending"
    deferred.pop()()
    checked = svc.get_version("cats", version["id"])
    assert checked["validation"]["state"] == "failed" and checked["video_stats"] is None
    problems = "\n".join(checked["validation"]["problems"])
    assert "videos/a.mp4" in problems and str(tmp_path) not in problems, problems
    assert [v["id"] for v in svc.list_versions("cats")] == [version["id"]]  # the version stays


def test_derive_references_the_base_videos_and_deletion_keeps_what_others_use(
    tmp_path: Path, synthetic_dir: Path
) -> None:
    svc, store, _ = _service(tmp_path)
    files = _files(synthetic_dir)
    upload = _stage(svc, files)
    base = svc.commit_upload("cats", upload)
    vid = next(iter(svc.current_prompts("cats")[1]))
    svc.add_ratings("cats", [{"type": "rating", "video_id": vid, "rater_id": "zoe", "score": 7}])
    _reset(store)
    derived = svc.derive_version("cats", base["id"])
    assert derived["id"] != base["id"] and derived["rating_records"] == 1
    assert store.video_bytes(store.read) == 0 and store.video_bytes(store.written) == 0
    svc.delete_version("cats", base["id"])
    fetched = _files(svc.fetch_version("cats", derived["id"]))
    assert {p: b for p, b in fetched.items() if p.endswith(".mp4")} == {
        p: b for p, b in files.items() if p.endswith(".mp4")
    }
    svc.delete_version("cats", derived["id"])
    # nothing is left of either version or of the upload they shared
    assert [o.key for o in store.list("datasets/cats/") if "/ratings/" not in o.key] == [
        "datasets/cats/dataset.json"
    ]


def test_a_staged_video_overwritten_after_commit_fails_validation(
    tmp_path: Path, synthetic_dir: Path
) -> None:
    import io

    svc, store, deferred = _service(tmp_path)
    files = _files(synthetic_dir)
    upload = _stage(svc, files)
    version = svc.commit_upload("cats", upload)
    video = next(p for p in files if p.endswith(".mp4"))
    # what anything that rewrites a staged video in the store could do (presigned URLs no longer can:
    # they write under presigned/, see test_controlplane_bounds.py)
    store.put_stream(f"datasets/cats/uploads/{upload}/files/{video}", io.BytesIO(b"other bytes"))
    deferred.pop()()
    checked = svc.get_version("cats", version["id"])
    assert checked["validation"]["state"] == "failed", checked["validation"]
    assert "altered" in checked["validation"]["problems"][0] and video in checked["validation"]["problems"][0]


def test_a_version_manifest_is_the_typed_record_checkpoints_are_published_with(
    tmp_path: Path, synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commit and derive write the version manifest through ``publish.write_manifest`` (the path a
    checkpoint's manifest takes), as a ``DatasetVersionManifest`` with no field outside the type."""
    from services.common import publish
    from services.common.records.keys import dataset_version_prefix
    from services.common.records.lineage import DatasetVersionManifest
    from services.controlplane.domain import datasets as datasets_mod

    written: list[tuple[str, object]] = []
    real = publish.write_manifest

    def spy(store, prefix, manifest, **kw):  # type: ignore[no-untyped-def]
        written.append((prefix, manifest))
        real(store, prefix, manifest, **kw)

    monkeypatch.setattr(datasets_mod, "write_manifest", spy)
    svc, store, _ = _service(tmp_path)
    files = _files(synthetic_dir)
    base = svc.commit_upload("cats", _stage(svc, files))
    vid = next(iter(svc.current_prompts("cats")[1]))
    svc.add_ratings("cats", [{"type": "rating", "video_id": vid, "rater_id": "zoe", "score": 7}])
    derived = svc.derive_version("cats", base["id"])
    assert [p for p, _ in written] == [
        dataset_version_prefix("cats", base["id"]),
        dataset_version_prefix("cats", derived["id"]),
    ]
    sources = []
    for version in (base, derived):
        stored = store.get_json(dataset_version_prefix("cats", version["id"]) + "manifest.json")
        typed = DatasetVersionManifest.model_validate(stored)
        assert typed.model_extra == {}, typed.model_extra  # every field is the type's
        assert typed.content_digest() == typed.id == version["id"]
        assert typed.model_dump(mode="json") == stored
        # videos stay where they were staged: referenced by key, never copied
        videos = {rel: f for rel, f in typed.files.items() if rel.endswith(".mp4")}
        assert videos and all(f.key and "/uploads/" in f.key for f in videos.values())
        sources.append(typed.source)
    assert sources[0].keys() == {"upload_id"} and sources[1] == {"base": base["id"]}


def test_pairs_compile_and_a_finetune_create_read_no_video_and_motion_comes_from_validation(
    tmp_path: Path, synthetic_dir: Path
) -> None:
    """A fine-tune's create compiles its pairs from the records alone (fast whatever the videos'
    size); the report's motion check uses what the version's validation measured, and the report
    compiled before that is compiled again afterwards with the same pairs."""
    from services.common.publish import publish_dir
    from services.controlplane.domain.datasets import PairOptions
    from services.controlplane.domain.finetunes import FineTuneRequest, FineTuneService
    from tests.doubles import IdleExecutor

    svc, store, deferred = _service(tmp_path)
    version = svc.commit_upload("cats", _stage(svc, _files(synthetic_dir)))
    _reset(store)
    early = svc.compile_pairs("cats", version["id"], PairOptions())
    assert store.video_bytes(store.read) == 0, store.read
    assert early["pairs"] > 0 and early["motion_measured"] is False
    assert early["report"]["motion"] is None and "motion check: pending" in early["text"]

    deferred.pop()()  # the background validation decodes every video once
    _reset(store)
    later = svc.compile_pairs("cats", version["id"], PairOptions())
    assert store.video_bytes(store.read) == 0, store.read
    assert later["motion_measured"] is True and later["report"]["motion"]["pairs"] == later["pairs"]
    assert later["pairs_sha256"] == early["pairs_sha256"]  # the same pairs either way
    assert "pending" not in later["text"]

    # A DPO fine-tune's create with other options compiles its own pairs, again without a video.
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    publish_dir(store, model, "models/tiny/")
    finetunes = FineTuneService(store, IdleExecutor(), svc)
    _reset(store)
    view, created = finetunes.create(
        FineTuneRequest(
            "cats",
            version["id"],
            "tiny",
            "dpo",
            {"max_steps": 1, "num_frames": 4, "height": 32, "width": 32, "tie_policy": "keep"},
        )
    )
    assert created and view["pairs"]["options"]["tie_policy"] == "keep"
    assert store.video_bytes(store.read) == 0, store.read


def test_an_oversized_record_file_is_refused_at_commit_before_it_is_read(
    tmp_path: Path, synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.controlplane.domain import datasets as datasets_mod
    from services.controlplane.domain.errors import InvalidRequest

    svc, store, _ = _service(tmp_path)
    files = _files(synthetic_dir)
    upload = _stage(svc, files)
    monkeypatch.setattr(datasets_mod, "MAX_RECORD_FILE_BYTES", len(files["manifest.jsonl"]) - 1)
    _reset(store)
    with pytest.raises(InvalidRequest) as err:
        svc.commit_upload("cats", upload)
    assert err.value.field == "files" and "manifest.jsonl" in str(err.value)
    assert not any("manifest.jsonl" in k for k in store.read), store.read  # refused unread
    assert svc.list_versions("cats") == [] and svc.get_upload("cats", upload)["files"]  # nothing lost
    monkeypatch.setattr(datasets_mod, "MAX_RECORD_FILE_BYTES", 2**20)
    assert svc.commit_upload("cats", upload)["videos"] == 3  # the same staging commits within the cap


def test_two_commits_of_the_same_content_racing_leave_one_version_and_no_orphan(
    tmp_path: Path, synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second commit reaches its publish after the first's manifest landed but checked for it
    before (the race window, made here by hiding the first manifest from that one check)."""
    from services.controlplane.domain import datasets as datasets_mod

    svc, store, _ = _service(tmp_path)
    files = _files(synthetic_dir)
    first_upload, second_upload = _stage(svc, files), _stage(svc, files)
    first = svc.commit_upload("cats", first_upload)
    real = datasets_mod.read_json_or_none
    hidden = []

    def stale_check(st, key):  # type: ignore[no-untyped-def]
        if key.endswith(f"/{first['id']}/manifest.json") and not hidden:
            hidden.append(key)
            return None
        return real(st, key)

    monkeypatch.setattr(datasets_mod, "read_json_or_none", stale_check)
    second = svc.commit_upload("cats", second_upload)
    assert hidden and second["id"] == first["id"]
    stored = store.get_json(f"datasets/cats/{first['id']}/manifest.json")
    keys = [f["key"] for f in stored["files"].values() if "key" in f]
    assert keys and all(f"/uploads/{first_upload}/" in k for k in keys)  # the first's files, unchanged
    assert store.list(f"datasets/cats/uploads/{second_upload}/") == []  # nothing of the loser is left
