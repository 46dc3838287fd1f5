#!/usr/bin/env python3
"""Make an on-policy A/B comparison set: samples of the current checkpoint and of the previous one for
the same prompts, first frames and seeds, registered as a dataset the rating page's A/B mode rates.

    HUVIDPO_TOKEN=... python scripts/ab_samples.py \\
        --base-model ./models/base --current runs/ft/ckpt-200/adapter --previous runs/ft/ckpt-100/adapter \\
        --current-name ckpt-ft-200 --previous-name ckpt-ft-100 \\
        --prompts prompts.txt --first-frame frames/cat.png --first-frame frames/dog.png \\
        --out ./ab-round2 --url http://127.0.0.1:8080 --dataset round2-ab

``--previous base`` (or ``--current base``) samples the base model without an adapter. Each video record
of the written manifest carries ``checkpoint``, ``first_frame`` (the image's file stem) and ``sample``:
the rating page pairs the two checkpoints' videos of one prompt, first frame and sample, shows them
side by side (sides shuffled per pair, names hidden), and each choice becomes a ``choice`` record, so
compiling the ratings gives the next round of DPO pairs. Both checkpoints use the same seed for the
same prompt, first frame and sample, so the comparison differs only by the weights.

Without ``--url`` the dataset directory is written and nothing is uploaded. The bearer token is read
from the ``HUVIDPO_TOKEN`` environment variable (never from the command line, where ``ps`` shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from huvidpo.cli import add_generation_options, generation_config  # noqa: E402

if TYPE_CHECKING:
    from huvidpo.pipeline import GenerationConfig


@dataclass(frozen=True)
class Checkpoint:
    """A name shown in the records, and a LoRA adapter directory (``None``: the base model)."""

    name: str
    adapter: Path | None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "ckpt"


def generate_comparison(
    base_model: Path,
    checkpoints: list[Checkpoint],
    prompts: list[str],
    first_frames: list[Path | None],
    out: Path,
    *,
    samples: int = 1,
    config: GenerationConfig | None = None,
    device: str = "cpu",
) -> Path:
    """Sample every checkpoint on every (prompt, first frame, sample) with the same seeds and write a
    dataset directory (``videos/{checkpoint}/{n}.mp4`` and ``manifest.jsonl``, validated). Returns ``out``.

    ``config`` holds the sampling options (``GenerationConfig()``'s defaults when None); video ``n``
    of every checkpoint has the same prompt, first frame and seed ``config.seed + n``."""
    import dataclasses

    import torch

    from huvidpo.data import write_manifest
    from huvidpo.lora import load_lora
    from huvidpo.models import load_components
    from huvidpo.pipeline import GenerationConfig, HuViDPOPipeline

    base_cfg = config or GenerationConfig()
    base_cfg.validate()
    if len(checkpoints) != 2 or checkpoints[0].name == checkpoints[1].name:
        raise ValueError("an A/B set compares exactly two checkpoints with different names")
    if not prompts:
        raise ValueError("give at least one prompt")
    slugs = [_slug(c.name) for c in checkpoints]
    if slugs[0] == slugs[1]:
        raise ValueError("the two checkpoint names must differ in letters, digits, '.', '_' or '-'")
    components = load_components(base_model, device=device, dtype=torch.float32)
    unet = components.unet
    adapters: dict[str, str] = {}
    for i, c in enumerate(checkpoints):
        if c.adapter is not None:
            adapters[c.name] = f"ab{i}"
            load_lora(unet, c.adapter, adapter=f"ab{i}")
    pipe = HuViDPOPipeline(components)
    jobs = [(p, ff, k) for p in prompts for ff in first_frames for k in range(samples)]
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for c, slug in zip(checkpoints, slugs, strict=True):
        if c.name in adapters:
            unet.enable_adapters()
            unet.set_adapter(adapters[c.name])
        elif adapters:
            unet.disable_adapters()
        for n, (prompt, ff, k) in enumerate(jobs):
            cfg = dataclasses.replace(base_cfg, seed=base_cfg.seed + n)
            result = pipe(prompt, str(ff) if ff is not None else None, cfg)
            rel = f"videos/{slug}/{n:04d}.mp4"
            result.save(out / rel)
            records.append(
                {
                    "type": "video",
                    "id": f"{slug}-{n:04d}",
                    "file": rel,
                    "prompt": prompt,
                    "checkpoint": c.name,
                    "first_frame": ff.stem if ff is not None else None,
                    "sample": k,
                    "seed": cfg.seed,
                }
            )
    write_manifest(out, records, min_frames=2)
    return out


# ------------------------------------------------------------------------------------ registration
def _request(url: str, token: str, method: str, body: bytes | None, content_type: str | None) -> Any:
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Accept", "application/json")
    if content_type:
        req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read() or b"null")


def register(url: str, token: str, dataset: str, directory: Path, description: str = "") -> dict[str, Any]:
    """Create ``dataset`` (if new) on the control plane at ``url`` and upload ``directory`` as a new
    version (``POST /v1/datasets/{name}/versions``, multipart). Returns the version's manifest."""
    base = url.rstrip("/")
    try:
        _request(
            base + "/v1/datasets",
            token,
            "POST",
            json.dumps({"name": dataset, "description": description}).encode(),
            "application/json",
        )
    except urllib.error.HTTPError as exc:
        if exc.code != 409:  # 409: the dataset exists; add a version to it
            raise RuntimeError(
                f"creating dataset {dataset!r} failed: {exc.code} {exc.read()[:500]!r}"
            ) from exc
    boundary = "huvidpo-" + uuid.uuid4().hex
    parts: list[bytes] = []
    for p in sorted(q for q in directory.rglob("*") if q.is_file()):
        rel = p.relative_to(directory).as_posix()
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{rel}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + p.read_bytes()
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    try:
        result: dict[str, Any] = _request(
            f"{base}/v1/datasets/{dataset}/versions",
            token,
            "POST",
            body,
            f"multipart/form-data; boundary={boundary}",
        )
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"uploading the samples failed: {exc.code} {exc.read()[:1000]!r}") from exc
    return result


# --------------------------------------------------------------------------------------------- CLI
def _checkpoint(name: str, adapter: str) -> Checkpoint:
    return Checkpoint(name, None if adapter == "base" else Path(adapter))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", type=Path, required=True, help="base model directory (diffusers layout)")
    p.add_argument(
        "--current", required=True, help="LoRA adapter directory of the current checkpoint, or 'base'"
    )
    p.add_argument("--previous", required=True, help="LoRA adapter directory of the previous one, or 'base'")
    p.add_argument("--current-name", default="current", help="checkpoint id recorded for --current")
    p.add_argument("--previous-name", default="previous", help="checkpoint id recorded for --previous")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="a file of prompts, one per line")
    p.add_argument(
        "--first-frame", action="append", type=Path, default=[], help="first-frame image (repeatable)"
    )
    p.add_argument("--samples", type=int, default=1, help="samples per prompt and first frame")
    # The same sampling options and defaults as `huvidpo generate` (fewer steps: a rating round needs many).
    add_generation_options(p, steps=25)
    p.add_argument("--seed", type=int, default=0, help="seed of video 0; video n gets seed + n")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    p.add_argument("--url", help="control plane base URL; upload the set there (token in HUVIDPO_TOKEN)")
    p.add_argument("--dataset", help="dataset name on the control plane (with --url)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [ln.strip() for ln in args.prompts.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if args.url and not args.dataset:
        print("error: --url needs --dataset", file=sys.stderr)
        return 2
    token = os.environ.get("HUVIDPO_TOKEN", "")
    checkpoints = [
        _checkpoint(args.current_name, args.current),
        _checkpoint(args.previous_name, args.previous),
    ]
    try:
        out = generate_comparison(
            args.base_model,
            checkpoints,
            prompts,
            list(args.first_frame) or [None],
            args.out,
            samples=args.samples,
            config=generation_config(args),
            device=args.device,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if args.url:
        version = register(args.url, token, args.dataset, out, "on-policy A/B samples")
        print(f"registered {args.dataset} version {version['id']} ({version['videos']} videos)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
