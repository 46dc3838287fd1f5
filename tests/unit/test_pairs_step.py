"""Pairs are a step of their own: training on a compiled ``pairs.jsonl`` gives exactly the pairs
that compiling with the same options and seed gives (what the preview showed the user)."""

from __future__ import annotations

from pathlib import Path

import pytest

from huvidpo.data import compile_pairs, load_dataset, make_synthetic_dataset, write_pairs
from huvidpo.training import ConfigError, DPOConfig
from huvidpo.training.dpo import prepare_pairs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("ds") / "d", n_prompts=2, videos_per_prompt=4, num_frames=4, size=32
    )


def _cfg(dataset: Path, tmp: Path, **kw: object) -> DPOConfig:
    return DPOConfig.from_mapping(
        {"model": "m", "dataset": str(dataset), "output_dir": str(tmp / "o"), "num_frames": 4, **kw}
    )


@pytest.mark.parametrize("tie_policy", ["drop", "keep"])
def test_training_on_compiled_pairs_equals_compiling_with_the_same_options_and_seed(
    dataset: Path, tmp_path: Path, tie_policy: str
) -> None:
    ds = load_dataset(dataset)
    compiled = compile_pairs(ds, tie_policy, 0.0, False, seed=7)
    pairs_file = write_pairs(compiled, tmp_path / "pairs.jsonl")
    opts = {"tie_policy": tie_policy, "seed": 7, "holdout_fraction": 0.25}
    from_file = prepare_pairs(_cfg(dataset, tmp_path, pairs_file=str(pairs_file), **opts))
    in_training = prepare_pairs(_cfg(dataset, tmp_path, **opts))
    assert from_file.train and from_file.train == in_training.train
    assert from_file.heldout == in_training.heldout


def test_the_pairs_file_wins_over_the_options(dataset: Path, tmp_path: Path) -> None:
    """The trainer trains on the pairs it is given, not on pairs it compiles with its own options."""
    ds = load_dataset(dataset)
    one = compile_pairs(ds, "drop", 0.0, False).pairs[:1]
    pairs_file = write_pairs(one, tmp_path / "pairs.jsonl")
    prepared = prepare_pairs(_cfg(dataset, tmp_path, pairs_file=str(pairs_file), tie_policy="keep"))
    assert prepared.train == one


def test_a_pairs_file_naming_a_video_not_in_the_dataset_is_a_config_error(
    dataset: Path, tmp_path: Path
) -> None:
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"chosen_id": "nope", "rejected_id": "nada", "prompt": "x", "margin": 1.0}\n')
    with pytest.raises(ConfigError) as err:
        prepare_pairs(_cfg(dataset, tmp_path, pairs_file=str(p)))
    assert err.value.field == "pairs_file" and "nope" in str(err.value)
