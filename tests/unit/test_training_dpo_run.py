"""``huvidpo train dpo`` end to end on the tiny model: outputs, metrics, cache use, precision rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from huvidpo.cli import main
from huvidpo.data import make_synthetic_dataset
from huvidpo.lora import load_lora
from huvidpo.models import load_components
from huvidpo.training import CallbackBase, ConfigError, DPOConfig, run_dpo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STEP_KEYS = {
    "loss", "implicit_acc", "reward_margin", "err_model_chosen", "err_model_rejected", "err_ref_chosen",
    "err_ref_rejected", "step_seconds", "samples_per_second", "peak_memory_bytes", "lr", "grad_norm",
}  # fmt: skip


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dpo-run-data")
    return make_synthetic_dataset(
        root / "data", n_prompts=2, videos_per_prompt=3, num_frames=4, size=64, seed=3
    )


def test_cli_dpo_writes_adapter_checkpoints_metrics_and_plot(
    tiny_model_dir: Path, pref_data: Path, tmp_path: Path
) -> None:
    cfg_file = tmp_path / "dpo.yaml"
    cfg_file.write_text("num_frames: 4\nheight: 64\nwidth: 64\nlora_rank: 2\nlora_alpha: 4\nbeta: 50\n")
    out = tmp_path / "run"
    rc = main(["train", "dpo", "--config", str(cfg_file), "--model", str(tiny_model_dir), "--dataset",
               str(pref_data), "--out", str(out), "--epochs", "2", "--checkpoint-every", "3", "--keep-last", "1",
               "--lr", "1e-3", "--device", "cpu", "--quiet"])  # fmt: skip
    assert rc == 0
    # 2 prompts x (2 smooth x 1 flicker) = 4 pairs (ties dropped), batch 1, 2 epochs = 8 steps.
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r.keys() >= STEP_KEYS for r in rows)
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at init
    assert all(r["lr"] == pytest.approx(1e-3) for r in rows)  # constant schedule, stepped
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["ckpt-000008"]  # keep_last 1
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "config.json").read_text())
    assert saved["lora_rank"] == 2 and saved["epochs"] == 2 and saved["beta"] == 50.0
    # The adapter loads strictly onto the base model and changes its output.
    comps = load_components(tiny_model_dir)
    x, t, text = torch.randn(1, 4, 4, 8, 8), torch.tensor([500]), torch.randn(1, 16, 32)
    with torch.no_grad():
        base = comps.unet(x, t, text)
        load_lora(comps.unet, out / "adapter", adapter="trained")
        tuned = comps.unet(x, t, text)
    assert not torch.allclose(base, tuned)
    # Later epochs ran no VAE: the cache holds one entry per (clip, flip) variant and one prompt each.
    cache = out / "cache"
    assert len(list((cache / "latents").rglob("*.safetensors"))) <= 6 * 2
    assert len(list((cache / "text").rglob("*.safetensors"))) == 2


def test_bf16_autocast_keeps_fp32_lora_and_fp16_needs_cuda(
    tiny_model_dir: Path, pref_data: Path, tmp_path: Path
) -> None:
    cfg = DPOConfig(
        model=str(tiny_model_dir), dataset=str(pref_data), output_dir=str(tmp_path / "bf16"), num_frames=4,
        height=64, width=64, max_steps=2, lora_rank=2, mixed_precision="bf16", device="cpu", plot=False,
    )  # fmt: skip
    result = run_dpo(cfg)
    assert result.weights_dir is not None
    weights = load_file(str(result.weights_dir / "adapter_model.safetensors"))
    assert weights and all(v.dtype == torch.float32 for v in weights.values())
    assert all(torch.isfinite(v).all() for v in weights.values())
    if not torch.cuda.is_available():
        cfg.mixed_precision = "fp16"
        cfg.output_dir = str(tmp_path / "fp16")
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            run_dpo(cfg)


class _CheckpointSteps(CallbackBase):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.rows: list[dict[str, float]] = []

    def on_step(self, metrics: dict[str, Any]) -> None:
        self.rows.append(metrics)

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.steps.append(step)


def test_checkpoint_every_0_checkpoints_only_at_the_end(
    tiny_model_dir: Path, pref_data: Path, tmp_path: Path
) -> None:
    # 4 pairs, batch 1: 4 steps an epoch, 2 epochs. "0: only at the end", not once per epoch.
    cfg = DPOConfig(
        model=str(tiny_model_dir), dataset=str(pref_data), output_dir=str(tmp_path / "run"), num_frames=4,
        height=64, width=64, epochs=2, checkpoint_every=0, keep_last=10, lora_rank=2, device="cpu", plot=False,
    )  # fmt: skip
    seen = _CheckpointSteps()
    result = run_dpo(cfg, [seen])
    assert result.steps == 8 and seen.steps == [8]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["ckpt-000008"]


def test_shared_noise_timestep_false_gives_the_rejected_clip_its_own_draws(
    tiny_model_dir: Path, pref_data: Path, tmp_path: Path
) -> None:
    rows = {}
    for shared in (True, False):
        cfg = DPOConfig(
            model=str(tiny_model_dir), dataset=str(pref_data), output_dir=str(tmp_path / f"run-{shared}"),
            num_frames=4, height=64, width=64, max_steps=2, lora_rank=2, device="cpu", plot=False,
            shared_noise_timestep=shared,
        )  # fmt: skip
        seen = _CheckpointSteps()
        run_dpo(cfg, [seen])
        rows[shared] = seen.rows[0]
    # The chosen clip's draws are the same either way; the rejected one's differ when not shared.
    assert rows[False]["err_model_chosen"] == pytest.approx(rows[True]["err_model_chosen"], rel=1e-6)
    assert rows[False]["err_model_rejected"] != pytest.approx(rows[True]["err_model_rejected"], rel=1e-3)
    assert rows[False]["err_ref_rejected"] != pytest.approx(rows[True]["err_ref_rejected"], rel=1e-3)
