"""Training memory settings: gradient checkpointing ``auto`` and the clip source holding nothing on
the device between steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from huvidpo.models import load_components
from huvidpo.training import common
from huvidpo.training.config import ConfigError, DPOConfig


def test_gradient_checkpointing_takes_auto_true_and_false_and_refuses_anything_else() -> None:
    base = {"model": "m", "dataset": "d", "output_dir": "o"}
    assert DPOConfig.from_mapping(base).gradient_checkpointing == "auto"
    assert DPOConfig.from_mapping({**base, "gradient_checkpointing": "off"}).gradient_checkpointing is False
    assert DPOConfig.from_mapping({**base, "gradient_checkpointing": True}).gradient_checkpointing is True
    with pytest.raises(ConfigError) as err:
        DPOConfig.from_mapping({**base, "gradient_checkpointing": "sometimes"})
    assert err.value.field == "gradient_checkpointing"


def test_auto_checkpoints_only_when_the_estimated_step_exceeds_the_device(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet = load_components(tiny_model_dir).unet
    cfg = DPOConfig(model="m", dataset="d", output_dir="o", num_frames=16, height=320, width=512)
    cpu = torch.device("cpu")
    need = common.estimate_step_bytes(unet, cfg, 2, torch.float32)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    assert need > weights
    # the estimate grows with the clips, their frames and their size
    assert common.estimate_step_bytes(unet, cfg, 4, torch.float32) > need
    assert common.estimate_step_bytes(unet, cfg, 2, torch.bfloat16) < need
    monkeypatch.setattr(common, "device_memory_bytes", lambda device: int(need / 0.9) + 1)
    on, why = common.use_checkpointing(cfg, unet, cpu, 2, torch.float32)
    assert not on and why.startswith("auto:") and "within" in why
    monkeypatch.setattr(common, "device_memory_bytes", lambda device: int(need / 0.9) - 1)
    on, why = common.use_checkpointing(cfg, unet, cpu, 2, torch.float32)
    assert on and "over" in why
    cfg.gradient_checkpointing = False
    assert common.use_checkpointing(cfg, unet, cpu, 2, torch.float32) == (False, "set in the config")


def test_the_real_size_estimate_reproduces_the_benchmark_figures() -> None:
    """At SD-1.x width and 16 x 320 x 512 the activation estimate is bench/realsize.py's (30.9 GiB bf16,
    45.4 GiB fp32 for one pair), the figures the constants come from."""

    class Unet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = type("U", (), {"config": type("C", (), {"block_out_channels": (320, 640)})})()

    cfg = DPOConfig(model="m", dataset="d", output_dir="o", num_frames=16, height=320, width=512)
    assert common.estimate_step_bytes(Unet(), cfg, 2, torch.bfloat16) / 2**30 == pytest.approx(30.9)
    assert common.estimate_step_bytes(Unet(), cfg, 2, torch.float32) / 2**30 == pytest.approx(45.4)


def test_clip_source_returns_a_fresh_tensor_each_time(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Nothing is kept on the device between steps (the cache keeps its bounded host copy): each call
    gives a new tensor with the same values, so a step that changed its batch in place cannot change
    the next one's."""
    from huvidpo.data import load_dataset, make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "ds", n_prompts=1, videos_per_prompt=2, num_frames=6)
    video = str(next(iter(load_dataset(root).videos.values())).path)
    components = load_components(tiny_model_dir)
    cfg = DPOConfig(
        model="m", dataset="d", output_dir=str(tmp_path / "out"), num_frames=4, height=64, width=64
    )
    source = common.make_clip_source(components, cfg, torch.device("cpu"), "digest")
    a = source.clip(video, 1, False)
    a.add_(1.0)
    b = source.clip(video, 1, False)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert torch.allclose(a - 1.0, b, atol=1e-6)
    assert source.cache is not None and source.cache.vae_calls == 1
