"""LocalStore: the shared ObjectStore contract plus what is specific to the local adapter."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from pydantic import SecretStr

from services.common.auth import load_table
from services.common.publish import RolloutRecord, read_rollout, write_rollout
from services.common.settings import ControlPlaneSettings, InferenceSettings, StoreSettings
from services.common.store import (
    InvalidKey,
    LocalStore,
    ObjectStore,
    PreconditionFailed,
    PresignedUrlInvalid,
    make_store,
    validate_key,
    validate_prefix,
)
from services.common.store.s3 import MinioStore
from tests.store_contract import StoreContract, race_rollout_writes


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "root", public_base_url="http://cp.test:8080/", presign_secret="s3cret")


class TestLocalStoreContract(StoreContract):
    @pytest.fixture
    def store(self, local_store: LocalStore) -> ObjectStore:
        return local_store

    @pytest.fixture
    def corrupt(self, local_store: LocalStore):  # type: ignore[no-untyped-def]
        def corrupt(key: str, data: bytes, keep_digest: bool) -> None:
            if keep_digest:  # bytes changed in place: same inode, old digest in the sidecar
                with open(local_store.root / key, "r+b") as fh:
                    fh.truncate(0)
                    fh.write(data)
            else:
                local_store.put_bytes(key, data)

        return corrupt


# ----------------------------------------------------------------------------------- presigned URLs
def _parts(url: str) -> tuple[str, str, str]:
    parsed = urlparse(url)
    q = parse_qs(parsed.query)
    return unquote(parsed.path.removeprefix("/v1/objects/")), q["expires"][0], q["signature"][0]


def test_presigned_url_points_at_the_control_plane_and_verifies(local_store: LocalStore) -> None:
    url = local_store.presigned_get_url("checkpoints/c 1/adapter.bin", timedelta(minutes=5))
    assert url.startswith("http://cp.test:8080/v1/objects/checkpoints/c%201/adapter.bin?")
    key, expires, sig = _parts(url)
    assert key == "checkpoints/c 1/adapter.bin"
    assert abs(int(expires) - (time.time() + 300)) < 5
    local_store.verify_presigned(key, expires, sig, method="GET")


def test_presigned_url_is_refused_when_tampered_expired_or_used_for_another_method(
    local_store: LocalStore,
) -> None:
    key, expires, sig = _parts(local_store.presigned_get_url("a/b", timedelta(seconds=60)))
    with pytest.raises(PresignedUrlInvalid, match="signature"):
        local_store.verify_presigned("a/c", expires, sig)
    with pytest.raises(PresignedUrlInvalid, match="signature"):
        local_store.verify_presigned(key, str(int(expires) + 3600), sig)  # extended expiry
    with pytest.raises(PresignedUrlInvalid, match="signature"):
        local_store.verify_presigned(key, expires, sig[:-1] + ("0" if sig[-1] != "0" else "1"))
    with pytest.raises(PresignedUrlInvalid, match="signature"):
        local_store.verify_presigned(key, expires, sig, method="PUT")
    with pytest.raises(PresignedUrlInvalid, match="expired"):
        local_store.verify_presigned(key, expires, sig, now=int(expires) + 1)
    with pytest.raises(PresignedUrlInvalid, match="integer"):
        local_store.verify_presigned(key, "soon", sig)
    with pytest.raises(InvalidKey):
        local_store.verify_presigned("../etc/passwd", expires, sig)
    put_key, put_exp, put_sig = _parts(local_store.presigned_put_url("a/b", timedelta(seconds=60)))
    local_store.verify_presigned(put_key, put_exp, put_sig, method="PUT")
    with pytest.raises(PresignedUrlInvalid):
        local_store.verify_presigned(put_key, put_exp, put_sig, method="GET")


def test_presign_key_is_generated_once_and_shared_by_stores_on_the_same_root(tmp_path: Path) -> None:
    a = LocalStore(tmp_path / "r")
    b = LocalStore(tmp_path / "r")
    other = LocalStore(tmp_path / "other")
    key, expires, sig = _parts(a.presigned_get_url("x/y", timedelta(minutes=1)))
    b.verify_presigned(key, expires, sig)
    with pytest.raises(PresignedUrlInvalid):
        other.verify_presigned(key, expires, sig)
    key_file = tmp_path / "r" / ".huvidpo-presign.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert len(key_file.read_bytes()) == 64


# --------------------------------------------------------------------------------- local specifics
def test_objects_are_plain_files_and_bookkeeping_stays_hidden(local_store: LocalStore) -> None:
    local_store.put_bytes("models/m/config.json", b"{}")
    assert (local_store.root / "models" / "m" / "config.json").read_bytes() == b"{}"
    assert [o.key for o in local_store.list("")] == ["models/m/config.json"]
    assert local_store.list_dirs("") == ["models/"]


def test_stale_sidecar_after_a_crash_between_renames_is_ignored(local_store: LocalStore) -> None:
    local_store.put_bytes("k", b"v1")
    # what a crash leaves: the new data renamed into place, the sidecar still describing v1
    tmp = local_store.root / "k.new"
    tmp.write_bytes(b"v2-longer")
    os.replace(tmp, local_store.root / "k")
    st = local_store.stat("k")
    assert st is not None and st.sha256 is None and st.size == len(b"v2-longer")
    assert local_store.get_bytes("k") == b"v2-longer"


def test_key_that_is_both_object_and_prefix_is_refused(local_store: LocalStore) -> None:
    local_store.put_bytes("a", b"1")
    with pytest.raises(InvalidKey, match="conflicts"):
        local_store.put_bytes("a/b", b"2")
    local_store.put_bytes("d/e", b"3")
    with pytest.raises(InvalidKey, match="conflicts"):
        local_store.put_bytes("d", b"4")
    assert [o.key for o in local_store.list("")] == ["a", "d/e"]
    assert list((local_store.root / ".huvidpo-tmp").iterdir()) == []


def test_delete_prunes_empty_directories(local_store: LocalStore) -> None:
    local_store.put_bytes("x/y/z/w", b"1")
    local_store.delete("x/y/z/w")
    assert not (local_store.root / "x").exists()


def test_concurrent_reader_sees_whole_versions_only(local_store: LocalStore) -> None:
    versions = [b"A" * 300_000, b"B" * 200_000, b"C" * 400_000]
    local_store.put_bytes("hot", versions[0])
    seen: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append(local_store.get_bytes("hot"))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(60):
            local_store.put_bytes("hot", versions[i % 3])
    finally:
        stop.set()
        t.join()
    assert seen and all(v in versions for v in seen)


def test_metadata_names_and_values_are_checked(local_store: LocalStore) -> None:
    for bad in ({"bad name": "x"}, {"ok": "caf\u00e9"}, {"sha256": "0" * 64}, {"ok": "a\nb"}):
        with pytest.raises(ValueError):
            local_store.put_bytes("m", b"x", metadata=bad)
    assert local_store.stat("m") is None


def test_write_rollout_serializes_concurrent_writers_on_a_local_store(local_store: LocalStore) -> None:
    base = RolloutRecord(deployment="edge").next("set-current", current="ckpt-x-1")
    write_rollout(local_store, base)
    results: list[str] = []

    def writer(n: int) -> None:
        try:
            write_rollout(local_store, base.next("promote", current=f"ckpt-y-{n}"))
            results.append("ok")
        except Exception as exc:
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["RevisionConflict"] * 5 + ["ok"]


def test_rollout_record_validation() -> None:
    with pytest.raises(ValueError):
        RolloutRecord(deployment="Bad/Name")
    with pytest.raises(ValueError):
        RolloutRecord(deployment="d", canary_percent=5)
    with pytest.raises(ValueError):
        RolloutRecord(deployment="d", canary="c", canary_percent=101)
    r = RolloutRecord(deployment="d")
    for i in range(205):
        r = r.next("promote", current=f"ckpt-f-{i}")
    assert r.revision == 205 and len(r.history) == 200 and r.history[-1].current == "ckpt-f-204"


# ------------------------------------------------------------------------------ keys and settings
@pytest.mark.parametrize("prefix", ["", "a", "a/", "a/b/", "datasets/d1/v"])
def test_valid_prefixes(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "/a", "a//", "../", "a/../", "\x01"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(InvalidKey):
        validate_prefix(prefix)


def test_key_error_message_says_what_is_wrong() -> None:
    with pytest.raises(InvalidKey, match=r"'\.\.'"):
        validate_key("a/../b")
    with pytest.raises(InvalidKey, match="control"):
        validate_key("a\tb")


def test_settings_come_from_the_environment_and_hide_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = hashlib.sha256(b"token").hexdigest()
    monkeypatch.setenv("HUVIDPO_STORE_BACKEND", "s3")
    monkeypatch.setenv("HUVIDPO_STORE_ENDPOINT", "s3.test:9000")
    monkeypatch.setenv("HUVIDPO_STORE_SECRET_KEY", "very-secret")
    monkeypatch.setenv("HUVIDPO_STORE_SECURE", "true")
    monkeypatch.setenv("HUVIDPO_CONTROLPLANE_TOKENS", f" {digest.upper()} ,{'b' * 64}")
    monkeypatch.setenv("HUVIDPO_INFERENCE_PORT", "6000")
    store = StoreSettings()
    assert (store.backend, store.endpoint, store.secure, store.bucket) == (
        "s3",
        "s3.test:9000",
        True,
        "huvidpo",
    )
    assert isinstance(store.secret_key, SecretStr) and "very-secret" not in repr(store)
    table = load_table(ControlPlaneSettings().auth_config(), "0.0.0.0", "test")
    assert [(e.name, e.digest, sorted(e.scopes)) for e in table.entries] == [
        (f"token-{digest[:8]}", digest, ["admin"]),
        ("token-bbbbbbbb", "b" * 64, ["admin"]),
    ]
    assert InferenceSettings().port == 6000
    monkeypatch.setenv("HUVIDPO_CONTROLPLANE_TOKENS", "not-a-digest")
    with pytest.raises(ValueError, match="sha256"):
        ControlPlaneSettings()


def test_make_store_builds_the_configured_adapter_without_network(tmp_path: Path) -> None:
    local = make_store(StoreSettings(backend="local", root=tmp_path / "r"))
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "r").resolve()
    s3 = make_store(
        StoreSettings(
            backend="s3", endpoint="http://127.0.0.1:1", access_key=SecretStr("a"), secret_key=SecretStr("b")
        )
    )
    assert isinstance(s3, MinioStore) and s3.endpoint == "127.0.0.1:1" and s3.bucket == "huvidpo"


def test_concurrent_writers_of_one_key_leave_a_digest_that_matches_the_bytes(local_store: LocalStore) -> None:
    """Many threads rewrite the same key (the control plane's watch thread and request threads do
    this with fine-tune records). Whoever wins, the stored digest is the digest of the stored bytes:
    a read never fails its checksum, and every put reports the digest of what it wrote."""
    key = "finetunes/ft-1/record.json"
    errors: list[BaseException] = []
    reported: list[tuple[str, str | None]] = []

    def writer(i: int) -> None:
        try:
            for j in range(40):
                body = f'{{"writer": {i}, "n": {j}}}'.encode() * (1 + (i + j) % 7)
                info = local_store.put_bytes(key, body)
                reported.append((hashlib.sha256(body).hexdigest(), info.sha256))
                got = local_store.get_bytes(key)  # verifies the digest; raises on a mismatch
                assert local_store.stat(key) is not None
                assert got.startswith(b'{"writer": ')
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert all(expected == got for expected, got in reported)
    final = local_store.get_bytes(key)
    info = local_store.stat(key)
    assert info is not None and info.sha256 == hashlib.sha256(final).hexdigest()


# ------------------------------------------------------------------------------- conditional writes
def test_etag_changes_on_every_write_even_with_the_same_bytes(local_store: LocalStore) -> None:
    first = local_store.put_bytes("rec/x.json", b"same")
    second = local_store.put_bytes("rec/x.json", b"same")
    assert first.etag and second.etag and first.etag != second.etag
    assert local_store.get_bytes_with_etag("rec/x.json") == (b"same", second.etag)
    with pytest.raises(PreconditionFailed):  # an identical rewrite still counts as a change
        local_store.put_bytes("rec/x.json", b"mine", if_match=first.etag)
    assert local_store.get_bytes("rec/x.json") == b"same"


def test_conditional_writes_work_on_files_without_an_etag_in_their_sidecar(local_store: LocalStore) -> None:
    # A sidecar written before etags existed: the digest stands in for the etag.
    local_store.put_bytes("rec/legacy.json", b"v1")
    meta_path = local_store.sidecar_path("rec/legacy.json")
    meta = json.loads(meta_path.read_text())
    del meta["etag"]
    meta_path.write_text(json.dumps(meta))
    data, etag = local_store.get_bytes_with_etag("rec/legacy.json")
    assert (data, etag) == (b"v1", hashlib.sha256(b"v1").hexdigest())
    local_store.put_bytes("rec/legacy.json", b"v2", if_match=etag)
    assert local_store.get_bytes("rec/legacy.json") == b"v2"
    # No sidecar at all (a crash between the renames): a tag from the file's inode, mtime and size.
    meta_path.unlink()
    _, etag = local_store.get_bytes_with_etag("rec/legacy.json")
    assert etag is not None and etag.startswith("st-")
    assert local_store.get_bytes_with_etag("rec/legacy.json")[1] == etag  # stable while unchanged
    local_store.put_bytes("rec/legacy.json", b"v3", if_match=etag)
    with pytest.raises(PreconditionFailed):
        local_store.put_bytes("rec/legacy.json", b"v4", if_match=etag)
    assert local_store.get_bytes("rec/legacy.json") == b"v3"


def test_rollout_writers_in_separate_store_instances_race_with_one_winner(tmp_path: Path) -> None:
    # Two LocalStores on one root stand for two processes: the per-key flock is per open file, so
    # it orders them as it orders processes. Writers run at once after a common read.
    stores: list[ObjectStore] = [LocalStore(tmp_path / "shared") for _ in range(4)]
    base = RolloutRecord(deployment="edge").next("set-current", current="ckpt-a-1")
    write_rollout(stores[0], base)
    for rnd in range(5):
        records = [base.next("promote", current=f"ckpt-r{rnd}w{i}-2") for i in range(len(stores))]
        outcomes = race_rollout_writes(stores, records, ordered=False)
        assert sorted(outcomes) == ["conflict"] * (len(stores) - 1) + ["ok"], (rnd, outcomes)
        stored = read_rollout(stores[1], "edge")
        assert stored == records[outcomes.index("ok")]
        base = stored
