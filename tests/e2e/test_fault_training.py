"""Faults during a fine-tune, through the whole system (control plane process, local executor,
trainer processes, store): nothing is lost.

- the trainer killed (SIGKILL) mid-run: the executor retries it and it resumes from its last
  published checkpoint, every step trained once after it;
- the control plane killed and restarted mid fine-tune: the new process reports the running
  fine-tune (the trainer kept going) and then its success, with one Job only.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from demo.loop import LoopOptions, make_rated_videos
from demo.stack import Stack

pytestmark = pytest.mark.slow


def _start_finetune(running: Any, tmp_path: Path, steps: int, checkpoint_every: int) -> dict[str, Any]:
    opts = LoopOptions(
        prompts=2,
        videos_per_prompt=2,
        video_frames=6,
        video_size=32,
        train_steps=steps,
        checkpoint_every=checkpoint_every,
        train_frames=4,
        train_size=32,
    )
    data = make_rated_videos(tmp_path / "videos", opts)
    running.cp.datasets.create("faults", exist_ok=True)
    version = running.cp.datasets.upload("faults", data)
    return running.cp.fine_tunes.create("faults", version["id"], "tiny", opts.hyperparameters())


def _trainer_process(stack: Stack, finetune_id: str) -> psutil.Process:
    """The trainer (child of the executor's supervisor) of a fine-tune."""
    run = json.loads((stack.work_dir / "controlplane" / "runs" / finetune_id / "run.json").read_text())
    supervisor = psutil.Process(int(run["pid"]))
    deadline = time.monotonic() + 60
    while True:
        children = supervisor.children()
        if children:
            return children[0]
        assert time.monotonic() < deadline, "the supervisor started no trainer"
        time.sleep(0.2)


def test_trainer_killed_mid_run_resumes_from_its_last_checkpoint(make_stack: Any, tmp_path: Path) -> None:
    running = make_stack(inference=False)
    ft = _start_finetune(running, tmp_path, steps=6, checkpoint_every=2)
    # wait for the first published checkpoint, then kill the trainer without warning
    view = running.cp.fine_tunes.wait(
        ft["id"], until=lambda v: len(v["checkpoints"]) >= 1, timeout=600, interval=0.3
    )
    assert view["state"] == "running", view
    first = _trainer_process(running.stack, ft["id"])
    killed_after = max(int(c.rsplit("-", 1)[1]) for c in running.cp.fine_tunes.get(ft["id"])["checkpoints"])
    first.send_signal(signal.SIGKILL)
    first.wait(30)

    view = running.cp.fine_tunes.wait(ft["id"], timeout=600)
    assert view["state"] == "succeeded", view
    p = view["progress"]
    assert p["step"] == 6 and p["attempts"] == 2
    assert p["resumed_from_step"] is not None and p["resumed_from_step"] >= killed_after
    assert view["checkpoints"] == [f"ckpt-{ft['id']}-{s}" for s in (2, 4, 6)]
    # the second attempt trained exactly the steps after its resume point, once each
    records = [
        json.loads(ln)
        for ln in running.store.get_bytes(f"finetunes/{ft['id']}/progress.jsonl").splitlines()
        if ln.strip()
    ]
    starts = [i for i, r in enumerate(records) if r["event"] == "start"]
    assert len(starts) == 2
    resumed = records[starts[1]]["resumed_from_step"]
    second = [r["step"] for r in records[starts[1] :] if r["event"] == "step"]
    assert second == list(range(resumed + 1, 7))
    # the resumed checkpoint's lineage still names the fine-tune and its dataset
    final = running.cp.checkpoints.get(view["checkpoints"][-1])
    assert final["lineage"]["finetune_id"] == ft["id"]
    assert final["lineage"]["dataset_digest"] == view["lineage"]["dataset_digest"]


def test_control_plane_restarted_mid_finetune_reports_the_right_state(
    make_stack: Any, tmp_path: Path
) -> None:
    running = make_stack(inference=False)
    stack: Stack = running.stack
    ft = _start_finetune(running, tmp_path, steps=6, checkpoint_every=3)
    running.cp.fine_tunes.wait(
        ft["id"], until=lambda v: (v["progress"]["step"] or 0) >= 1, timeout=600, interval=0.3
    )
    trainer = _trainer_process(stack, ft["id"])

    assert stack.controlplane is not None
    old_pid = stack.controlplane.pid
    stack.controlplane.stop(kill=True)  # SIGKILL: no graceful shutdown, nothing flushed
    assert trainer.is_running(), "the trainer must outlive the control plane"
    stack.start_controlplane()
    assert stack.controlplane.pid != old_pid

    view = running.cp.fine_tunes.get(ft["id"])
    trainer_alive = trainer.is_running() and trainer.status() != psutil.STATUS_ZOMBIE
    assert view["state"] == ("running" if trainer_alive else "succeeded"), view
    view = running.cp.fine_tunes.wait(ft["id"], timeout=600)
    assert view["state"] == "succeeded", view
    assert view["progress"]["step"] == 6 and view["progress"]["attempts"] == 1
    assert view["checkpoints"] == [f"ckpt-{ft['id']}-3", f"ckpt-{ft['id']}-6"]
    # one fine-tune, one Job: the restart submitted nothing again
    listed = list(running.cp.fine_tunes.list())
    assert [f["id"] for f in listed] == [ft["id"]]
    runs = os.listdir(stack.work_dir / "controlplane" / "runs")
    assert runs == [ft["id"]]
