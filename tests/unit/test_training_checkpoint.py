"""Checkpoints: atomic, manifest-last, pickle-free, pruned; optimizer and RNG state round-trip exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from huvidpo.training.checkpoint import (
    MANIFEST,
    CheckpointError,
    capture_rng,
    flatten_optimizer_state,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    restore_rng,
    unflatten_optimizer_state,
    write_checkpoint,
)


def _trained_optimizer() -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-8, weight_decay=1e-4)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _write(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Path:
    def weights(d: Path) -> None:
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(d / "state" / "trainable.safetensors"),
        )

    return write_checkpoint(root, step, weights, opt, {"step": step, "scheduler": {"last_epoch": step}})


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path: Path) -> None:
    model, opt = _trained_optimizer()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    save_file(tensors, str(tmp_path / "o.safetensors"))
    (tmp_path / "o.json").write_text(json.dumps(meta))
    restored = unflatten_optimizer_state(
        load_file(str(tmp_path / "o.safetensors")), json.loads((tmp_path / "o.json").read_text())
    )
    fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
    fresh.load_state_dict(restored)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 1e-2
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            assert torch.equal(v, b["state"][pid][k]), k


def test_rng_state_round_trip_restores_every_generator() -> None:
    tensors, meta = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    json.loads(json.dumps(meta))  # JSON-serialisable, no pickle needed
    restore_rng(tensors, meta)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_checkpoint_is_complete_pickle_free_and_verified(tmp_path: Path) -> None:
    model, opt = _trained_optimizer()
    path = _write(tmp_path, 7, model, opt)
    assert path.name == "ckpt-000007" and not list(tmp_path.glob("*.tmp"))
    manifest = json.loads((path / MANIFEST).read_text())
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == files
    assert {Path(f).suffix for f in files} <= {".json", ".safetensors"}
    # The published layout: resume-only files under state/, the manifest beside them (and adapter/).
    assert {f.split("/")[0] for f in files} == {"state"}
    assert {"state/optimizer.safetensors", "state/rng.json", "state/trainer_state.json"} <= files
    assert manifest["id"] == "ckpt-000007" and manifest["step"] == 7
    data = read_checkpoint(path)
    assert data.step == 7 and data.trainer_state["scheduler"] == {"last_epoch": 7}
    # A flipped byte is caught by the digests and such a checkpoint is never picked for resume.
    target = path / "state" / "optimizer.safetensors"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_checkpoint(path)
    assert latest_checkpoint(tmp_path) is None


def test_latest_skips_incomplete_and_prune_keeps_last_n(tmp_path: Path) -> None:
    model, opt = _trained_optimizer()
    for step in (2, 4, 6, 8):
        _write(tmp_path, step, model, opt)
    # A crash mid-write leaves a .tmp dir, or a renamed dir without its manifest: neither counts.
    (tmp_path / "ckpt-000010.tmp").mkdir()
    half = tmp_path / "ckpt-000012"
    half.mkdir()
    (half / "optimizer.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-000002",
        "ckpt-000004",
        "ckpt-000006",
        "ckpt-000008",
    ]
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "ckpt-000008"
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000006", "ckpt-000008"]
    assert not (tmp_path / "ckpt-000010.tmp").exists()


def test_checkpoint_from_before_state_dir_is_still_read(tmp_path: Path) -> None:
    """A local checkpoint written with its files at the top level (before ``state/``) still resumes."""
    model, opt = _trained_optimizer()
    path = _write(tmp_path, 3, model, opt)
    for f in (path / "state").iterdir():
        f.rename(path / f.name)
    (path / "state").rmdir()
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"] = {k.removeprefix("state/"): v for k, v in manifest["files"].items()}
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert latest_checkpoint(tmp_path) == path
    data = read_checkpoint(path)
    assert data.step == 3 and data.trainer_state["scheduler"] == {"last_epoch": 3}
