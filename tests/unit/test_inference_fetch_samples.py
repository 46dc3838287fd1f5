"""A checkpoint published with its sample videos (``samples/``, huvidpo.training.samples) is served:
the inference service takes the adapter and leaves the media alone; anything else is still refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.publish import publish_dir
from services.common.records import keys
from services.common.store import LocalStore
from services.inference.errors import CheckpointRefused
from services.inference.fetch import fetch_checkpoint


def _publish(store: LocalStore, root: Path, cid: str, extra: dict[str, bytes]) -> None:
    d = root / cid
    files = {
        "adapter/adapter_config.json": b'{"r": 4}',
        "adapter/adapter_model.safetensors": b"weights",
        **extra,
    }
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    publish_dir(store, d, keys.checkpoint_prefix(cid).rstrip("/"), extra_manifest={"id": cid})


def test_a_checkpoint_with_sample_videos_is_fetched(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    samples = {
        "samples/samples.json": b'{"items": []}',
        "samples/00.mp4": b"mp4",
        "samples/00-first.png": b"png",
    }
    _publish(store, tmp_path / "src", "ckpt-ft-a-2", samples)
    fetched = fetch_checkpoint(store, "ckpt-ft-a-2", tmp_path / "cache")
    assert (fetched.adapter_dir / "adapter_model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize("name", ["samples/00.pkl", "samples/deeper/00.mp4", "other/00.mp4"])
def test_other_files_are_still_refused(tmp_path: Path, name: str) -> None:
    store = LocalStore(tmp_path / "s")
    _publish(store, tmp_path / "src", "ckpt-ft-b-2", {name: b"x"})
    with pytest.raises(CheckpointRefused, match="unexpected files"):
        fetch_checkpoint(store, "ckpt-ft-b-2", tmp_path / "cache")
