"""A gated rollout through the ``huvidpo`` CLI alone, against a real control plane and inference
service on 127.0.0.1 (``demo.stack.Stack``, the tiny model): a canary with a policy, traffic through
``huvidpo generate --remote``, an evaluation record in the store as the evaluator writes it, and
``huvidpo rollouts evaluate`` promoting a good canary and rolling back one whose evaluation says
motion collapse, each decision with its reasons on ``huvidpo rollouts history`` and counted in the
control plane's Prometheus metrics.

The control plane's background gate is off (``ROLLOUT_GATE_SECONDS=0``) so that the CLI's evaluate
is what decides. ``HUVIDPO_GATE_TRANSCRIPT=path`` keeps the transcript (every command, its output)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from demo.loop import publish_base_model
from demo.stack import REPO, Stack, local_store_env
from services.common.records.evaluation import (
    CheckpointEvaluation,
    EvaluationRecord,
    write_evaluation,
)
from services.common.store import ObjectStore
from services.inference.testing import make_adapter, publish_checkpoint
from tests.e2e.harness import store_from_env
from tests.e2e.test_client_cli import Cli

pytestmark = pytest.mark.slow

GOOD, COLLAPSED = "ckpt-ft-gate-2", "ckpt-ft-gate-4"
GEN = ["--frames", "4", "--height", "32", "--width", "32", "--steps", "2", "--quiet"]


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def evaluated(store: ObjectStore, eid: str, checkpoint: str, acc: float, motion_ratio: float) -> None:
    """The record the evaluator writes when it succeeds (``evaluations/{id}.json``)."""
    collapse = motion_ratio < 0.7
    write_evaluation(
        store,
        EvaluationRecord(
            id=eid,
            checkpoint_id=checkpoint,
            baseline="base",
            created_at=datetime.now(UTC).isoformat(),
            state="succeeded",
            heldout_implicit_acc=acc,
            heldout_reward_margin=0.4,
            motion_collapse=collapse,
            results={
                checkpoint: CheckpointEvaluation(
                    name=checkpoint, motion_ratio=motion_ratio, motion_collapse=collapse
                )
            },
        ),
    )


@pytest.fixture(scope="module")
def gated(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[Stack, Cli, ObjectStore, Path]]:
    work = tmp_path_factory.mktemp("gate-stack")
    env = local_store_env(work / "store")
    store = store_from_env(env)
    publish_base_model(store, tiny_model_dir, "tiny")
    for seed, cid in enumerate((GOOD, COLLAPSED)):
        make_adapter(tiny_model_dir, work / cid, seed=seed, scale=0.05)
        publish_checkpoint(store, cid, work / cid)
    stack = Stack(work, env, {"HUVIDPO_CONTROLPLANE_ROLLOUT_GATE_SECONDS": "0"})
    try:
        stack.start_controlplane()
        stack.start_inference(
            {"default_frames": "4", "default_height": "32", "default_width": "32", "default_steps": "2"}
        )
        frame = work / "frame.png"
        Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(frame)
        cli_env = {k: v for k, v in os.environ.items() if not k.startswith("HUVIDPO_")}
        cli_env.update(
            {
                "PYTHONPATH": str(REPO),
                "HF_HUB_OFFLINE": "1",
                "HUVIDPO_URL": stack.controlplane_url,
                "HUVIDPO_TOKEN": stack.token,
                "HUVIDPO_GRPC_ADDRESS": stack.grpc_address,
            }
        )
        yield stack, Cli(cli_env), store, frame
    finally:
        stack.stop()


def test_a_gated_rollout_is_promoted_on_good_evidence_and_rolled_back_on_motion_collapse(
    gated: tuple[Stack, Cli, ObjectStore, Path], tmp_path: Path
) -> None:
    stack, cli, store, frame = gated
    url = stack.controlplane_url
    cli("rollouts", "set", "default", "base", "--create", "--wait", "--timeout", "180")
    policy = [
        "--policy-min-accuracy",
        "0.8",
        "--policy-min-requests",
        "3",
        "--policy-max-error-margin",
        "0.02",
    ]
    ro = cli.json(
        "rollouts", "canary", "default", GOOD, "--percent", "10", *policy, "--wait", "--timeout", "180"
    )
    assert (ro["canary"], ro["policy"]["min_requests"]) == (GOOD, 3)  # type: ignore[index]

    # no evidence yet: the gate waits and says what it misses
    out = cli("rollouts", "evaluate", "default").stdout
    assert "wait (recorded)" in out.splitlines()[0]
    assert f"no succeeded evaluation of {GOOD} yet" in out and "canary served 0 of the 3" in out

    # traffic: three requests on the canary, one routed by the split
    for seed in range(3):
        cli("generate", "--remote", stack.grpc_address, "--prompt", "a square slides", "--first-frame",
            str(frame), *GEN, "--seed", str(seed), "--checkpoint", GOOD, "--out", str(tmp_path / f"c{seed}.mp4"))  # fmt: skip
    cli("generate", "--remote", stack.grpc_address, "--prompt", "a square slides", "--first-frame",
        str(frame), *GEN, "--seed", "9", "--out", str(tmp_path / "routed.mp4"))  # fmt: skip
    evaluated(store, "ev-good", GOOD, acc=0.85, motion_ratio=0.95)

    # the replicas report their traffic with their next heartbeat (every poll, 1 s)
    deadline = time.monotonic() + 60
    while True:
        out = cli("rollouts", "evaluate", "default", "--wait", "--timeout", "180").stdout
        if ": wait (" not in out.splitlines()[0]:
            break
        assert time.monotonic() < deadline, out
        time.sleep(1)
    lines = out.splitlines()
    assert lines[0] == "default revision 2: promote (promoted)"
    assert lines[1:5] == [
        "  - held-out implicit accuracy 0.850 >= 0.8 (evaluation ev-good)",
        "  - no motion collapse (evaluation ev-good)",
        lines[3],  # the routed request may have gone either way: (0/3) vs (0/1), or (0/4) vs (0/0)
        f"  - no human A/B round compares {GOOD} and base: not required",
    ]
    assert re.fullmatch(
        r"  - within: canary error ratio 0\.0000 \(0/[34]\) vs stable 0\.0000 \(0/[01]\) \+ margin 0\.02",
        lines[3],
    )
    assert lines[5] == f"default  revision 3  current {GOOD}  canary -"
    assert "Ready True" in out  # --wait: every replica serves the promoted checkpoint
    assert metric(url, "huvidpo_controlplane_rollout_gate_decisions_total", decision="promote") == 1

    # a canary whose evaluation finds its motion collapsed is rolled back (exit 1), with the reason
    cli("rollouts", "canary", "default", COLLAPSED, "--percent", "10", *policy, "--wait", "--timeout", "180")
    evaluated(store, "ev-static", COLLAPSED, acc=0.9, motion_ratio=0.3)
    proc = cli("rollouts", "evaluate", "default", "--wait", "--timeout", "180", expect=1)
    lines = proc.stdout.splitlines()
    assert lines[0].endswith(": rollback (rolled back)")
    assert "  - motion collapse flagged by evaluation ev-static" in lines
    assert any(ln.startswith("default  revision ") and f"current {GOOD}  canary -" in ln for ln in lines)
    assert "Ready True" in proc.stdout  # --wait: every replica serves the rollback
    assert metric(url, "huvidpo_controlplane_rollout_gate_decisions_total", decision="rollback") == 1
    assert metric(url, "huvidpo_controlplane_rollout_automatic_rollbacks_total", deployment="default") == 1
    assert metric(url, "huvidpo_controlplane_rollout_gate_decisions_total", decision="wait") >= 1

    # the history tells the story: who decided what, and why
    hist = cli("rollouts", "history", "default").stdout.splitlines()
    gate = [ln for ln in hist if "gate: " in ln]
    assert [ln.split("gate: ")[1] for ln in gate][-2:] == ["promote", "rollback"]
    assert all("by rollout-gate" in ln for ln in gate)
    i = hist.index(gate[-1])
    assert hist[i + 1] == "    - motion collapse flagged by evaluation ev-static"
    assert "    - held-out implicit accuracy 0.850 >= 0.8 (evaluation ev-good)" in hist

    transcript = "\n".join(cli.transcript)
    if os.environ.get("HUVIDPO_GATE_TRANSCRIPT"):
        Path(os.environ["HUVIDPO_GATE_TRANSCRIPT"]).write_text(transcript)
    print(transcript)
