"""The behaviour every ``ObjectStore`` adapter must show, as one suite run against each of them.

A test module subclasses ``StoreContract`` and provides two fixtures:
- ``store``: a fresh, empty ``ObjectStore`` (for S3, a new bucket with a 5 MiB part size);
- ``corrupt``: ``corrupt(key, data, keep_digest)`` replaces an object's bytes behind the adapter's
  back; with ``keep_digest`` the recorded sha256 stays the old one (bit rot), without it the object
  is consistent but differs from any manifest that lists it.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from services.common.publish import (
    NotPublished,
    RevisionConflict,
    RolloutRecord,
    fetch_published,
    is_published,
    publish_dir,
    read_rollout,
    write_rollout,
)
from services.common.store import (
    ChecksumMismatch,
    IncompleteStream,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
)

Corrupt = Callable[[str, bytes, bool], None]

# Larger than one 5 MiB part plus the peeked byte, so S3 adapters go through multipart.
MULTIPART_SIZE = 6 * 1024 * 1024 + 123

BAD_KEYS = [
    "",
    "/abs",
    "a/../b",
    "..",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "a\x00b",
    "a\nb",
    "a\x7fb",
    ".huvidpo-tmp/x",
    "x" * 1025,
]


class ChunkedStream:
    """A stream handing out ``data`` in small reads (like a web framework), optionally failing."""

    def __init__(self, data: bytes, chunk: int = 64 * 1024, fail_after: int | None = None) -> None:
        self._buf = io.BytesIO(data)
        self._chunk = chunk
        self._fail_after = fail_after
        self.consumed = 0

    def read(self, n: int = -1) -> bytes:
        if self._fail_after is not None and self.consumed >= self._fail_after:
            raise ConnectionResetError("client went away")
        size = self._chunk if n is None or n < 0 else min(n, self._chunk)
        out = self._buf.read(size)
        self.consumed += len(out)
        return out


def _payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes (sha256 chain), fast enough for a few MiB."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    reps = size // len(block) + 1
    return (block * reps)[:size]


class RecordingStore:
    """Proxy recording the order of writes, to prove a manifest is written last."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.writes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name in ("put_bytes", "put_stream", "put_file", "put_json"):

            def record(key: str, *args: Any, **kwargs: Any) -> Any:
                self.writes.append(key)
                return attr(key, *args, **kwargs)

            return record
        return attr


class RacingReaders:
    """Proxy making ``n`` threads' rollout writes race deterministically, without timing.

    The first read a thread makes through it returns only once all ``n`` threads have read (so they
    all hold the same revision and etag); then thread ``i`` proceeds only after thread ``i - 1``
    called ``done(i - 1)``. Writes therefore happen strictly one after the other, in thread order,
    each from the same stale read. Later reads of a thread (a re-check after a refused write) pass.
    With ``ordered=False`` all threads write at once after the common read (a real race, for
    servers whose own concurrency is under test).
    """

    _READS = ("get_bytes", "get_json", "get_bytes_with_etag", "get_json_with_etag", "open_read")

    def __init__(self, inner: ObjectStore, n: int, ordered: bool = True) -> None:
        self.inner = inner
        self._ordered = ordered
        self._barrier = threading.Barrier(n, timeout=30)
        self._finished = [threading.Event() for _ in range(n)]
        self._local = threading.local()

    def sharing(self, inner: ObjectStore) -> RacingReaders:
        """A proxy of another store (another client) in the same race: same barrier and order."""
        other = RacingReaders.__new__(RacingReaders)
        other.__dict__.update(self.__dict__)
        other.inner = inner
        return other

    def done(self, index: int) -> None:
        self._finished[index].set()

    def bind(self, index: int) -> None:
        self._local.index = index
        self._local.waited = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self._READS:
            return attr

        def read(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            finally:  # also when the read raises (ObjectNotFound: no record yet)
                if not self._local.waited:
                    self._local.waited = True
                    self._barrier.wait()
                    index = self._local.index
                    if self._ordered and index > 0 and not self._finished[index - 1].wait(timeout=30):
                        raise TimeoutError(f"writer {index - 1} never finished")

        return read


def race_rollout_writes(
    store: ObjectStore | Sequence[ObjectStore], records: list[RolloutRecord], ordered: bool = True
) -> list[str]:
    """Write each record from its own thread through ``RacingReaders``: every writer reads the same
    stored revision first, then they write one after the other in list order (all at once when not
    ``ordered``). ``store`` may be one store per writer (separate clients, like separate replicas).
    Returns each writer's outcome: ``"ok"``, ``"conflict"`` (``RevisionConflict``) or the repr of
    another error."""
    stores = list(store) if isinstance(store, Sequence) else [store] * len(records)
    gates = [RacingReaders(stores[0], len(records), ordered)]
    gates += [gates[0].sharing(s) for s in stores[1:]]
    outcomes = ["not run"] * len(records)

    def write(index: int) -> None:
        racing = gates[index]
        racing.bind(index)
        try:
            write_rollout(racing, records[index])  # type: ignore[arg-type]
            outcomes[index] = "ok"
        except RevisionConflict:
            outcomes[index] = "conflict"
        except Exception as exc:
            outcomes[index] = repr(exc)
        finally:
            racing.done(index)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(records))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    return outcomes


class StoreContract:
    """Same assertions for every adapter; subclasses provide ``store`` and ``corrupt``."""

    # ------------------------------------------------------------------ round trips
    def test_put_bytes_round_trip_records_sha256_type_and_metadata(self, store: ObjectStore) -> None:
        data = b"hello, store"
        info = store.put_bytes("a/b/hello.txt", data, content_type="text/plain", metadata={"Lineage": "x1"})
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert info.size == len(data)
        st = store.stat("a/b/hello.txt")
        assert st is not None
        assert (st.size, st.sha256, st.content_type) == (len(data), info.sha256, "text/plain")
        assert st.metadata == {"lineage": "x1"}
        assert st.modified is not None and st.modified.tzinfo is not None
        assert store.get_bytes("a/b/hello.txt") == data
        assert store.exists("a/b/hello.txt")

    def test_overwrite_replaces_object_and_digest(self, store: ObjectStore) -> None:
        store.put_bytes("k", b"one")
        store.put_bytes("k", b"second version")
        st = store.stat("k")
        assert st is not None and st.sha256 == hashlib.sha256(b"second version").hexdigest()
        assert store.get_bytes("k") == b"second version"

    def test_missing_object_is_none_for_stat_and_not_found_for_reads(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        assert store.stat("nope/x") is None
        assert not store.exists("nope/x")
        with pytest.raises(ObjectNotFound):
            store.get_bytes("nope/x")
        with pytest.raises(ObjectNotFound):
            store.open_read("nope/x")
        with pytest.raises(ObjectNotFound):
            store.get_file("nope/x", tmp_path / "dl" / "out")
        assert not (tmp_path / "dl").exists()  # nothing created, not even the directory

    def test_put_stream_of_unknown_length_streams_and_returns_digest(self, store: ObjectStore) -> None:
        data = _payload(MULTIPART_SIZE, seed=1)
        info = store.put_stream("big/blob.bin", ChunkedStream(data))  # type: ignore[arg-type]
        assert info.size == len(data)
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        st = store.stat("big/blob.bin")
        assert st is not None and st.size == len(data) and st.sha256 == info.sha256
        with store.open_read("big/blob.bin") as reader:
            chunks = list(reader.iter_chunks(1024 * 1024))
        assert all(len(c) <= 1024 * 1024 for c in chunks)
        assert b"".join(chunks) == data

    def test_put_file_and_get_file_round_trip(self, store: ObjectStore, tmp_path: Path) -> None:
        src = tmp_path / "src.bin"
        src.write_bytes(_payload(MULTIPART_SIZE, seed=2))
        info = store.put_file("files/src.bin", src)
        assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
        dest = tmp_path / "deep" / "dir" / "copy.bin"
        got = store.get_file("files/src.bin", dest)
        assert dest.read_bytes() == src.read_bytes()
        assert got.sha256 == info.sha256 and got.size == src.stat().st_size
        assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.bin"]  # no temp file left

    def test_json_helpers_round_trip(self, store: ObjectStore) -> None:
        value = {"id": "ft-1", "state": "running", "steps": [1, 2, 3], "nested": {"ok": True}}
        store.put_json("finetunes/ft-1/record.json", value)
        assert store.get_json("finetunes/ft-1/record.json") == value
        st = store.stat("finetunes/ft-1/record.json")
        assert st is not None and st.content_type == "application/json"

    # ------------------------------------------------------------------ atomicity
    def test_failed_stream_leaves_no_object_and_keeps_previous_version(self, store: ObjectStore) -> None:
        store.put_bytes("ckpt/model.bin", b"previous")
        failing = ChunkedStream(_payload(MULTIPART_SIZE, seed=3), fail_after=MULTIPART_SIZE - 1000)
        with pytest.raises(ConnectionResetError):
            store.put_stream("ckpt/model.bin", failing)  # type: ignore[arg-type]
        assert store.get_bytes("ckpt/model.bin") == b"previous"
        with pytest.raises(ConnectionResetError):
            store.put_stream("ckpt/other.bin", ChunkedStream(b"x" * 100_000, fail_after=50_000))  # type: ignore[arg-type]
        assert store.stat("ckpt/other.bin") is None
        assert [o.key for o in store.list("")] == ["ckpt/model.bin"]  # no temp objects visible

    @pytest.mark.parametrize("actual_size", [10, MULTIPART_SIZE - 1, MULTIPART_SIZE + 1])
    def test_stream_not_matching_its_announced_length_writes_nothing(
        self, store: ObjectStore, actual_size: int
    ) -> None:
        data = _payload(actual_size, seed=4)
        with pytest.raises(IncompleteStream):
            store.put_stream("short.bin", ChunkedStream(data), length=MULTIPART_SIZE)  # type: ignore[arg-type]
        assert store.stat("short.bin") is None
        assert store.list("") == []

    # ------------------------------------------------------------------ checksums
    def test_get_file_detects_corruption_and_leaves_no_file(
        self, store: ObjectStore, corrupt: Corrupt, tmp_path: Path
    ) -> None:
        store.put_bytes("data/x.bin", b"A" * 1000)
        corrupt("data/x.bin", b"B" * 1000, True)
        dest = tmp_path / "dl" / "x.bin"
        with pytest.raises(ChecksumMismatch) as err:
            store.get_file("data/x.bin", dest)
        assert err.value.key == "data/x.bin"
        assert list(dest.parent.iterdir()) == []  # neither the file nor its temp file
        with pytest.raises(ChecksumMismatch):
            store.get_bytes("data/x.bin")

    def test_get_file_checks_expected_digest(self, store: ObjectStore, tmp_path: Path) -> None:
        store.put_bytes("data/y.bin", b"payload")
        dest = tmp_path / "y.bin"
        with pytest.raises(ChecksumMismatch):
            store.get_file("data/y.bin", dest, expected_sha256="0" * 64)
        assert not dest.exists()
        store.get_file("data/y.bin", dest, expected_sha256=hashlib.sha256(b"payload").hexdigest())
        assert dest.read_bytes() == b"payload"

    # ------------------------------------------------------------------ keys
    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_invalid_keys_are_refused_everywhere(self, store: ObjectStore, key: str, tmp_path: Path) -> None:
        with pytest.raises(InvalidKey):
            store.put_bytes(key, b"x")
        with pytest.raises(InvalidKey):
            store.stat(key)
        with pytest.raises(InvalidKey):
            store.get_file(key, tmp_path / "x")
        with pytest.raises(InvalidKey):
            store.delete(key)
        with pytest.raises(InvalidKey):
            store.presigned_get_url(key, timedelta(minutes=1))
        assert store.list("") == []

    def test_unicode_keys_work(self, store: ObjectStore) -> None:
        store.put_bytes("datasets/vidéo ø/clip 1.mp4", b"v")
        assert store.get_bytes("datasets/vidéo ø/clip 1.mp4") == b"v"
        assert [o.key for o in store.list("datasets/")] == ["datasets/vidéo ø/clip 1.mp4"]

    # ------------------------------------------------------------------ listing and deleting
    def test_list_is_prefix_based_sorted_and_non_recursive_on_request(self, store: ObjectStore) -> None:
        for key in ["a/1", "a/b/2", "a/b/c/3", "ab/4", "c"]:
            store.put_bytes(key, key.encode())
        assert [o.key for o in store.list("")] == ["a/1", "a/b/2", "a/b/c/3", "ab/4", "c"]
        assert [o.key for o in store.list("a/")] == ["a/1", "a/b/2", "a/b/c/3"]
        assert [o.key for o in store.list("a")] == ["a/1", "a/b/2", "a/b/c/3", "ab/4"]
        assert [o.key for o in store.list("a/", recursive=False)] == ["a/1"]
        assert [o.key for o in store.list("", recursive=False)] == ["c"]
        assert store.list("zzz/") == []
        assert store.list_dirs("") == ["a/", "ab/"]
        assert store.list_dirs("a/") == ["a/b/"]
        assert store.list_dirs("a/b/c/") == []
        sizes = {o.key: o.size for o in store.list("")}
        assert sizes["a/b/c/3"] == len(b"a/b/c/3")

    def test_delete_is_idempotent_and_delete_prefix_is_scoped(self, store: ObjectStore) -> None:
        for key in ["p/1", "p/q/2", "pp/3", "z"]:
            store.put_bytes(key, b"x")
        store.delete("z")
        store.delete("z")  # missing: not an error
        assert store.stat("z") is None
        assert store.delete_prefix("p/") == 2
        assert [o.key for o in store.list("")] == ["pp/3"]
        with pytest.raises(InvalidKey):
            store.delete_prefix("")
        assert store.list_dirs("") == ["pp/"]

    def test_upload_dir_and_download_prefix_round_trip(self, store: ObjectStore, tmp_path: Path) -> None:
        src = tmp_path / "src"
        (src / "sub" / "deeper").mkdir(parents=True)
        files = {"a.txt": b"a", "sub/b.bin": _payload(70_000, 5), "sub/deeper/c.json": b"{}"}
        for rel, data in files.items():
            (src / rel).write_bytes(data)
        infos = store.upload_dir(src, "models/m1")
        assert sorted(i.key for i in infos) == sorted(f"models/m1/{r}" for r in files)
        out = tmp_path / "out"
        store.download_prefix("models/m1/", out)
        got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert got == files

    # ------------------------------------------------------------------ presigned URLs
    def test_presigned_urls_name_the_key_and_bound_the_expiry(self, store: ObjectStore) -> None:
        store.put_bytes("share/me.txt", b"x")
        url = store.presigned_get_url("share/me.txt", timedelta(minutes=5))
        assert url.startswith("http") and "share/me.txt" in url
        assert store.presigned_put_url("share/new.txt", timedelta(minutes=5)).startswith("http")
        for bad in (timedelta(0), timedelta(seconds=-1), timedelta(days=8)):
            with pytest.raises(ValueError):
                store.presigned_get_url("share/me.txt", bad)

    def test_check_passes_on_a_working_store(self, store: ObjectStore) -> None:
        store.check()

    # ------------------------------------------------------------------ publication
    def test_publish_writes_manifest_last_and_fetch_verifies(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        src = tmp_path / "ckpt"
        (src / "adapter").mkdir(parents=True)
        (src / "adapter" / "adapter_config.json").write_text('{"r": 4}')
        (src / "adapter" / "adapter_model.safetensors").write_bytes(_payload(50_000, 6))
        rec = RecordingStore(store)
        manifest = publish_dir(rec, src, "checkpoints/ckpt-ft1-10", {"id": "ckpt-ft1-10"})  # type: ignore[arg-type]
        assert rec.writes[-1] == "checkpoints/ckpt-ft1-10/manifest.json"
        assert len(rec.writes) == 3
        assert manifest["id"] == "ckpt-ft1-10"
        entry = manifest["files"]["adapter/adapter_model.safetensors"]
        assert entry == {
            "sha256": hashlib.sha256(
                (src / "adapter" / "adapter_model.safetensors").read_bytes()
            ).hexdigest(),
            "size": 50_000,
        }
        assert is_published(store, "checkpoints/ckpt-ft1-10")
        out = tmp_path / "out"
        assert fetch_published(store, "checkpoints/ckpt-ft1-10/", out) == manifest
        assert (out / "adapter" / "adapter_config.json").read_text() == '{"r": 4}'
        assert not (out / "manifest.json").exists()

    def test_fetch_refuses_unpublished_prefix(self, store: ObjectStore, tmp_path: Path) -> None:
        store.put_bytes("checkpoints/half/adapter/adapter_model.safetensors", b"partial upload")
        assert not is_published(store, "checkpoints/half")
        with pytest.raises(NotPublished):
            fetch_published(store, "checkpoints/half", tmp_path / "out")
        assert not (tmp_path / "out").exists()

    def test_fetch_names_the_file_that_differs_from_the_manifest(
        self, store: ObjectStore, corrupt: Corrupt, tmp_path: Path
    ) -> None:
        src = tmp_path / "ds"
        src.mkdir()
        (src / "ok.txt").write_bytes(b"fine")
        (src / "bad.txt").write_bytes(b"original")
        publish_dir(store, src, "datasets/d1/v1")
        corrupt("datasets/d1/v1/bad.txt", b"tampered", False)  # consistent object, not the manifest's
        with pytest.raises(ChecksumMismatch, match=r"datasets/d1/v1/bad\.txt") as err:
            fetch_published(store, "datasets/d1/v1", tmp_path / "out")
        assert err.value.key == "datasets/d1/v1/bad.txt"
        assert not (tmp_path / "out" / "bad.txt").exists()

    def test_fetch_refuses_a_manifest_that_escapes_the_target(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        store.put_json("evil/manifest.json", {"files": {"../../escape.txt": {"sha256": "0" * 64, "size": 1}}})
        with pytest.raises(InvalidKey):
            fetch_published(store, "evil", tmp_path / "a" / "b")
        assert not (tmp_path / "escape.txt").exists()

    def test_publish_refuses_a_local_manifest_and_reserved_extra(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        (tmp_path / "manifest.json").write_text("{}")
        with pytest.raises(ValueError):
            publish_dir(store, tmp_path, "x")
        (tmp_path / "manifest.json").unlink()
        (tmp_path / "f").write_text("1")
        with pytest.raises(ValueError):
            publish_dir(store, tmp_path, "x", {"files": {}})
        assert store.list("") == []

    # ------------------------------------------------------------------ rollouts
    def test_rollout_revisions_increase_and_keep_history(self, store: ObjectStore) -> None:
        assert read_rollout(store, "default") is None
        r1 = RolloutRecord(deployment="default").next("set-current", current="ckpt-a-10")
        write_rollout(store, r1)
        r2 = r1.next("canary", current="ckpt-a-10", canary="ckpt-b-20", canary_percent=10)
        write_rollout(store, r2)
        got = read_rollout(store, "default")
        assert got is not None
        assert (got.revision, got.current, got.canary, got.canary_percent) == (
            2,
            "ckpt-a-10",
            "ckpt-b-20",
            10,
        )
        assert [e.action for e in got.history] == ["set-current", "canary"]
        assert store.get_json("rollouts/default.json")["revision"] == 2
        with pytest.raises(RevisionConflict):
            write_rollout(store, r1.next("promote", current="ckpt-b-20"))  # revision 2 again: stale writer
        stored = read_rollout(store, "default")
        assert stored is not None and stored.canary == "ckpt-b-20"

    def test_rollout_writers_racing_from_the_same_revision_exactly_one_wins(self, store: ObjectStore) -> None:
        # Three control-plane replicas read revision 1, then each writes its own revision 2.
        base = RolloutRecord(deployment="race").next("set-current", current="ckpt-a-1")
        write_rollout(store, base)
        writers = [base.next("set-current", current=f"ckpt-w{i}-2") for i in range(3)]
        outcomes = race_rollout_writes(store, writers)
        assert outcomes == ["ok", "conflict", "conflict"], outcomes  # the first writer wins
        stored = read_rollout(store, "race")
        assert stored is not None and stored == writers[0], stored  # the winner's record, whole
        assert [e.current for e in stored.history] == ["ckpt-a-1", "ckpt-w0-2"]

    def test_first_rollout_writers_racing_on_a_missing_record_exactly_one_wins(
        self, store: ObjectStore
    ) -> None:
        fresh = RolloutRecord(deployment="fresh")
        writers = [fresh.next("set-current", current=f"ckpt-w{i}-1") for i in range(2)]
        outcomes = race_rollout_writes(store, writers)
        assert outcomes == ["ok", "conflict"], outcomes
        stored = read_rollout(store, "fresh")
        assert stored == writers[0], stored

    # ------------------------------------------------------------------ conditional writes
    def test_if_match_with_the_current_etag_writes(self, store: ObjectStore) -> None:
        first = store.put_bytes("rec/a.json", b"v1")
        data, etag = store.get_bytes_with_etag("rec/a.json")
        assert data == b"v1" and etag is not None and etag == first.etag
        second = store.put_bytes("rec/a.json", b"v2", content_type="application/json", if_match=etag)
        assert store.get_bytes("rec/a.json") == b"v2"
        assert second.etag is not None and second.etag != etag
        assert second.sha256 == hashlib.sha256(b"v2").hexdigest()
        st = store.stat("rec/a.json")
        assert st is not None and (st.etag, st.sha256, st.content_type) == (
            second.etag,
            second.sha256,
            "application/json",
        )
        store.put_bytes("rec/a.json", b"v3", if_match=second.etag)  # the returned etag chains
        assert store.get_bytes("rec/a.json") == b"v3"

    def test_if_match_with_a_stale_etag_is_refused_and_changes_nothing(self, store: ObjectStore) -> None:
        store.put_bytes("rec/b.json", b"old", metadata={"who": "first"})
        _, stale = store.get_bytes_with_etag("rec/b.json")
        assert stale is not None
        store.put_bytes("rec/b.json", b"newer", metadata={"who": "second"})  # someone else wrote
        with pytest.raises(PreconditionFailed) as err:
            store.put_bytes("rec/b.json", b"lost update", if_match=stale)
        assert err.value.key == "rec/b.json"
        assert store.get_bytes("rec/b.json") == b"newer"
        st = store.stat("rec/b.json")
        assert st is not None and st.sha256 == hashlib.sha256(b"newer").hexdigest()
        assert st.metadata == {"who": "second"}

    def test_if_match_on_a_missing_key_is_refused(self, store: ObjectStore) -> None:
        store.put_bytes("rec/c.json", b"x")
        _, etag = store.get_bytes_with_etag("rec/c.json")
        assert etag is not None
        store.delete("rec/c.json")
        with pytest.raises(PreconditionFailed):
            store.put_bytes("rec/c.json", b"resurrected", if_match=etag)
        assert store.stat("rec/c.json") is None

    def test_if_none_match_writes_a_missing_key_and_refuses_an_existing_one(self, store: ObjectStore) -> None:
        info = store.put_json("rec/d.json", {"n": 1}, if_none_match=True)
        assert store.get_json_with_etag("rec/d.json") == ({"n": 1}, info.etag)
        with pytest.raises(PreconditionFailed):
            store.put_json("rec/d.json", {"n": 2}, if_none_match=True)
        assert store.get_json("rec/d.json") == {"n": 1}
        with pytest.raises(PreconditionFailed):
            store.put_bytes("rec/d.json", b"same", if_none_match=True)
        assert store.get_json("rec/d.json") == {"n": 1}

    def test_conditions_must_make_sense(self, store: ObjectStore) -> None:
        with pytest.raises(ValueError):
            store.put_bytes("rec/e.json", b"x", if_match="")
        with pytest.raises(ValueError):
            store.put_bytes("rec/e.json", b"x", if_match="abc", if_none_match=True)
        assert store.stat("rec/e.json") is None
        with pytest.raises(ObjectNotFound):
            store.get_bytes_with_etag("rec/e.json")
