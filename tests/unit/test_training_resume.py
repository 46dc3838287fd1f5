"""A DPO run stopped (or killed) mid-way and resumed ends with the same LoRA weights as a run that
was never interrupted (CPU, fixed seed; LoRA dropout and random flips on, so RNG state matters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from huvidpo.data import make_synthetic_dataset
from huvidpo.training import CallbackBase, DPOConfig, list_checkpoints, run_dpo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume-data")
    return make_synthetic_dataset(
        root / "data", n_prompts=2, videos_per_prompt=2, num_frames=4, size=64, seed=1
    )


def _cfg(model: Path, data: Path, out: Path, cache: Path) -> DPOConfig:
    return DPOConfig(
        model=str(model), dataset=str(data), output_dir=str(out), cache_dir=str(cache),
        num_frames=4, height=64, width=64, max_steps=4, checkpoint_every=2, keep_last=2,
        lora_rank=2, lora_alpha=2, lora_dropout=0.1, lr=1e-3, hflip_p=0.5, seed=5, device="cpu", plot=False,
    )  # fmt: skip


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


class _Crash(CallbackBase):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step(self, metrics: dict[str, Any]) -> None:
        if metrics["step"] == self.at_step:
            raise KeyboardInterrupt("simulated kill")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_stopped_and_killed_runs_resume_to_the_same_weights(
    tiny_model_dir: Path, pref_data: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    full = run_dpo(_cfg(tiny_model_dir, pref_data, tmp_path / "full", cache))
    assert full.steps == 4 and not full.stopped and full.weights_dir is not None
    reference = _weights(tmp_path / "full")
    assert any(float(v.abs().sum()) > 0 for k, v in reference.items() if "lora_B" in k)  # it trained

    # Graceful stop after 3 steps (a checkpoint is written at the stop, off the 2-step period), then resume.
    steps_seen: list[int] = []

    class Count(CallbackBase):
        def on_step(self, metrics: dict[str, Any]) -> None:
            steps_seen.append(metrics["step"])

    out = tmp_path / "stopped"
    first = run_dpo(
        _cfg(tiny_model_dir, pref_data, out, cache),
        callbacks=[Count()],
        should_stop=lambda: len(steps_seen) >= 3,
    )
    assert first.stopped and first.steps == 3 and first.weights_dir is None
    assert first.last_checkpoint is not None and first.last_checkpoint.name == "ckpt-000003"
    second = run_dpo(_cfg(tiny_model_dir, pref_data, out, cache), resume=True)
    assert second.resumed_from == first.last_checkpoint and second.steps == 4
    _assert_same(reference, _weights(out))

    # A kill after step 3: the run restarts from the last periodic checkpoint (step 2).
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_dpo(_cfg(tiny_model_dir, pref_data, out, cache), callbacks=[_Crash(3)])
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["ckpt-000002"]
    resumed = run_dpo(_cfg(tiny_model_dir, pref_data, out, cache), resume=True)
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "ckpt-000002"
    _assert_same(reference, _weights(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3 ran twice but is logged once
    names = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert names == ["ckpt-000002", "ckpt-000004"]


def test_resume_refuses_a_changed_config(tiny_model_dir: Path, pref_data: Path, tmp_path: Path) -> None:
    from huvidpo.training import CheckpointError

    cfg = _cfg(tiny_model_dir, pref_data, tmp_path / "run", tmp_path / "cache")
    cfg.max_steps = 2
    run_dpo(cfg)
    cfg.beta = 10.0
    cfg.max_steps = 4
    with pytest.raises(CheckpointError, match="beta"):
        run_dpo(cfg, resume=True)
