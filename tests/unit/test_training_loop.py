"""The loop both trainers share: the gradient norm is logged whether or not clipping is on, and the
held-out evaluation measures exactly what the training step does."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from huvidpo.data import make_synthetic_dataset
from huvidpo.lora import lora_config, lora_parameters
from huvidpo.models.tiny import tiny_components
from huvidpo.training import DPOConfig, Stage1Config, run_stage1
from huvidpo.training.common import step_generator
from huvidpo.training.dpo import PairBatch, dpo_step, evaluate_pairs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stage1_logs_the_gradient_norm_with_clipping_off(tiny_model_dir: Path, tmp_path: Path) -> None:
    clips = make_synthetic_dataset(tmp_path / "data", n_prompts=1, videos_per_prompt=2, num_frames=4, size=64)

    def norms(grad_clip: float) -> list[float]:
        cfg = Stage1Config(
            model=str(tiny_model_dir), dataset=str(clips), output_dir=str(tmp_path / f"clip{grad_clip}"),
            cache_dir=str(tmp_path / "cache"), num_frames=4, height=64, width=64, max_steps=2, lr=1e-3,
            grad_clip=grad_clip, seed=0, device="cpu", plot=False,
        )  # fmt: skip
        result = run_stage1(cfg)
        return [json.loads(x)["grad_norm"] for x in result.metrics_path.read_text().splitlines()]

    off, never_clipping = norms(0.0), norms(1e9)  # 1e9: clipping measures the norm but never scales
    assert all(n > 0 for n in off), off
    assert off == pytest.approx(never_clipping, rel=1e-5)


def test_held_out_margin_is_the_training_steps_reward_margin_on_the_same_draws() -> None:
    comps = tiny_components(seed=0)
    unet = comps.unet
    unet.add_adapter(lora_config(rank=4, alpha=4, dropout=0.0), adapter_name="dpo")
    for name, p in lora_parameters(unet, "dpo").items():  # a policy that differs from the reference
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    g = torch.Generator().manual_seed(3)
    clips = {name: torch.randn(4, 4, 8, 8, generator=g) for name in ("a", "b", "c", "d")}
    text = torch.randn(16, 32, generator=g)
    source = SimpleNamespace(clip=lambda path, start, flip: clips[path], text=lambda prompt: text)
    pairs = [SimpleNamespace(chosen_id="a", rejected_id="b", prompt="p"),
             SimpleNamespace(chosen_id="c", rejected_id="d", prompt="p")]  # fmt: skip
    paths = {k: k for k in clips}
    cfg = DPOConfig(eval_draws=3, seed=7, beta=500.0)
    sched = comps.ddpm()

    got = evaluate_pairs(unet, pairs, paths, source, sched, cfg, pairs_per_forward=1)  # type: ignore[arg-type]

    # The same draws, through the training step: per pair, eval_draws rows of (chosen, rejected).
    k, span = cfg.eval_draws, (cfg.timestep_max - cfg.timestep_min) / cfg.eval_draws
    t = torch.tensor([int(cfg.timestep_min + (j + 0.5) * span) for j in range(k)])
    unet.eval()
    margins = []
    for i, p in enumerate(pairs):
        noise = torch.randn((k, 4, 4, 8, 8), generator=step_generator(cfg.seed, i, stream=99))
        batch = PairBatch(clips[p.chosen_id].expand(k, -1, -1, -1, -1), clips[p.rejected_id].expand(k, -1, -1, -1, -1),
                          text.expand(k, -1, -1), torch.ones(k))  # fmt: skip
        with torch.no_grad():
            _, stats = dpo_step(unet, unet, unet, sched, batch, t, noise, beta=cfg.beta)
        margins.append(stats.reward_margin)
    assert abs(margins[0] - margins[1]) > 1e-4  # two different pairs, not one measured twice
    assert got["eval_pairs"] == 2
    assert got["eval_reward_margin"] == pytest.approx(sum(margins) / 2, rel=1e-5, abs=1e-7)
    assert got["eval_implicit_acc"] == sum(m > 0 for m in margins) / 2


def test_evaluation_forwards_stay_under_the_pixel_budget_and_give_the_same_result() -> None:
    comps = tiny_components(seed=0)
    unet = comps.unet
    unet.add_adapter(lora_config(rank=4, alpha=4, dropout=0.0), adapter_name="dpo")
    g = torch.Generator().manual_seed(3)
    clips = {name: torch.randn(4, 4, 8, 8, generator=g) for name in "abcdef"}
    text = torch.randn(16, 32, generator=g)
    source = SimpleNamespace(clip=lambda path, start, flip: clips[path], text=lambda prompt: text)
    pairs = [SimpleNamespace(chosen_id=w, rejected_id=lo, prompt="p") for w, lo in ("ab", "cd", "ef")]
    paths = {k: k for k in clips}
    sizes: list[int] = []
    hook = unet.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    try:
        whole = evaluate_pairs(
            unet,
            pairs,
            paths,
            source,
            comps.ddpm(),
            DPOConfig(eval_draws=2, num_frames=4, height=64, width=64),
        )  # type: ignore[arg-type]
        big = len(sizes)
        per_pair = 2 * 2 * 4 * 64 * 64  # 2 clips x 2 draws, 4 frames of 64x64
        cfg = DPOConfig(eval_draws=2, num_frames=4, height=64, width=64, eval_batch_pixels=per_pair)
        sizes.clear()
        budgeted = evaluate_pairs(unet, pairs, paths, source, comps.ddpm(), cfg)  # type: ignore[arg-type]
    finally:
        hook.remove()
    assert big < len(sizes) and max(sizes) * 4 * 64 * 64 <= 2 * per_pair  # each forward: one pair's clips
    assert budgeted == pytest.approx(whole, rel=1e-5, abs=1e-6)


def test_the_reference_scores_chance_on_held_out_pairs_not_zero() -> None:
    """An adapter at its zero initialisation is the reference: every margin is exactly 0, a tie,
    which counts as half right (0.5), not as wrong."""
    comps = tiny_components(seed=0)
    unet = comps.unet
    unet.add_adapter(lora_config(rank=4, alpha=4, dropout=0.0), adapter_name="dpo")
    g = torch.Generator().manual_seed(3)
    clips = {name: torch.randn(4, 4, 8, 8, generator=g) for name in "abcd"}
    text = torch.randn(16, 32, generator=g)
    source = SimpleNamespace(clip=lambda path, start, flip: clips[path], text=lambda prompt: text)
    pairs = [SimpleNamespace(chosen_id=w, rejected_id=lo, prompt="p") for w, lo in ("ab", "cd")]
    got = evaluate_pairs(unet, pairs, {k: k for k in clips}, source, comps.ddpm(), DPOConfig(eval_draws=2))  # type: ignore[arg-type]
    assert got["eval_reward_margin"] == 0.0 and got["eval_implicit_acc"] == 0.5
