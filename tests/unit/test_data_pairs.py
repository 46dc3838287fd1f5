"""Ratings-to-pairs compiler: ties, margins, majority votes, multi-rater means, motion-bias check."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from huvidpo.cli import main
from huvidpo.data import (
    DatasetError,
    Pair,
    PreferenceDataset,
    compile_pairs,
    load_dataset,
    make_synthetic_dataset,
    read_pairs,
    write_pairs,
)


def video(vid: str, scores: dict[str, float] | list[tuple[str, float]], prompt: str = "p") -> dict[str, Any]:
    items = scores.items() if isinstance(scores, dict) else scores
    return {
        "id": vid,
        "file": f"{vid}.mp4",
        "prompt": prompt,
        "ratings": [{"rater_id": r, "score": s} for r, s in items],
    }


def choice(w: str, lo: str, rater: str) -> dict[str, Any]:
    return {"type": "choice", "chosen": w, "rejected": lo, "rater_id": rater}


def dataset(tmp_path: Path, records: list[dict[str, Any]]) -> PreferenceDataset:
    """A dataset whose video files are placeholders: the compiler's rules need no pixels."""
    for r in records:
        if "file" in r:
            (tmp_path / r["file"]).write_bytes(b"placeholder")
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_dataset(tmp_path, check_videos=False)


def compile_plain(ds: PreferenceDataset, **kw: Any) -> list[tuple[str, str]]:
    return [(p.chosen_id, p.rejected_id) for p in compile_pairs(ds, motion_check=False, **kw).pairs]


def test_higher_mean_score_wins_within_each_prompt_only(tmp_path: Path) -> None:
    ds = dataset(
        tmp_path,
        [
            video("a", {"r": 9}),
            video("b", {"r": 3}),
            video("c", {"r": 1}, prompt="other"),
            video("d", {"r": 5}, prompt="other"),
        ],
    )
    assert compile_plain(ds) == [("d", "c"), ("a", "b")]  # never a vs c: different prompts


def test_equal_means_are_ties_dropped_by_default(tmp_path: Path) -> None:
    ds = dataset(tmp_path, [video("a", {"r1": 5}), video("b", {"r1": 4, "r2": 6}), video("c", {"r1": 8})])
    ps = compile_pairs(ds, motion_check=False)
    assert sorted((p.chosen_id, p.rejected_id) for p in ps.pairs) == [("c", "a"), ("c", "b")]
    assert ps.report.ties_dropped == 1 and ps.report.ties_kept == 0


def test_keep_policy_keeps_ties_in_a_seeded_direction(tmp_path: Path) -> None:
    recs = [video(f"v{i:02d}", {"r": 5}) for i in range(8)]  # 28 tied pairs
    ds = dataset(tmp_path, recs)
    first = compile_pairs(ds, tie_policy="keep", seed=3, motion_check=False)
    again = compile_pairs(ds, tie_policy="keep", seed=3, motion_check=False)
    other = compile_pairs(ds, tie_policy="keep", seed=4, motion_check=False)
    assert first.report.ties_kept == 28 and first.report.ties_dropped == 0 and len(first.pairs) == 28
    assert first.pairs == again.pairs
    assert all(p.margin == 0.0 for p in first.pairs)
    # The direction is arbitrary: both orders occur, and another seed gives another set of directions.
    assert 0 < sum(p.chosen_id < p.rejected_id for p in first.pairs) < 28
    assert {(p.chosen_id, p.rejected_id) for p in first.pairs} != {
        (p.chosen_id, p.rejected_id) for p in other.pairs
    }


def test_min_margin_drops_close_pairs(tmp_path: Path) -> None:
    ds = dataset(tmp_path, [video("a", {"r": 5}), video("b", {"r": 5.5}), video("c", {"r": 8})])
    ps = compile_pairs(ds, min_margin=1.0, motion_check=False)
    assert sorted((p.chosen_id, p.rejected_id, p.margin) for p in ps.pairs) == [
        ("c", "a", 3.0),
        ("c", "b", 2.5),
    ]
    assert ps.report.below_margin_dropped == 1
    with pytest.raises(ValueError, match="min_margin"):
        compile_pairs(ds, tie_policy="keep", min_margin=1.0)


def test_margin_weighting_is_proportional_to_margin_with_mean_one(tmp_path: Path) -> None:
    ds = dataset(tmp_path, [video("a", {"r": 2}), video("b", {"r": 3}), video("c", {"r": 6})])
    plain = compile_pairs(ds, motion_check=False)
    weighted = compile_pairs(ds, margin_weighting=True, motion_check=False)
    assert all(p.weight == 1.0 for p in plain.pairs)
    margins = {(p.chosen_id, p.rejected_id): p.margin for p in weighted.pairs}
    assert margins == {("b", "a"): 1.0, ("c", "a"): 4.0, ("c", "b"): 3.0}
    mean_margin = sum(margins.values()) / 3
    for p in weighted.pairs:
        assert p.weight == pytest.approx(p.margin / mean_margin)
    assert sum(p.weight for p in weighted.pairs) / 3 == pytest.approx(1.0)


def test_multi_rater_mean_decides_and_a_raters_last_rating_counts(tmp_path: Path) -> None:
    # a: raters 9 and 1 -> 5; b: one rater 6 -> b wins although a got the single highest score.
    # c: rater r1 first said 10, then corrected to 2 -> mean 2, so b and a both beat c.
    ds = dataset(
        tmp_path, [video("a", {"r1": 9, "r2": 1}), video("b", {"r1": 6}), video("c", [("r1", 10), ("r1", 2)])]
    )
    assert ds.videos["a"].mean_score == 5.0 and ds.videos["c"].mean_score == 2.0
    ps = compile_pairs(ds, motion_check=False)
    got = {(p.chosen_id, p.rejected_id): p.margin for p in ps.pairs}
    assert got == {("b", "a"): 1.0, ("a", "c"): 3.0, ("b", "c"): 4.0}
    assert ps.report.raters == 2 and ps.report.ratings == 4


def test_choices_use_majority_vote_and_drop_tied_votes(tmp_path: Path) -> None:
    recs = [video(v, {}) for v in "abcd"] + [
        choice("a", "b", "r1"),
        choice("a", "b", "r2"),
        choice("b", "a", "r3"),  # a wins 2:1
        choice("c", "d", "r1"),
        choice("d", "c", "r2"),  # 1:1 -> dropped
    ]
    ps = compile_pairs(dataset(tmp_path, recs), margin_weighting=True, motion_check=False)
    assert [(p.chosen_id, p.rejected_id, p.source) for p in ps.pairs] == [("a", "b", "choices")]
    assert ps.pairs[0].margin == pytest.approx(1 / 3) and ps.pairs[0].weight == pytest.approx(1 / 3)
    assert ps.report.vote_ties_dropped == 1 and ps.report.pairs_from_choices == 1


def test_a_rater_changing_their_choice_counts_once(tmp_path: Path) -> None:
    recs = [
        video("a", {}),
        video("b", {}),
        choice("a", "b", "r1"),
        choice("b", "a", "r1"),
        choice("b", "a", "r2"),
    ]
    assert compile_plain(dataset(tmp_path, recs)) == [("b", "a")]


def test_explicit_choice_overrides_the_score_order(tmp_path: Path) -> None:
    recs = [video("a", {"r1": 9}), video("b", {"r1": 2}), video("c", {"r1": 5}), choice("b", "a", "r2")]
    ps = compile_pairs(dataset(tmp_path, recs), motion_check=False)
    got = {(p.chosen_id, p.rejected_id): p.source for p in ps.pairs}
    assert got == {("b", "a"): "choices", ("a", "c"): "scores", ("c", "b"): "scores"}
    assert ps.report.scores_overridden_by_choices == 1


def test_report_histogram_counts_every_rating_in_one_point_bins(tmp_path: Path) -> None:
    ds = dataset(
        tmp_path, [video("a", {"r1": 0, "r2": 0.99}), video("b", {"r1": 7.5}), video("c", {"r1": 10})]
    )
    rep = compile_pairs(ds, motion_check=False).report
    assert rep.score_histogram == [2, 0, 0, 0, 0, 0, 0, 1, 0, 1]
    text = rep.format()
    assert "videos        3" in text and "pairs made    3" in text and "ties          0 dropped" in text


def test_motion_bias_warning_fires_when_static_clips_are_preferred(tmp_path: Path) -> None:
    ds = load_dataset(make_synthetic_dataset(tmp_path / "static", preferred="static"))
    rep = compile_pairs(ds).report
    assert rep.motion is not None and rep.motion.pairs == 8 and rep.motion.warning
    assert rep.motion.mean_chosen < 0.7 * rep.motion.mean_rejected
    assert any("move less" in w for w in rep.warnings) and "WARNING" in rep.format()


def test_no_motion_warning_when_smooth_clips_beat_flickering_ones(tmp_path: Path) -> None:
    ds = load_dataset(make_synthetic_dataset(tmp_path / "smooth", preferred="smooth"))
    ps = compile_pairs(ds)
    assert ps.report.pairs == 8 and ps.report.ties_dropped == 4  # 2 prompts x (2 good x 2 bad), 2 x 2 ties
    assert all(ds.videos[p.chosen_id].mean_score == 8.0 for p in ps.pairs)
    assert ps.report.motion is not None and not ps.report.motion.warning
    assert not ps.report.warnings


def test_motion_warning_needs_at_least_three_pairs(tmp_path: Path) -> None:
    ds = load_dataset(
        make_synthetic_dataset(tmp_path / "s", n_prompts=1, videos_per_prompt=2, preferred="static")
    )
    rep = compile_pairs(ds).report
    assert rep.motion is not None and rep.motion.pairs == 1 and not rep.motion.warning


def test_pairs_round_trip_through_jsonl(tmp_path: Path) -> None:
    ds = dataset(tmp_path, [video("a", {"r": 1}), video("b", {"r": 4}), video("c", {"r": 9})])
    ps = compile_pairs(ds, margin_weighting=True, motion_check=False)
    out = write_pairs(ps, tmp_path / "out" / "pairs.jsonl")
    assert read_pairs(out) == ps.pairs
    assert [f.name for f in out.parent.iterdir()] == ["pairs.jsonl"]  # no temporary left behind


def test_failed_pairs_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "pairs.jsonl"
    write_pairs([Pair("a", "b", "p", 1.0)], target)
    before = target.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_pairs([Pair("x", "y", "p", 2.0)], target)
    assert target.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["pairs.jsonl"]


def test_read_pairs_names_the_bad_line(tmp_path: Path) -> None:
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps(Pair("a", "b", "p", 1.0).to_dict()) + "\n" + '{"chosen_id": "a"}\n')
    with pytest.raises(DatasetError, match=r"pairs.jsonl: line 2: field 'rejected_id'"):
        read_pairs(f)


def test_cli_pairs_prints_the_report_and_writes_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds_dir = make_synthetic_dataset(tmp_path / "ds", n_prompts=1, videos_per_prompt=4)
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", str(ds_dir), "--json", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert report["pairs"] == 4 and report["ties_dropped"] == 2 and report["videos"] == 4
    assert len(read_pairs(out)) == 4
    assert main(["pairs", str(ds_dir), "--tie-policy", "keep"]) == 0
    text = capsys.readouterr().out
    assert "pairs made    6" in text and "score histogram" in text


def test_cli_pairs_on_a_bad_dataset_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "manifest.jsonl").write_text(json.dumps(video("a", {"r": 11})) + "\n")
    (tmp_path / "a.mp4").write_bytes(b"x")
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", str(tmp_path), "--no-video-check", "--out", str(out)]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not out.exists()


def five_prompts(tmp_path: Path) -> PreferenceDataset:
    return dataset(
        tmp_path,
        [video(f"{p}{k}", {"r": 2 + 3 * k}, prompt=f"prompt {p}") for p in "abcde" for k in range(3)],
    )


def test_holdout_moves_whole_prompts_chosen_by_the_seed_and_records_them(tmp_path: Path) -> None:
    ds = five_prompts(tmp_path)
    full = compile_pairs(ds, motion_check=False)
    assert full.heldout == [] and full.report.holdout is None and len(full.pairs) == 15
    ps = compile_pairs(ds, motion_check=False, holdout_fraction=0.4, holdout_seed=3)
    held = ps.report.holdout
    assert held is not None and len(held.prompts) == 2 and (held.fraction, held.seed) == (0.4, 3)
    assert {p.prompt for p in ps.heldout} == set(held.prompts)
    assert not {p.prompt for p in ps.pairs} & set(held.prompts)
    assert sorted(ps.pairs + ps.heldout, key=str) == sorted(full.pairs, key=str)
    assert (held.pairs, ps.report.pairs) == (6, 9)
    d = ps.report.to_dict()["holdout"]
    assert d == {"fraction": 0.4, "seed": 3, "prompts": held.prompts, "pairs": 6}
    assert "held out      6 pairs of 2 prompt(s)" in ps.report.format()
    again = compile_pairs(ds, motion_check=False, holdout_fraction=0.4, holdout_seed=3)
    assert again.report.holdout == held
    others = {
        tuple(
            compile_pairs(ds, motion_check=False, holdout_fraction=0.4, holdout_seed=s).report.holdout.prompts
        )  # type: ignore[union-attr]
        for s in range(8)
    }
    assert len(others) > 1  # the seed decides


def test_holdout_that_leaves_no_training_prompt_is_refused(tmp_path: Path) -> None:
    ds = five_prompts(tmp_path)
    with pytest.raises(ValueError, match="leaves no prompt to train on"):
        compile_pairs(ds, motion_check=False, holdout_fraction=0.95)
    with pytest.raises(ValueError, match=r"holdout_fraction must be in \[0, 1\)"):
        compile_pairs(ds, motion_check=False, holdout_fraction=1.0)


def test_cli_pairs_writes_heldout_pairs_beside_the_pairs_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds_dir = make_synthetic_dataset(tmp_path / "ds", n_prompts=4, videos_per_prompt=4)
    out = tmp_path / "pairs.jsonl"
    args = ["pairs", str(ds_dir), "--json", "--out", str(out), "--holdout-fraction", "0.25"]
    assert main([*args, "--holdout-seed", "5"]) == 0
    shown = json.loads(capsys.readouterr().out)
    held = shown["report"]["holdout"]
    assert shown["heldout_file"] == str(tmp_path / "heldout.jsonl")
    assert held["seed"] == 5 and len(held["prompts"]) == 1 and held["pairs"] == 4
    heldout = read_pairs(tmp_path / "heldout.jsonl")
    assert {p.prompt for p in heldout} == set(held["prompts"]) and len(heldout) == 4
    assert len(read_pairs(out)) == 12 and not {p.prompt for p in read_pairs(out)} & set(held["prompts"])
    other = tmp_path / "train.jsonl"
    assert main(["pairs", str(ds_dir), "--out", str(other), "--holdout-fraction", "0.25"]) == 0
    assert "held-out pairs to" in capsys.readouterr().out
    assert len(read_pairs(tmp_path / "train.heldout.jsonl")) == 4
    with pytest.raises(SystemExit):
        main(["pairs", str(ds_dir), "--holdout-fraction", "1.5"])
