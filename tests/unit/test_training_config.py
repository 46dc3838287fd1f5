"""Trainer configs: defaults from the spec, YAML/JSON files, flag overrides and clear errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from huvidpo.models import DEFAULT_STAGE1_PATTERNS
from huvidpo.training.cli import add_config_flags, config_from_args, register
from huvidpo.training.config import ConfigError, DPOConfig, Stage1Config


def test_defaults_follow_the_spec() -> None:
    d = DPOConfig()
    assert (d.beta, d.reference, d.lora_rank, d.lora_alpha, d.lora_dropout) == (
        50.0,
        "adapter_disabled",
        16,
        32.0,
        0.1,
    )
    assert (d.lr, d.weight_decay, d.adam_eps, d.epochs, d.grad_clip) == (1e-4, 1e-4, 1e-8, 12, 1.0)
    assert (d.tie_policy, d.min_margin, d.margin_weighting, d.sft_weight) == ("drop", 0.0, False, 0.0)
    assert (
        d.shared_noise_timestep and d.cache_latents and d.gradient_checkpointing and d.loss_skip_first_frame
    )
    s = Stage1Config()
    assert s.trainable_patterns == DEFAULT_STAGE1_PATTERNS
    assert (s.lr, s.weight_decay, s.max_steps, s.checkpoint_every, s.seed) == (3e-5, 1e-2, 25_000, 5_000, 33)
    assert (s.num_frames, s.height, s.width, s.hflip_p) == (16, 320, 512, 0.5)


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "dpo.yaml"
    f.write_text(
        "beta: 25\nlora-rank: 8\nlr: 3.0e-4\nmax_steps: 1e3\nmargin_weighting: true\nlora_targets: temporal\n"
    )
    cfg = DPOConfig.load(f, {"beta": 10.0, "lr": None, "model": "m", "dataset": "d", "output_dir": "o"})
    assert cfg.beta == 10.0  # flag wins
    assert cfg.lora_rank == 8 and cfg.lr == 3e-4 and cfg.max_steps == 1000 and cfg.margin_weighting
    assert cfg.lora_targets == "temporal"
    cfg.validate()
    j = tmp_path / "s1.json"
    j.write_text(json.dumps({"trainable_patterns": [".attn_temp."], "prompt": "turn to smile"}))
    s1 = Stage1Config.load(j)
    assert s1.trainable_patterns == (".attn_temp.",) and s1.prompt == "turn to smile"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("betta: 3\n", "unknown dpo training option 'betta'"),
        ("lora_rank: 2.5\n", "lora_rank"),
        ("gradient_checkpointing: maybe\n", "gradient_checkpointing"),
        ("- 1\n- 2\n", "top level must be a mapping"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        DPOConfig.load(f)
    assert err.value.field == (None if "top level" in message else content.split(":")[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"beta": 0.0}, "beta"),
        ({"height": 100}, "multiple of 8"),
        ({"reference": "copy"}, "reference"),
        ({"tie_policy": "coin"}, "tie_policy"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"num_frames": 1}, "num_frames"),
        ({"model": ""}, "model is required"),
        ({"first_frame_mode": "concat"}, "first_frame_mode"),
        ({"holdout_by": "rater"}, "holdout_by"),
    ],
)
def test_validate_rejects_bad_values(change: dict, message: str) -> None:
    values = {"model": "m", "dataset": "d", "output_dir": "o", **change}
    with pytest.raises(ConfigError, match=message) as err:
        DPOConfig.from_mapping(values).validate()
    assert err.value.field == next(iter(change))  # the option refused, for callers naming it


def test_every_field_is_a_flag_and_flags_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"beta": 5, "lora_rank": 4, "gradient_checkpointing": True}))
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path)
    add_config_flags(parser, DPOConfig)
    args = parser.parse_args(
        ["--config", str(f), "--model", "m", "--dataset", "d", "--out", "o", "--beta", "7",
         "--no-gradient-checkpointing", "--sft-weight", "0.5", "--lora-targets", "spatial"]
    )  # fmt: skip
    cfg = config_from_args(DPOConfig, args)
    assert isinstance(cfg, DPOConfig)
    assert (cfg.beta, cfg.lora_rank, cfg.gradient_checkpointing, cfg.sft_weight) == (7.0, 4, False, 0.5)
    assert (cfg.model, cfg.dataset, cfg.output_dir, cfg.lora_targets) == ("m", "d", "o", "spatial")


def test_train_subcommands_are_registered() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["train", "dpo", "--model", "m", "--dataset", "d", "--out", "o", "--resume"])
    assert a.stage == "dpo" and a.resume and a.output_dir == "o"
    b = parser.parse_args(["train", "stage1", "--model", "m", "--dataset", "d", "--out", "o",
                           "--trainable-patterns", ".attn_temp.", ".conv1d."])  # fmt: skip
    cfg = config_from_args(Stage1Config, b)
    assert isinstance(cfg, Stage1Config) and cfg.trainable_patterns == (".attn_temp.", ".conv1d.")


def test_mixed_precision_auto_is_bf16_on_cuda_and_none_on_the_cpu() -> None:
    import torch

    from huvidpo.training.common import mixed_precision, weight_dtype
    from huvidpo.training.config import DPOConfig

    assert DPOConfig().mixed_precision == "auto"
    on_cpu = DPOConfig(device="cpu")
    on_cuda = DPOConfig(device="cuda:0")
    assert (mixed_precision(on_cpu), weight_dtype(on_cpu)) == ("no", torch.float32)
    assert (mixed_precision(on_cuda), weight_dtype(on_cuda)) == ("bf16", torch.bfloat16)
    explicit = DPOConfig(device="cuda:0", mixed_precision="no")
    assert mixed_precision(explicit) == "no"
