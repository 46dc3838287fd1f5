"""Opt-in ``torch.compile`` of the UNet (``compile`` setting) on the tiny model, on the CPU.

``fullgraph=True`` makes a graph break an error, so these runs also prove the UNet traces whole (its
SparseCausal gather has no host sync). The tests use the tracing backends (``eager``: Dynamo only;
``aot_eager``: forward and backward through AOTAutograd): inductor's code generation takes minutes on
this CPU and adds nothing these checks need; it is what a GPU runs (bench/realsize.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from huvidpo.data import make_synthetic_dataset
from huvidpo.pipeline import GenerationConfig, HuViDPOPipeline
from huvidpo.precision import compile_unet
from huvidpo.training import CallbackBase, ConfigError, DPOConfig, run_dpo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_a_compiled_pipeline_generates_the_same_video(tiny_model_dir: Path) -> None:
    cfg = GenerationConfig(num_frames=4, height=64, width=64, steps=3, guidance_scale=7.5, seed=5)
    frame = np.full((64, 64, 3), 120, dtype=np.uint8)
    plain = HuViDPOPipeline.from_pretrained(tiny_model_dir)("a square", frame, cfg).frames
    pipe = HuViDPOPipeline.from_pretrained(tiny_model_dir)
    unet = pipe.components.unet
    assert compile_unet(unet, "eager") is unet  # in place: names and adapters unchanged
    compiled = pipe("a square", frame, cfg).frames
    assert np.abs(compiled.astype(int) - plain.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="compile must be one of off, inductor"):
        compile_unet(unet, "fast")


class _Rows(CallbackBase):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_step(self, metrics: dict[str, Any]) -> None:
        self.rows.append(metrics)


def test_dpo_trains_compiled_with_the_losses_of_the_plain_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = make_synthetic_dataset(tmp_path / "data", n_prompts=1, videos_per_prompt=2, num_frames=4, size=64)
    losses = {}
    for backend in ("off", "aot_eager"):
        cfg = DPOConfig(
            model=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / backend), num_frames=4,
            height=64, width=64, max_steps=2, lora_rank=2, device="cpu", plot=False, compile=backend,
            gradient_checkpointing=False,
        )  # fmt: skip
        rows = _Rows()
        run_dpo(cfg, [rows])
        losses[backend] = [r["loss"] for r in rows.rows]
    assert losses["aot_eager"] == pytest.approx(losses["off"], rel=1e-4, abs=1e-6)
    with pytest.raises(ConfigError) as err:
        DPOConfig.from_mapping(
            {"model": "m", "dataset": "d", "output_dir": "o", "compile": "fast"}
        ).validate()
    assert err.value.field == "compile"
