"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory ``ckpt-<step:06d>/`` under ``<output_dir>/checkpoints``, laid out as it
is published to the store (``checkpoints/{id}/``, docs/CONTRACTS.md), so the trainer uploads it and
downloads it as is::

    adapter/adapter_config.json                   LoRA (DPO): what inference serves
    adapter/adapter_model.safetensors
    state/trainable.safetensors                   the trained parameters (stage 1)
    state/optimizer.safetensors  state/optimizer.json   AdamW state: tensors / param groups and scalars
    state/rng.safetensors        state/rng.json         torch (CPU, CUDA), numpy and python RNG states
    state/trainer_state.json                      step, epoch, scheduler state, metrics
    manifest.json                                 {"id", "step", "files": {relpath: {"sha256", "size"}},
                                                  "lineage", "created_at"}, written LAST

It is written under ``ckpt-<step>.tmp/`` and renamed into place once complete, and the manifest comes
last, so a directory without ``manifest.json`` (a crash mid-write) is never loaded. Nothing is
pickled: tensors go to safetensors and everything else to JSON. The manifest has the shape of the
store's publication manifest (``CheckpointManifest``): a published checkpoint downloaded with its
manifest is a checkpoint directory. Checkpoints written before ``state/`` existed (its files at the
top level) are still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
PREFIX = "ckpt-"
STATE_DIR = "state"  # resume-only files; ``adapter/`` beside it is what inference serves


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt or does not fit the run."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def state_file(checkpoint: Path, name: str) -> Path:
    """``checkpoint/state/<name>``, or ``checkpoint/<name>`` in a checkpoint from before ``state/``."""
    path = checkpoint / STATE_DIR / name
    return path if path.exists() or not (checkpoint / name).exists() else checkpoint / name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- optimizer state <-> safetensors + JSON -----------------------------------------------------
def flatten_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<param>.<key>``) and JSON values."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    meta = {
        "param_groups": state["param_groups"],
        "scalars": scalars,
        "param_ids": [str(p) for p in state["state"]],
    }
    return tensors, meta


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[int, dict[str, Any]] = {}
    for pid in meta["param_ids"]:
        out[int(pid)] = dict(meta["scalars"].get(pid, {}))
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        out.setdefault(int(pid), {})[name] = value
    return {"state": out, "param_groups": meta["param_groups"]}


# -- RNG state -----------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global RNG states: torch CPU (and CUDA), numpy and python ``random``."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": {
            "kind": kind,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    return tensors, meta


def restore_rng(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# -- writing and reading -------------------------------------------------------------------------
@dataclass
class CheckpointData:
    """What a trainer restores from a checkpoint."""

    path: Path
    step: int
    trainer_state: dict[str, Any]
    optimizer_state: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    rng_meta: dict[str, Any]


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def write_checkpoint(
    checkpoints_dir: str | os.PathLike[str],
    step: int,
    write_weights: Any,
    optimizer: torch.optim.Optimizer,
    trainer_state: Mapping[str, Any],
    lineage: Mapping[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and return its final path.

    ``write_weights(tmp_dir)`` writes the model weights (``adapter/``, or trained parameters under
    ``state/``) into the temporary checkpoint directory; optimizer and RNG state, ``trainer_state``
    (JSON-serialisable) under ``state/`` and the manifest are added here.
    """
    root = Path(checkpoints_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f"{checkpoint_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    state = tmp / STATE_DIR
    state.mkdir(parents=True)
    write_weights(tmp)
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
    save_file(opt_tensors, str(state / "optimizer.safetensors"), metadata={"format": "pt"})
    _write_json(state / "optimizer.json", opt_meta)
    rng_tensors, rng_meta = capture_rng()
    save_file(rng_tensors, str(state / "rng.safetensors"), metadata={"format": "pt"})
    _write_json(state / "rng.json", rng_meta)
    _write_json(state / "trainer_state.json", dict(trainer_state))
    files = {}
    for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
        files[p.relative_to(tmp).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest = {
        "id": checkpoint_name(step),
        "step": step,
        "files": files,
        "lineage": dict(lineage or {}),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Manifest last, fsync'd, then one rename: readers see either nothing or a complete checkpoint.
    with (tmp / MANIFEST).open("w") as fh:
        fh.write(json.dumps(manifest, indent=2, sort_keys=True))
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def is_complete(path: Path, verify: bool = False) -> bool:
    """A checkpoint exists only with its manifest; with ``verify`` every digest is checked too."""
    mf = path / MANIFEST
    if not mf.is_file() or path.name.endswith(".tmp"):
        return False
    if not verify:
        return True
    try:
        manifest = json.loads(mf.read_text())
        for rel, info in manifest["files"].items():
            p = path / rel
            if not p.is_file() or p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
                return False
    except (OSError, ValueError, KeyError):
        return False
    return True


def list_checkpoints(checkpoints_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints, oldest first (by step)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and is_complete(p):
            found.append((int(p.name[len(PREFIX) :]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint whose files match their manifest digests, or None."""
    for p in reversed(list_checkpoints(checkpoints_dir)):
        if is_complete(p, verify=True):
            return p
    return None


def prune_checkpoints(checkpoints_dir: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints and any stale ``.tmp`` dirs."""
    root = Path(checkpoints_dir)
    removed = []
    complete = list_checkpoints(root)
    for p in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(p)
        removed.append(p)
    for p in root.glob(f"{PREFIX}*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def read_checkpoint(path: str | os.PathLike[str]) -> CheckpointData:
    """Read and verify one checkpoint directory."""
    p = Path(path)
    if not is_complete(p, verify=True):
        raise CheckpointError(f"{p} is not a complete checkpoint (missing manifest or digest mismatch)")
    manifest = json.loads((p / MANIFEST).read_text())
    opt = unflatten_optimizer_state(
        load_file(str(state_file(p, "optimizer.safetensors"))),
        json.loads(state_file(p, "optimizer.json").read_text()),
    )
    return CheckpointData(
        path=p,
        step=int(manifest["step"]),
        trainer_state=json.loads(state_file(p, "trainer_state.json").read_text()),
        optimizer_state=opt,
        rng_tensors=load_file(str(state_file(p, "rng.safetensors"))),
        rng_meta=json.loads(state_file(p, "rng.json").read_text()),
    )
