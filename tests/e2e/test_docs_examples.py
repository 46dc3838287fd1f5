"""Every shell example of the READMEs and docs/ runs against a live local stack (``demo.stack``), so the
docs cannot rot: a shell block either runs and succeeds, or carries a visible
``<!-- docs-test: skip (why) -->`` marker before its fence (tests/docs_runner.py says what "runs" means).

Each document gets a small explicit setup below (environment, the documented addresses replaced by the
live ones, fixture files in its working directory); a document without one runs with the default (no
stack, a scratch directory), so a block added later is covered without touching this file.
``HUVIDPO_DOCS_KEEP=DIR`` keeps each document's directory and block logs under DIR.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.loop import publish_base_model
from demo.stack import REPO, Stack, free_port, local_store_env
from tests.docs_runner import Block, DocRun, extract_blocks
from tests.e2e.harness import store_from_env

pytestmark = pytest.mark.slow

DOC_GLOBS = ("README.md", "services/*/README.md", "docs/*.md", "deploy/README.md")


def documents() -> list[str]:
    found: list[str] = []
    for pattern in DOC_GLOBS:
        found += sorted(str(p.relative_to(REPO)) for p in REPO.glob(pattern))
    return found


# ------------------------------------------------------------------------------------------ setups
@dataclass
class Ctx:
    """What a document's setup may use: its working directory and, when it asked for one, the stack."""

    cwd: Path
    stack: Stack | None = None
    tiny: Path | None = None

    @property
    def s(self) -> Stack:
        assert self.stack is not None
        return self.stack


@dataclass
class Setup:
    stack: str | None = None  # None, "controlplane" (REST only) or "full" (REST + gRPC inference)
    env: Callable[[Ctx], dict[str, str]] = lambda ctx: {}
    substitutions: Callable[[Ctx], list[tuple[str, str]]] = lambda ctx: []
    fixtures: Callable[[Ctx], None] = lambda ctx: None
    timeout: float = 120.0


def _client_env(ctx: Ctx) -> dict[str, str]:
    return {
        "HUVIDPO_URL": ctx.s.controlplane_url,
        "HUVIDPO_TOKEN": ctx.s.token,
        "HUVIDPO_GRPC_ADDRESS": ctx.s.grpc_address,
    }


def _frame(path: Path, size: tuple[int, int] = (64, 64)) -> None:
    Image.fromarray(np.full((*size, 3), 120, np.uint8)).save(path)


def _readme_fixtures(ctx: Ctx) -> None:
    from huvidpo.data.synthetic import make_synthetic_dataset

    assert ctx.tiny is not None
    shutil.copytree(ctx.tiny, ctx.cwd / "sd15")
    make_synthetic_dataset(ctx.cwd / "rated-videos", n_prompts=2, videos_per_prompt=2, num_frames=6, size=32)
    _frame(ctx.cwd / "frame.png")
    _frame(ctx.cwd / "cat.png", (32, 32))


# The README's fine-tune (200 steps at the default size) shrunk to what a CPU trains in seconds.
SMALL_TRAINING = (
    "--hp max_steps=4 --hp checkpoint_every=2 --hp num_frames=4 --hp height=32 --hp width=32 "
    "--hp batch_size=1 --hp lora_rank=4 --hp gradient_checkpointing=false"
)
_NEWEST_FT = '"$(huvidpo fine-tunes list -o json | python -c \'import json,sys; print(json.load(sys.stdin)[0]["id"])\')"'
_NEWEST_CKPT = (
    '"$(huvidpo checkpoints list -o json | python -c '
    '\'import json,sys; print(max(json.load(sys.stdin), key=lambda c: c["step"])["id"])\')"'
)


def _readme_subs(ctx: Ctx) -> list[tuple[str, str]]:
    return [
        ("/tmp/tiny", str(ctx.cwd / "tiny")),
        ("--hp max_steps=200", SMALL_TRAINING),
        ("ckpt-ft-...-200", _NEWEST_CKPT),
        ("ft-...", _NEWEST_FT),
        ("127.0.0.1:50051", ctx.s.grpc_address),
        # generate --remote takes `huvidpo generate`'s defaults (16 frames of 320x512, 50 steps): minutes on a CPU
        ("--out cat.mp4", "--out cat.mp4 --frames 4 --height 32 --width 32 --steps 2"),
    ]


def _controlplane_fixtures(ctx: Ctx) -> None:
    assert ctx.tiny is not None
    shutil.copytree(ctx.tiny, ctx.cwd / "sd15")
    store_from_env(dict(ctx.s.store_env)).upload_dir(ctx.tiny, "imports/sd15")


def _random_adapter(tiny: Path, out: Path, seed: int) -> None:
    import torch

    from huvidpo.lora import lora_config, lora_parameters, save_lora
    from huvidpo.models import load_components

    unet = load_components(tiny).unet
    unet.add_adapter(lora_config(rank=4, alpha=4, dropout=0.0), adapter_name="default")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet, "default").values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    save_lora(unet, out, "default")


def _ab_fixtures(ctx: Ctx) -> None:
    """docs/rating-ui.md: a base model, two checkpoints' adapters, prompts and a first frame."""
    assert ctx.tiny is not None
    shutil.copytree(ctx.tiny, ctx.cwd / "models" / "base")
    _random_adapter(ctx.tiny, ctx.cwd / "ckpt200" / "adapter", 1)
    _random_adapter(ctx.tiny, ctx.cwd / "ckpt100" / "adapter", 2)
    (ctx.cwd / "prompts.txt").write_text("a cat turns to smile\na dog jumps\n")
    (ctx.cwd / "frames").mkdir()
    _frame(ctx.cwd / "frames" / "cat.png")


SETUPS: dict[str, Setup] = {
    "docs/rating-ui.md": Setup(
        stack="controlplane",
        env=_client_env,
        substitutions=lambda ctx: [
            ("HUVIDPO_TOKEN=... ", ""),  # the token is in the environment
            ("http://127.0.0.1:8080", ctx.s.controlplane_url),
            ("--out ab-round2", "--out ab-round2 --frames 4 --height 64 --width 64 --steps 2"),
        ],
        fixtures=_ab_fixtures,
    ),
    "README.md": Setup(stack="full", env=_client_env, substitutions=_readme_subs, fixtures=_readme_fixtures),
    "services/controlplane/README.md": Setup(
        stack="controlplane",
        env=_client_env,
        substitutions=lambda ctx: [("http://127.0.0.1:8080", ctx.s.controlplane_url)],
        fixtures=_controlplane_fixtures,
    ),
}


def _documented_manifest(ctx: Ctx) -> None:
    """docs/datasets.md: the reader saved its complete manifest (the first ``json`` block) as manifest.jsonl."""
    text = (REPO / "docs" / "datasets.md").read_text()
    manifest = text.split("```json\n", 1)[1].split("```", 1)[0]
    (ctx.cwd / "manifest.jsonl").write_text(manifest)


def _own_port_setup(var: str, default: str, **kw: Callable[[Ctx], None]) -> Setup:
    """A document that starts its own server on a default port: give it a free one, and name that."""
    port = free_port()
    return Setup(
        env=lambda ctx: {var: str(port)}, substitutions=lambda ctx: [(default, f"127.0.0.1:{port}")], **kw
    )


# ------------------------------------------------------------------------------------------ the test
@pytest.fixture(scope="module")
def keep_dir() -> Path | None:
    keep = os.environ.get("HUVIDPO_DOCS_KEEP")
    return Path(keep) if keep else None


def _setup_for(doc: str) -> Setup:
    if doc == "docs/datasets.md":
        return _own_port_setup("HUVIDPO_CONTROLPLANE_PORT", "127.0.0.1:8080", fixtures=_documented_manifest)
    if doc == "services/inference/README.md":
        grpc_port, metrics_port = free_port(), free_port()
        return Setup(
            env=lambda ctx: {
                "HUVIDPO_INFERENCE_PORT": str(grpc_port),
                "HUVIDPO_INFERENCE_METRICS_PORT": str(metrics_port),
            },
            substitutions=lambda ctx: [("127.0.0.1:50051", f"127.0.0.1:{grpc_port}")],
        )
    return SETUPS.get(doc, Setup())


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUVIDPO_")}
    env.update(
        {
            "PATH": os.pathsep.join([str(REPO / ".venv" / "bin"), env.get("PATH", "")]),
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


@dataclass
class Report:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@pytest.mark.parametrize("doc", documents())
def test_every_shell_example_runs_or_says_why_not(
    doc: str, tmp_path: Path, tiny_model_dir: Path, keep_dir: Path | None, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = extract_blocks(REPO / doc, doc)
    to_run: list[Block] = [b for b in blocks if b.skip is None]
    if not to_run:
        pytest.skip(f"{doc}: no shell block to run ({len(blocks)} skipped by their marker)")
    setup = _setup_for(doc)
    root = keep_dir / doc.replace("/", "_") if keep_dir else tmp_path
    cwd = root / "cwd"
    stack = None
    started = time.monotonic()
    run: DocRun | None = None
    try:
        if setup.stack:
            env = local_store_env(root / "store")
            publish_base_model(store_from_env(env), tiny_model_dir, "tiny")
            stack = Stack(root / "stack", env)
            stack.start_controlplane()
            if setup.stack == "full":
                stack.start_inference(
                    {
                        "default_frames": "4",
                        "default_height": "32",
                        "default_width": "32",
                        "default_steps": "2",
                    }
                )
        cwd.mkdir(parents=True, exist_ok=True)
        ctx = Ctx(cwd, stack, tiny_model_dir)
        setup.fixtures(ctx)
        ready = time.monotonic()
        subs = setup.substitutions(ctx)
        stale = [old for old, _ in subs if not any(old in b.text for b in to_run)]
        assert not stale, f"{doc}: the setup replaces text no block has any more (update it): {stale}"
        run = DocRun(cwd, {**_base_env(), **setup.env(ctx)}, subs, setup.timeout, REPO)
        try:
            for block in to_run:
                run.run(block)
        finally:
            run.stop()
    finally:
        if stack is not None:
            stack.stop()
    assert run is not None
    with capsys.disabled():
        print(
            f"\n{doc}: ran {len(run.ran)} block(s) in {time.monotonic() - started:.0f} s"
            f" (setup {ready - started:.0f} s): {', '.join(run.ran)};"
            f" skipped {len(blocks) - len(to_run)}: "
            + "; ".join(f"{b.where} ({b.skip})" for b in blocks if b.skip is not None)
        )
