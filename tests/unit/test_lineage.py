"""One digest for every identity: a directory hashed on disk by the library and the same directory
published in the store have the same digest, and lineage records read tolerantly."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.loop import check_lineage
from huvidpo.models import directory_digest
from services.common.publish import publish_dir
from services.common.records.lineage import CheckpointManifest, Lineage, content_digest
from services.common.store import LocalStore


def test_a_directory_on_disk_and_its_publication_have_one_digest(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    store = LocalStore(tmp_path / "s")
    manifest = publish_dir(store, tiny_model_dir, "models/tiny/", {})
    assert directory_digest(tiny_model_dir) == content_digest(manifest["files"])
    (tmp_path / "d" / "b").mkdir(parents=True)
    (tmp_path / "d" / "b" / "x.bin").write_bytes(b"\0" * 3)
    (tmp_path / "d" / "a.txt").write_text("a")
    assert directory_digest(tmp_path / "d") == content_digest(
        publish_dir(store, tmp_path / "d", "d/", {})["files"]
    )


def test_a_checkpoint_manifest_reads_with_fields_it_does_not_know() -> None:
    raw = {
        "id": "ckpt-ft-a-2",
        "step": 2,
        "created_at": "t",
        "files": {"adapter/a.safetensors": {"sha256": "0" * 64, "size": 1}},
        "lineage": {"dataset_digest": "d" * 64, "base_model_digest": "b" * 64, "stage": "dpo"},
        "from_the_future": True,
    }
    m = CheckpointManifest.model_validate(raw)
    assert isinstance(m.lineage, Lineage) and m.lineage.dataset_digest == "d" * 64
    assert m.lineage.model_dump()["stage"] == "dpo"
    assert m.content_digest() == content_digest(raw["files"])  # type: ignore[arg-type]


def test_the_demo_refuses_a_checkpoint_on_another_base_model() -> None:
    lineage = {"dataset_digest": "d" * 64, "base_model_digest": "b" * 64, "finetune_id": "ft-a"}
    summary = {
        "dataset": {"version_digest": "d" * 64},
        "finetune": {"id": "ft-a", "checkpoints": ["ckpt-ft-a-2"], "lineage": dict(lineage)},
        "checkpoint": {"id": "ckpt-ft-a-2", "lineage": lineage},
        "generation": {"checkpoint_id": "ckpt-ft-a-2"},
    }
    check_lineage(summary)
    summary["checkpoint"] = {"id": "ckpt-ft-a-2", "lineage": {**lineage, "base_model_digest": "c" * 64}}
    with pytest.raises(RuntimeError, match="base_model_digest"):
        check_lineage(summary)
