"""Publish a local model directory to the object store as ``models/{id}`` (files first, manifest last).

Run by the cpu-dev seed Job after ``huvidpo init-tiny``::

    python publish_model.py /var/lib/huvidpo/seed/tiny models/tiny

The store comes from ``HUVIDPO_STORE_*`` (``StoreSettings``); the publication is the one every
service reads (``services.common.publish``). Idempotent: when ``{prefix}/manifest.json`` already
names the same directory digest nothing is written, so a re-run Job is harmless. Exit codes are the
trainer's (``ExitCode``): 2 for bad input (not retried), 75 when the store is unreachable (retried).
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.common.records.exit_codes import ExitCode


def publish(model_dir: Path, prefix: str) -> bool:
    """Publish ``model_dir`` at ``prefix``; False when the same model (same digest) is already there."""
    from huvidpo.models import directory_digest
    from services.common.publish import is_published, publish_dir, read_manifest
    from services.common.settings import StoreSettings
    from services.common.store import make_store

    store = make_store(StoreSettings())
    digest = directory_digest(model_dir)
    if is_published(store, prefix) and read_manifest(store, prefix).get("digest") == digest:
        return False
    publish_dir(store, model_dir, prefix, extra_manifest={"id": prefix.rsplit("/", 1)[-1], "digest": digest})
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: publish_model.py MODEL_DIR models/ID", file=sys.stderr)
        return ExitCode.BAD_INPUT
    model_dir, prefix = Path(argv[0]), argv[1].rstrip("/")
    if not (model_dir / "model_index.json").is_file():
        print(f"{model_dir} is not a diffusers model directory (no model_index.json)", file=sys.stderr)
        return ExitCode.BAD_INPUT
    from services.common.store import StoreUnavailable

    try:
        written = publish(model_dir, prefix)
    except StoreUnavailable as exc:
        print(f"object store unavailable, will retry: {exc}", file=sys.stderr)
        return ExitCode.TRANSIENT
    print(f"{'published' if written else 'already published:'} {model_dir} -> {prefix}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
