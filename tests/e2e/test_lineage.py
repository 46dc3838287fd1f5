"""The lineage walk on the tiny model: dataset version -> fine-tune -> checkpoint (both of its
manifests) -> rollout -> generation is one chain of equal dataset and base model digests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from demo.loop import LoopOptions, run_loop
from huvidpo.client._grpc import channel, stub
from services.common.publish import read_manifest
from services.common.records import keys
from services.common.records.lineage import CheckpointManifest, DatasetVersionManifest, content_digest
from services.inference.gen import inference_pb2 as pb
from tests.e2e.test_loop import OPTS

pytestmark = pytest.mark.slow


def test_dataset_and_base_model_digests_are_equal_at_every_link_of_the_walk(
    make_stack: Any, tmp_path: Path
) -> None:
    running = make_stack()
    store = running.store
    opts = LoopOptions(**{**OPTS, "train_steps": 2, "checkpoint_every": 2})  # type: ignore[arg-type]
    summary = run_loop(running.cp, store, tmp_path / "work", tmp_path / "out", opts)

    # dataset version: its id is the one digest of its file listing
    version = DatasetVersionManifest.model_validate(
        read_manifest(store, keys.dataset_version_prefix(opts.dataset, summary["dataset"]["version_digest"]))
    )
    dataset_digest = version.id
    assert version.content_digest() == dataset_digest
    # base model: the digest its publisher recorded (hashed on disk) is the one digest of its listing
    model_manifest = read_manifest(store, keys.model_prefix("tiny"))
    base_model_digest = content_digest(model_manifest["files"])
    assert running.model_digest == model_manifest["digest"] == base_model_digest

    # fine-tune (REST)
    ft = running.cp.fine_tunes.get(summary["finetune"]["id"])
    assert ft["lineage"]["dataset_digest"] == dataset_digest
    assert ft["lineage"]["base_model_digest"] == base_model_digest

    # checkpoint: its one manifest, the publication's (REST and store); no second one under state/
    ckpt_id = summary["checkpoint"]["id"]
    published = CheckpointManifest.model_validate(store.get_json(keys.checkpoint_manifest_key(ckpt_id)))
    assert not store.exists(keys.checkpoint_prefix(ckpt_id) + "state/manifest.json")
    rest = running.cp.checkpoints.get(ckpt_id)
    for lineage in (published.lineage.model_dump(), rest["lineage"]):
        assert lineage["dataset_digest"] == dataset_digest
        assert lineage["base_model_digest"] == base_model_digest
    assert published.lineage.finetune_id == ft["id"]

    # rollout and generation: the service generated with the rolled-out checkpoint, on the same base
    assert store.get_json(keys.rollout_key(opts.deployment))["current"] == ckpt_id
    assert summary["generation"]["checkpoint_id"] == ckpt_id
    with channel(running.stack.grpc_address, running.stack.token) as ch:
        s = stub(ch)
        served = s.GetModel(pb.GetModelRequest(id=summary["generation"]["checkpoint_id"]), timeout=30)
        models = {m.id: m for m in s.ListModels(pb.ListModelsRequest(), timeout=30).models}
    assert served.model.lineage.dataset_digest == dataset_digest
    assert served.model.lineage.base_model_digest == base_model_digest
    assert served.model.lineage.finetune_id == ft["id"]
    assert models[ckpt_id].lineage.base_model_digest == base_model_digest
    assert models["base"].digest == base_model_digest
