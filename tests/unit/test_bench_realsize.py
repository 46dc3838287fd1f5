"""bench/realsize.py --estimate: the real-size model on fake tensors, at a reduced clip size so it stays
fast (the full-size estimate takes about 90 s on a 2-core machine, so it is not run here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--estimate", "--json", "--height", "64", "--width", "64", "--precisions", "bf16"]


def _realsize() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_realsize", REPO / "bench" / "realsize.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    return mod


def _estimate(*args: str) -> dict[str, Any]:
    result: dict[str, Any] = _realsize().main([*SMALL, *args])
    return result


def test_estimate_counts_the_input_conv_exactly_and_unet_flops_grow_linearly_with_frames() -> None:
    two = _estimate("--frames", "2", "--parts", "forward")
    four = _estimate("--frames", "4", "--parts", "forward")
    for frames, r in ((2, two), (4, four)):
        f = r["unet_forward"]
        # conv_in: 3x3, 4 -> 320 channels, on every frame of the CFG batch (2 clips), 8x8 latents;
        # a multiply-add counts as 2 FLOPs.
        assert f["conv_in_conv2d_flops"] == 2 * (2 * frames) * (8 * 8) * 320 * 4 * 9
        assert f["flops_by_op"]["_scaled_dot_product_flash_attention_for_cpu"] > 0  # attention counted
        # bf16 frozen weights plus the fp32 LoRA (disabled, but allocated), all on the fake device
        assert f["bf16"]["weights_bytes"] == 2 * r["params"]["unet"] + 4 * r["params"]["lora"]
        assert f["bf16"]["peak_bytes"] > f["bf16"]["weights_bytes"]
    assert two["params"]["unet"] == pytest.approx(1101.1e6, abs=0.1e6)  # the real-size UNet
    # SparseCausal attention keys are 2 frames whatever the clip length: linear, up to the small
    # temporal attention (quadratic in frames)
    assert four["unet_forward"]["flops"] / two["unet_forward"]["flops"] == pytest.approx(2.0, rel=0.05)


@pytest.mark.slow
def test_estimate_of_a_dpo_step_checkpointing_costs_flops_and_saves_memory() -> None:
    r = _estimate("--frames", "2", "--parts", "dpo")
    on, off = (next(x for x in r["dpo_step"] if x["checkpointing"] is c) for c in (True, False))
    # policy forward + backward to the inputs (frozen weights: no weight gradients) + reference
    # forward: about 3 forwards; checkpointing recomputes the policy forward once more
    assert 2.5 < off["flops"] / r["unet_forward"]["flops"] < 3.6
    assert 1.1 < r["ratio_flops_ckpt_over_no_ckpt"] < 1.45
    assert on["above_weights_bytes"] < off["above_weights_bytes"]
    assert on["weights_bytes"] == off["weights_bytes"] == 2 * r["params"]["unet"] + 4 * r["params"]["lora"]
