"""The evaluation on checkpoints trained with the learning test's configuration (tests/unit/
test_training_learning.py): one trained on pairs that prefer smooth motion beats its base on held-out
pairs it never saw."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from huvidpo.data import compile_pairs, load_dataset, make_synthetic_dataset, write_pairs
from huvidpo.evaluation import EvaluationSpec, run_evaluation
from huvidpo.training import DPOConfig, run_dpo
from tests.unit.test_training_learning import LEARNING, unit_variance_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_a_checkpoint_trained_on_smooth_preferred_pairs_beats_its_base_on_heldout_pairs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = unit_variance_model(tiny_model_dir, tmp_path / "model")
    data = make_synthetic_dataset(
        tmp_path / "data",
        n_prompts=4,
        videos_per_prompt=20,
        num_frames=4,
        size=64,
        raters=2,
        seed=0,
        speed=1.0,
    )
    cfg = DPOConfig(
        model=str(model), dataset=str(data), output_dir=str(tmp_path / "run"), seed=0, device="cpu",
        **LEARNING,  # type: ignore[arg-type]
    )  # fmt: skip
    result = run_dpo(cfg)
    # The held-out pairs: those between two of the videos the run held out (it never trained on them).
    held = set(result.data_report["heldout_videos"])
    pairs = [
        p
        for p in compile_pairs(load_dataset(data), seed=cfg.seed).pairs
        if {p.chosen_id, p.rejected_id} <= held
    ]
    assert len(pairs) == 64
    write_pairs(pairs, tmp_path / "heldout.jsonl")
    spec = EvaluationSpec(
        model=str(model),
        checkpoints={"smooth": str(result.weights_dir)},
        output_dir=str(tmp_path / "eval"),
        heldout_pairs=str(tmp_path / "heldout.jsonl"),
        dataset=str(data),
        dpo=DPOConfig.load(tmp_path / "run" / "config.json"),
        device="cpu",
    )  # fmt: skip
    report = run_evaluation(spec)
    held_out = report["results"]["smooth"]["heldout"]
    assert held_out["pairs"] == 64 and len(held_out["per_prompt"]) == 4
    # The base is the reference: its reward margin is 0 on every pair, i.e. chance. The checkpoint
    # ranks the held-out pairs as the raters did, well above it (the learning test's bound).
    assert report["heldout_reward_margin"] > 0
    assert report["heldout_implicit_acc"] >= 0.75, report["results"]["smooth"]["heldout"]
