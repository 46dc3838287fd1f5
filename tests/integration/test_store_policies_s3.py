"""Least-privilege store access on a real S3 server (Ceph radosgw: real users, real bucket policies).

One radosgw user per component (``huvidpo-controlplane``, ``huvidpo-trainer``, ``huvidpo-inference``),
the generated bucket policy (``services.common.store.policies.bucket_policy``) on a fresh bucket, and
each component's own store built by ``make_store`` from its own key. The loop runs through the
services' code: the control plane's REST app commits a dataset and creates a fine-tune, the trainer
entrypoint trains it and publishes a checkpoint, the control plane rolls it out, inference follows
the rollout, fetches the model and the checkpoint and writes a generation behind a presigned URL.
Then every component is refused a write outside its prefixes, with a ``StoreAccessDenied`` that
names what was refused and where the policy lives, and never a key.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient

from services.common.publish import publish_dir, read_rollout
from services.common.records import keys
from services.common.records.exit_codes import ExitCode
from services.common.settings import ControlPlaneSettings, InferenceSettings, StoreSettings, TrainerSettings
from services.common.store import ObjectStore, StoreAccessDenied, make_store
from services.common.store.policies import COMPONENTS, user_name
from services.common.store.s3 import MinioStore
from services.controlplane.app import create_app
from tests.doubles import IdleExecutor

MakeStore = Callable[..., MinioStore]
REPO = Path(__file__).resolve().parents[2]


def _secret(component: str) -> str:
    return f"{component}-test-secret-0123456789"


def _access(component: str) -> str:
    return f"HUVIDPO{component.upper()}TEST"


def _ensure_user(cluster_dir: str, component: str) -> None:
    """The radosgw user of ``component`` with its test key (kept for the session's other tests)."""
    admin = ["radosgw-admin", "-c", f"{cluster_dir}/ceph.conf", "-n", "client.rgw.a"]
    uid = user_name(component)
    if (
        subprocess.run([*admin, "user", "info", f"--uid={uid}"], capture_output=True, timeout=60).returncode
        == 0
    ):
        return
    subprocess.run(
        [*admin, "user", "create", f"--uid={uid}", f"--display-name={uid}",
         f"--access-key={_access(component)}", f"--secret-key={_secret(component)}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


@pytest.fixture
def stores(s3_endpoint: dict[str, str], make_s3_store: MakeStore) -> Iterator[dict[str, Any]]:
    """The root store (the bucket's owner: the bucket-init Job's role) and one store per component."""
    root = make_s3_store(s3_endpoint)
    root.check()  # creates the bucket
    # The committed, generated bucket policy (a unit test keeps it equal to bucket_policy()), for this bucket.
    policy = (REPO / "deploy/base/store-policies/bucket-policy.json").read_text()
    root.client.set_bucket_policy(
        root.bucket, policy.replace("arn:aws:s3:::huvidpo", f"arn:aws:s3:::{root.bucket}")
    )
    out: dict[str, Any] = {"root": root, "bucket": root.bucket}
    for component in COMPONENTS:
        _ensure_user(s3_endpoint["cluster_dir"], component)
        settings = StoreSettings(
            backend="s3",
            endpoint=s3_endpoint["endpoint"],
            access_key=_access(component),
            secret_key=_secret(component),
            bucket=root.bucket,
            region=s3_endpoint["region"],
            part_size=5 * 1024 * 1024,
        )  # create_bucket stays on: a user that may not look at the bucket must still work
        out[component] = make_store(settings)
    yield out


def _refused(fn: Callable[[], Any], *, op: str, key: str) -> str:
    with pytest.raises(StoreAccessDenied) as info:
        fn()
    msg = str(info.value)
    assert f"{op} {key!r}" in msg and "AccessDenied" in msg and "Store access per component" in msg, msg
    for component in COMPONENTS:
        assert _access(component) not in msg and _secret(component) not in msg
    return msg


def test_each_component_does_its_work_and_nothing_outside_its_prefixes(
    stores: dict[str, Any], tmp_path: Path, tiny_model_dir: Path
) -> None:
    from huvidpo.data import make_synthetic_dataset

    root: MinioStore = stores["root"]
    cp: ObjectStore = stores["controlplane"]
    trainer: ObjectStore = stores["trainer"]
    inference: ObjectStore = stores["inference"]
    publish_dir(root, tiny_model_dir, "models/tiny/", {"id": "tiny"})  # an operator's seeding

    # --- control plane: readiness, a dataset version (streamed staging, commit), a fine-tune
    app = create_app(
        ControlPlaneSettings(work_dir=tmp_path / "work", dev_mode=True), cp, IdleExecutor(), background=False
    )
    client = TestClient(app)
    assert client.get("/readyz").status_code == 200, client.get("/readyz").text
    ds = make_synthetic_dataset(tmp_path / "ds", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    assert client.post("/v1/datasets", json={"name": "cats"}).status_code == 201
    files = [
        ("files", (p.relative_to(ds).as_posix(), p.read_bytes(), "video/mp4"))
        for p in sorted(ds.rglob("*"))
        if p.is_file()
    ]
    r = client.post("/v1/datasets/cats/versions", files=files)
    assert r.status_code == 201, r.text
    version = r.json()["id"]
    hp = {"max_steps": 1, "num_frames": 4, "height": 32, "width": 32, "plot": False}
    r = client.post(
        "/v1/fine-tunes",
        json={"dataset": "cats", "version": version, "base_model": "tiny", "hyperparameters": hp},
    )
    assert r.status_code == 201, r.text
    ft = r.json()["id"]
    r = client.post("/v1/fine-tunes", json={"dataset": "cats", "version": version, "base_model": "nope"})
    assert r.status_code in (404, 422), r.text  # a missing model reads as missing, not as refused

    # Deletes: a dataset nothing references (a listing, then a multi-object delete).
    assert client.post("/v1/datasets", json={"name": "dogs"}).status_code == 201
    assert client.post("/v1/datasets/dogs/versions", files=files).status_code == 201
    assert client.delete("/v1/datasets/dogs").status_code == 204
    assert not root.list("datasets/dogs/")

    # --- trainer: reads its spec, the version and the model; writes progress and a checkpoint
    code = trainer_run(trainer, ft, tmp_path)
    assert code == ExitCode.OK, trainer.get_bytes(keys.progress_key(ft)).decode()
    cid = keys.checkpoint_id(ft, 1)
    assert trainer.exists(keys.checkpoint_manifest_key(cid))

    # --- control plane: sees the progress and the checkpoint, signs its download, rolls it out
    view = client.get(f"/v1/fine-tunes/{ft}").json()
    assert view["checkpoints"] == [cid] and view["progress"]["step"] == 1, view
    ck = client.get(f"/v1/checkpoints/{cid}/download")
    assert ck.status_code == 200, ck.text
    manifest_url = ck.json()["urls"]["manifest.json"]  # signed with the control plane's key
    assert httpx.get(manifest_url, timeout=20).json()["id"] == cid
    r = client.put("/v1/rollouts/default?create=true", json={"checkpoint": cid})
    assert r.status_code == 200, r.text

    # --- inference: the real server on inference's key follows the rollout, loads the base model and
    # the checkpoint, and puts a video over the inline limit behind a URL signed with its key
    from services.inference.gen import inference_pb2 as pb
    from services.inference.testing import ServerThread, image_bytes

    assert read_rollout(inference, "absent") is None  # missing, not refused
    assert inference.stat(keys.generation_key("default", "none", "mp4")) is None
    settings = InferenceSettings(
        port=0, metrics_port=0, base_model="models/tiny", cache_dir=tmp_path / "cache", inline_limit_bytes=100,
        default_frames=4, default_height=64, default_width=64, default_steps=2, dev_mode=True,
    )  # fmt: skip
    req = pb.GenerateRequest(prompt="a red ball", first_frame_image=image_bytes(seed=1), seed=11, steps=2)
    with ServerThread(settings, inference, bucket=stores["bucket"]).start() as srv, srv.channel() as channel:
        events = list(srv.stub(channel).Generate(req, timeout=120))
        # A first frame from a prefix inference may not read (datasets/) is refused by the store.
        frame_key = keys.dataset_version_prefix("cats", version) + "manifest.json"
        probe = pb.GenerateRequest(
            prompt="x", first_frame_uri=f"s3://{stores['bucket']}/{frame_key}", steps=2
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(srv.stub(channel).Generate(probe, timeout=60))
        details = refused.value.details() or ""
        assert _secret("inference") not in details and _access("inference") not in details
    result = events[-1].result
    assert result.checkpoint_id == cid and result.download_url, result
    video = httpx.get(result.download_url, timeout=20)
    assert video.status_code == 200 and len(video.content) == result.size_bytes
    assert inference.exists(keys.generation_key("default", result.request_id, "mp4"))

    # --- and nothing else
    manifest = keys.checkpoint_manifest_key(keys.checkpoint_id(ft, 99))
    _refused(lambda: cp.put_json(manifest, {"files": {}}), op="write", key=manifest)
    # The control plane registers base models (POST /v1/models), so models/ is its to read and write;
    # generated videos are inference's alone.
    assert cp.get_bytes("models/tiny/model_index.json")
    gen = keys.generation_key("default", result.request_id, "mp4")
    _refused(lambda: cp.get_bytes(gen), op="read", key=gen)
    _refused(lambda: cp.put_bytes(gen, b"x"), op="write", key=gen)

    status = keys.finetune_status_key(ft)
    _refused(lambda: trainer.put_json(status, {"state": "succeeded"}), op="write", key=status)
    spec = keys.finetune_spec_key(ft)
    _refused(lambda: trainer.put_json(spec, {}), op="write", key=spec)
    evil = keys.dataset_version_prefix("cats", version) + "manifest.json"
    _refused(lambda: trainer.put_json(evil, {}), op="write", key=evil)
    _refused(lambda: trainer.put_bytes("models/tiny/x", b"x"), op="write", key="models/tiny/x")
    rollout = keys.rollout_key("default")
    _refused(lambda: trainer.put_json(rollout, {}), op="write", key=rollout)
    _refused(lambda: trainer.delete(evil), op="delete", key=evil)
    with pytest.raises(StoreAccessDenied):
        trainer.delete_prefix("datasets/cats/")

    _refused(lambda: inference.put_json(rollout, {}), op="write", key=rollout)
    _refused(lambda: inference.put_bytes(manifest, b"x"), op="write", key=manifest)
    _refused(lambda: inference.get_bytes(evil), op="read", key=evil)  # datasets are not its to read
    _refused(
        lambda: inference.delete(keys.checkpoint_manifest_key(cid)),
        op="delete",
        key=keys.checkpoint_manifest_key(cid),
    )
    with pytest.raises(StoreAccessDenied):
        inference.list(keys.DATASETS)

    # The refusals changed nothing. (Read with the components' keys: on radosgw an object belongs to
    # the user that wrote it, and the bucket owner reads another user's objects only if a policy says so.)
    assert cp.get_json(keys.checkpoint_manifest_key(cid))["id"] == cid
    assert not cp.exists(manifest) and not trainer.exists("models/tiny/evil.bin")
    assert cp.get_json(rollout)["current"] == cid
    assert trainer.get_json(evil)["id"] == version


def trainer_run(store: ObjectStore, finetune_id: str, tmp_path: Path) -> int:
    from services.trainer.entry import run

    return run(
        store, TrainerSettings(finetune_id=finetune_id, work_dir=tmp_path / "trainer", checkpoint_every=1)
    )


def test_a_bad_key_is_told_apart_from_a_refused_one(
    s3_endpoint: dict[str, str], stores: dict[str, Any]
) -> None:
    """A HEAD's 403 has no body: the store lists to tell a wrong secret from a policy refusal."""
    wrong = MinioStore(
        s3_endpoint["endpoint"],
        _access("inference"),
        "not-the-secret",
        bucket=stores["bucket"],
        region="us-east-1",
    )
    for call in (lambda: wrong.stat("models/tiny/model_index.json"), wrong.check):
        with pytest.raises(StoreAccessDenied) as info:
            call()
        msg = str(info.value)
        assert "SignatureDoesNotMatch" in msg and "HUVIDPO_STORE_SECRET_KEY" in msg and "policy" not in msg, (
            msg
        )
        assert "not-the-secret" not in msg
    stores["inference"].check()  # the right key: ready, though it may not look at the bucket itself
