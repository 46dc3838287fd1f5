"""A/B rounds for tests: a dataset version whose videos come from several checkpoints (what
scripts/ab_samples.py registers), uploaded through the API, and checkpoints published in the store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from services.common.publish import publish_dir
from services.common.store import ObjectStore

PROMPTS = ("a square slides to the right", "a square slides down")


def write_round(
    root: Path, checkpoints: list[str], samples: int = 1, prompts: tuple[str, ...] = PROMPTS
) -> Path:
    """A dataset dir: for every prompt, checkpoint and sample one clip (``{ckpt}-p{i}-s{k}``)."""
    from huvidpo.data import make_synthetic_dataset

    src = make_synthetic_dataset(root / "src", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    clip = next((src / "videos").glob("*.mp4"))
    out = root / "round"
    (out / "videos").mkdir(parents=True)
    lines = []
    for i, prompt in enumerate(prompts):
        for ckpt in checkpoints:
            for k in range(samples):
                vid = f"{ckpt}-p{i}-s{k}"
                shutil.copy(clip, out / "videos" / f"{vid}.mp4")
                rec = {
                    "id": vid,
                    "file": f"videos/{vid}.mp4",
                    "prompt": prompt,
                    "checkpoint": ckpt,
                    "sample": k,
                }
                lines.append(json.dumps(rec))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out


def upload(client: TestClient, auth: dict[str, str], name: str, data: Path) -> str:
    """Create dataset ``name`` and upload ``data`` as a version; returns the version id."""
    assert client.post("/v1/datasets", json={"name": name}, headers=auth).status_code == 201
    files = [
        ("files", (p.relative_to(data).as_posix(), p.read_bytes()))
        for p in sorted(data.rglob("*"))
        if p.is_file()
    ]
    r = client.post(f"/v1/datasets/{name}/versions", files=files, headers=auth)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def publish_checkpoints(store: ObjectStore, tmp: Path, ids: list[str]) -> None:
    for n, cid in enumerate(ids):
        (tmp / cid / "adapter").mkdir(parents=True)
        (tmp / cid / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * (n + 1))
        publish_dir(store, tmp / cid, f"checkpoints/{cid}/", {"id": cid, "step": n + 1, "lineage": {}})


def judge(client: TestClient, name: str, version: str, rater: str, a: str, b: str, winner: str | None) -> Any:
    """``rater`` judges clip ``a`` against clip ``b``: ``winner`` is a or b's id, or None (a tie)."""
    side = "tie" if winner is None else "left" if winner == a else "right"
    body = {"version": version, "rater_id": rater, "left": a, "right": b, "winner": side}
    r = client.put(f"/v1/datasets/{name}/ratings/choice", json=body)
    assert r.status_code == 200, r.text
    return r.json()
