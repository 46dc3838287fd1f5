"""Stage 1 trains exactly the pattern-selected parameters; the CLI runs it end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from huvidpo.cli import main
from huvidpo.data import make_synthetic_dataset
from huvidpo.models import DEFAULT_STAGE1_PATTERNS, VideoUNet, load_components
from huvidpo.training import ConfigError, Stage1Config, run_stage1

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stage1-data")
    return make_synthetic_dataset(
        root / "data", n_prompts=1, videos_per_prompt=2, num_frames=6, size=64, seed=2
    )


def _state(unet: VideoUNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def test_cli_stage1_trains_only_the_selected_parameters(
    tiny_model_dir: Path, clips: Path, tmp_path: Path
) -> None:
    before = _state(load_components(tiny_model_dir).unet)
    out = tmp_path / "s1"
    rc = main(["train", "stage1", "--model", str(tiny_model_dir), "--dataset", str(clips), "--out", str(out),
               "--num-frames", "4", "--height", "64", "--width", "64", "--max-steps", "3", "--lr", "1e-3",
               "--checkpoint-every", "2", "--seed", "0", "--device", "cpu", "--quiet"])  # fmt: skip
    assert rc == 0
    after = _state(VideoUNet.from_pretrained_any(out / "unet"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    selected = {k for k in before if any(p in f"unet.{k}" or p in k for p in DEFAULT_STAGE1_PATTERNS)}
    assert changed, "nothing trained"
    assert changed <= selected
    assert any(".conv1d." in k for k in changed) and any("attn1.to_q" in k for k in changed)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["peak_memory_bytes"] > 0 and r["samples_per_second"] > 0 for r in rows)
    assert (out / "metrics.png").stat().st_size > 0
    assert (out / "checkpoints" / "ckpt-000003" / "state" / "trainable.safetensors").is_file()


def test_custom_patterns_on_a_plain_video_folder(tiny_model_dir: Path, clips: Path, tmp_path: Path) -> None:
    folder = clips / "videos"  # no manifest: one prompt for every clip
    cfg = Stage1Config(
        model=str(tiny_model_dir), dataset=str(folder), output_dir=str(tmp_path / "a"), num_frames=4, height=64,
        width=64, max_steps=2, lr=1e-3, trainable_patterns=("attn1.to_q.",), device="cpu", plot=False,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="prompt"):
        run_stage1(cfg)
    cfg.prompt = "a square slides to the right"
    before = _state(load_components(tiny_model_dir).unet)
    result = run_stage1(cfg)
    assert result.weights_dir is not None and result.steps == 2
    after = _state(VideoUNet.from_pretrained_any(result.weights_dir))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("attn1.to_q." in k for k in changed)


def test_checkpoint_every_0_checkpoints_only_at_the_end(
    tiny_model_dir: Path, clips: Path, tmp_path: Path
) -> None:
    # 2 clips, batch 1: 2 steps an epoch; 3 steps cross an epoch end, which writes no checkpoint.
    out = tmp_path / "s1"
    rc = main(["train", "stage1", "--model", str(tiny_model_dir), "--dataset", str(clips), "--out", str(out),
               "--num-frames", "4", "--height", "64", "--width", "64", "--max-steps", "3",
               "--checkpoint-every", "0", "--keep-last", "10", "--device", "cpu", "--quiet"])  # fmt: skip
    assert rc == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["ckpt-000003"]
