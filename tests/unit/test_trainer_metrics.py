"""The trainer's /metrics: gauges follow each step's metrics and are served over HTTP while it trains."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from services.trainer.metrics import TrainerMetrics


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("huvidpo_trainer_")
    }


def test_step_metrics_are_served_and_missing_keys_leave_gauges_alone() -> None:
    m = TrainerMetrics()
    port = m.serve(0, "127.0.0.1")
    try:
        m.on_step({"step": 3, "loss": 0.69, "implicit_acc": 1.0, "reward_margin": 0.02, "step_seconds": 0.5})
        m.on_step({"step": 4, "loss": 0.5})  # a step without DPO reward metrics (e.g. stage 1)
        m.on_checkpoint(Path("unused"), 4)
        got = _scrape(port)
    finally:
        m.stop()
    assert got["huvidpo_trainer_step"] == 4
    assert got["huvidpo_trainer_loss"] == 0.5
    assert got["huvidpo_trainer_implicit_reward_accuracy"] == 1.0
    assert got["huvidpo_trainer_reward_margin"] == 0.02
    assert got["huvidpo_trainer_steps_total"] == 2
    assert got["huvidpo_trainer_checkpoints_total"] == 1
