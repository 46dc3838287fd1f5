"""DPO learns a preference it is shown: chosen = a square moving smoothly, rejected = a square
flickering. Trained on CPU with the tiny model, the implicit reward accuracy on held-out pairs (built
only from videos the run never trained on) ends well above chance."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from huvidpo.data import make_synthetic_dataset
from huvidpo.training import DPOConfig, run_dpo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Why this set-up (each point measured; see the table below):
# - The tiny random VAE at SD's scaling factor 0.18215 gives latents of std ~0.06, so the noise drowns
#   the clips at almost every timestep and the model can only memorise its training clips (training
#   accuracy 1.0 at every timestep, even t=950, through the clean frame 0, at seeds 0 and 4; held-out
#   accuracy on 64 pairs 0.41-0.48 at seeds 0-4). SD chooses its factor so latents have unit variance; 3.0 does that for the
#   tiny VAE (std ~0.97), so the test uses a copy of the tiny model with that factor.
# - At the default speed (size/16 = 4 px/frame) the random VAE's latents change as much between frames
#   for a smoothly moving square as for a flickering one (mean squared change vs frame 0: 0.00144 vs
#   0.00159; only 63% of (flicker, smooth) pairs are ordered by it); at 1 px/frame it is 0.00074 vs
#   0.00155 (98%). The smooth squares move at 1 px/frame.
# - Timesteps in [0, 150) for training and evaluation: noise std below 0.45 against unit-variance
#   latents, where smooth and flickering clips differ visibly (t < 300 was worse, see below).
# - 20 videos per prompt (10 smooth, 10 flickering), 8 held out per prompt: 64 held-out pairs (one pair
#   moves the accuracy by 1/64, not 1/16) and 48 training videos (fewer invites memorising).
LEARNING = dict(
    num_frames=4, height=64, width=64, batch_size=4, max_steps=120, lr=5e-3, beta=50.0,
    lora_rank=4, lora_alpha=4, lora_dropout=0.0,
    lora_targets=r".*\.(attn1|attn2|attn_temp)\.(to_q|to_k|to_v|to_out\.0)|.*\.conv1d",
    gradient_checkpointing=False, holdout_by="video", holdout_fraction=0.4, eval_draws=8, hflip_p=0.5,
    timestep_max=150, checkpoint_every=120, plot=False,
)  # fmt: skip
LATENT_SCALE = 3.0

# Measured (held-out implicit accuracy on 64 pairs / reward margin / run_dpo wall s / load average):
#   this config (120 steps), training seeds 0-4 on dataset seed 0:
#     0.891/0.828/0.875/0.875/0.9375, margin 2.91/1.65/4.72/2.39/3.16, loss (mean of first -> last 20
#     steps) 0.65->0.03, 0.66->0.10, 0.64->0.07, 0.66->0.09, 0.62->0.07; 85-118 s, two runs side by side on
#     the 2 cores (load 1.9-2.3). Dataset seed 1, training seed 1: 0.9375 (margin 6.62, 99 s).
#   this test as written (training seed 0, one thread): passed twice, 88.6 s and 83.8 s for the test
#     (pytest 94 s and 89 s), load 1.4 and 1.0.
#   the same at 100 steps: 0.859/0.750/0.859/0.922/0.891, margin 1.79/1.19/3.69/1.48/1.49, 80-91 s
#     alone at load 1.2-3.8; dataset seed 1 at training seed 0: 1.0 (margin 6.6). Seed 1 sat exactly
#     on the bound, hence 120 steps.
#   rejected, all at training seeds 0-4 unless listed (16 held-out pairs where marked *):
#     the previous config (10 videos per prompt, factor 0.18215, 4 px/frame, t < 1000, 60 steps)*:
#       0.8125/0.875/0.75/0.5625/0.625; with t < 400*: seeds 3/4 0.625/0.5; with 1 px/frame*:
#       0.5625/0.625/0.625/0.9375/0.4375.
#     the previous config with 20 videos per prompt (64 held-out pairs): 0.453/0.484/0.406/0.438/0.469,
#       i.e. chance: its 16-pair scores were memorising plus the granularity of 16 pairs. Plus factor
#       3.0: seeds 0-2 0.531/0.469/0.703. Plus 1 px/frame and t < 300: 0.797/0.656/0.781. With t < 150
#       (60 steps): seeds 0-2 0.828/0.656/0.828; seed 1 with 32 eval draws instead of 8: 0.672.


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train on one torch thread. With two threads on a 2-core machine that another job also loads,
    OpenMP threads wait on each other: a step took 27 s instead of ~0.5 s (measured). One thread also
    makes the numbers the same as those recorded above."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def unit_variance_model(tiny_model_dir: Path, dest: Path) -> Path:
    """A copy of the tiny model whose VAE scaling factor gives latents of about unit variance."""
    shutil.copytree(tiny_model_dir, dest)
    cfg_path = dest / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["scaling_factor"] = LATENT_SCALE
    cfg_path.write_text(json.dumps(cfg))
    return dest


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_dpo_prefers_smooth_motion_on_heldout_pairs(
    tiny_model_dir: Path, tmp_path: Path, precision: str
) -> None:
    """``bf16``: what a GPU runs by default (autocast in bf16, frozen weights bf16, LoRA fp32), here
    on the CPU, which supports it: the run still learns the preference."""
    model = unit_variance_model(tiny_model_dir, tmp_path / "model")
    data = make_synthetic_dataset(
        tmp_path / "data", n_prompts=4, videos_per_prompt=20, num_frames=4, size=64, raters=2, seed=0,
        speed=1.0,
    )  # fmt: skip
    cfg = DPOConfig(
        model=str(model), dataset=str(data), output_dir=str(tmp_path / "run"), seed=0, device="cpu",
        mixed_precision=precision, **LEARNING,  # type: ignore[arg-type]
    )  # fmt: skip
    result = run_dpo(cfg)
    report = result.data_report
    # Per prompt 10 smooth and 10 flickering clips; 8 of them (4 + 4) held out: 4 x 4 x 4 held-out
    # pairs, 4 x 6 x 6 training pairs; pairs mixing the two splits and tied pairs are dropped.
    assert report["ties_dropped"] > 0
    assert (report["heldout_pairs"], report["train_pairs"]) == (64, 144)
    held = report["heldout_videos"]
    assert sorted(v.split("_")[0] for v in held) == [f"p{p}" for p in range(4) for _ in range(8)]
    rows = [json.loads(x) for x in result.metrics_path.read_text().splitlines()]
    assert len(rows) == 120
    first, last = rows[:20], rows[-20:]
    assert sum(r["loss"] for r in last) / len(last) < sum(r["loss"] for r in first) / len(first)
    assert result.eval_metrics["eval_pairs"] == 64
    assert result.eval_metrics["eval_reward_margin"] > 0
    assert result.eval_metrics["eval_implicit_acc"] >= 0.75, result.eval_metrics
