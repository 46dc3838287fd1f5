"""One checkpoint layout: the trainer publishes the training library's checkpoint directory as it
lies (``adapter/``, ``state/``; the publication manifest in place of the library's, last), and a
resume downloads it as it lies into the library's checkpoint directory: no re-layout either way."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from huvidpo.training.checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint
from services.common.publish import publish_dir
from services.common.records import keys
from services.common.records.lineage import CheckpointManifest, Lineage
from services.common.store import LocalStore
from services.inference.fetch import fetch_checkpoint
from services.trainer.entry import ProgressWriter, StoreCallback, restore_checkpoint

FT = "ft-layout"


def _library_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint as ``huvidpo.training`` writes it for a DPO run (LoRA adapter + state)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()

    def weights(d: Path) -> None:
        (d / "adapter").mkdir()
        (d / "adapter" / "adapter_config.json").write_text('{"r": 4}')
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(d / "adapter" / "adapter_model.safetensors"),
        )

    state = {"step": step, "scheduler": {"last_epoch": step}, "config": {}}
    return write_checkpoint(root, step, weights, opt, state, {"stage": "dpo"})


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_published_checkpoint_is_the_library_directory_and_resumes_as_downloaded(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    local = _library_checkpoint(tmp_path / "run" / "checkpoints", 3)
    lineage = Lineage(dataset="cats", dataset_digest="d" * 64, base_model_digest="b" * 64, finetune_id=FT)
    StoreCallback(store, ProgressWriter(store, FT), FT, lineage, 3).on_checkpoint(local, 3)

    cid = keys.checkpoint_id(FT, 3)
    prefix = keys.checkpoint_prefix(cid)
    mine = _files(local)
    published = {o.key.removeprefix(prefix): store.get_bytes(o.key) for o in store.list(prefix)}
    # Byte for byte the library's directory; only manifest.json is the publication's (one manifest).
    assert {k: v for k, v in published.items() if k != "manifest.json"} == {
        k: v for k, v in mine.items() if k != "manifest.json"
    }
    assert {k.split("/")[0] for k in published} == {"adapter", "state", "manifest.json"}
    CheckpointManifest.model_validate(json.loads(mine["manifest.json"]))  # one manifest type, both sides
    manifest = CheckpointManifest.model_validate(json.loads(published["manifest.json"]))
    assert manifest.id == cid and manifest.step == 3 and manifest.lineage.dataset_digest == "d" * 64
    assert {k: v.model_dump() for k, v in manifest.files.items()} == json.loads(mine["manifest.json"])[
        "files"
    ]

    # Resume: downloaded as is (the publication manifest becomes the checkpoint's), nothing moved.
    restored = restore_checkpoint(store, FT, 3, tmp_path / "retry" / "checkpoints")
    assert restored.name == local.name
    assert _files(restored) == published
    assert latest_checkpoint(restored.parent) == restored  # every digest verified
    data, original = read_checkpoint(restored), read_checkpoint(local)
    assert data.step == 3 and data.trainer_state == original.trainer_state
    assert data.rng_meta == original.rng_meta

    # Inference takes the same publication: the adapter and state/, nothing else.
    fetched = fetch_checkpoint(store, cid, tmp_path / "cache")
    assert (fetched.adapter_dir / "adapter_model.safetensors").read_bytes() == mine[
        "adapter/adapter_model.safetensors"
    ]


def test_a_checkpoint_published_in_the_earlier_layout_still_resumes(tmp_path: Path) -> None:
    """Before the layouts were one, the trainer moved the library's files under ``state/`` (with
    the library's manifest as ``state/manifest.json``) and published that: such a checkpoint, in a
    store already, resumes from the download as well."""
    store = LocalStore(tmp_path / "s")
    local = _library_checkpoint(tmp_path / "run" / "checkpoints", 2)
    old = tmp_path / "old"
    (old / "state").mkdir(parents=True)
    for rel, data in _files(local).items():
        dest = old / rel if rel.startswith(("adapter/", "state/")) else old / "state" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    cid = keys.checkpoint_id(FT, 2)
    publish_dir(
        store, old, keys.checkpoint_prefix(cid), {"id": cid, "step": 2, "lineage": {}, "created_at": None}
    )

    restored = restore_checkpoint(store, FT, 2, tmp_path / "retry" / "checkpoints")
    assert latest_checkpoint(restored.parent) == restored
    assert read_checkpoint(restored).trainer_state == read_checkpoint(local).trainer_state
    assert fetch_checkpoint(store, cid, tmp_path / "cache").adapter_dir.is_dir()
