"""Dataset validation: every bad dataset is rejected with a message naming the file, line and field,
and nothing is written when validation fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from huvidpo.data import DatasetError, load_dataset, make_synthetic_dataset, moving_square, write_manifest
from huvidpo.video_io import write_video


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real 4-frame H.264 MP4."""
    p = write_video(moving_square(4, 32, seed=1), tmp_path_factory.mktemp("clip") / "c.mp4")
    return p.read_bytes()


def rec(vid: str, score: Any = 5, **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "id": vid,
        "file": f"{vid}.mp4",
        "prompt": "a dog runs",
        "ratings": [{"rater_id": "r1", "score": score}],
    }
    r.update(kw)
    return r


def write_ds(root: Path, records: list[Any], clip: bytes, videos: tuple[str, ...] = ("a", "b")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for v in videos:
        (root / f"{v}.mp4").write_bytes(clip)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def rejected(root: Path, **kw: Any) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(root, **kw)
    return str(info.value)


def test_valid_dataset_loads_with_absolute_paths_and_frame_counts(tmp_path: Path, clip_bytes: bytes) -> None:
    root = write_ds(tmp_path, [rec("a", 7.5), rec("b", 2, category="run")], clip_bytes)
    ds = load_dataset(root)
    assert list(ds.videos) == ["a", "b"]
    a = ds.videos["a"]
    assert a.path.is_absolute() and a.path == (root / "a.mp4").absolute()
    assert a.num_frames == 4 and a.mean_score == 7.5 and a.ratings[0].rater_id == "r1"
    assert ds.videos["b"].prompt == "a dog runs" and ds.videos["b"].category == "run"


def test_missing_video_names_manifest_line_and_field(tmp_path: Path, clip_bytes: bytes) -> None:
    root = write_ds(tmp_path, [rec("a"), rec("b"), rec("c")], clip_bytes)
    msg = rejected(root)
    assert f"{root / 'manifest.jsonl'}: line 3: field 'file'" in msg
    assert "not found" in msg and "'c.mp4'" in msg


def test_undecodable_video_is_rejected(tmp_path: Path, clip_bytes: bytes) -> None:
    root = write_ds(tmp_path, [rec("a"), rec("b")], clip_bytes)
    (root / "b.mp4").write_bytes(b"\x00garbage, not an mp4" * 50)
    msg = rejected(root)
    assert "manifest.jsonl: line 2: field 'file'" in msg and "undecodable video 'b.mp4'" in msg


def test_too_few_frames_is_rejected(tmp_path: Path, clip_bytes: bytes) -> None:
    root = write_ds(tmp_path, [rec("a"), rec("b")], clip_bytes)
    write_video(moving_square(1, 32), root / "b.mp4")
    msg = rejected(root)
    assert "line 2: field 'file'" in msg and "too few frames" in msg and "1 < min_frames 2" in msg
    assert "line 1" not in msg  # a is fine at 4 frames
    assert "4 < min_frames 8" in rejected(root, min_frames=8)


@pytest.mark.parametrize(
    ("score", "problem"),
    [
        (10.5, "score 10.5 is out of range [0, 10]"),
        (-1, "score -1 is out of range [0, 10]"),
        ("7.5", "must be a number in [0, 10], got '7.5' (str)"),
        (None, "must be a number in [0, 10], got None"),
        (True, "must be a number in [0, 10], got True (bool)"),
        (float("nan"), "must be a number in [0, 10], got nan"),
    ],
)
def test_bad_scores_are_rejected(tmp_path: Path, clip_bytes: bytes, score: Any, problem: str) -> None:
    root = write_ds(tmp_path, [rec("a"), rec("b", score)], clip_bytes)
    msg = rejected(root)
    assert "manifest.jsonl: line 2: field 'ratings[0].score'" in msg and problem in msg


def test_duplicate_ids_are_rejected(tmp_path: Path, clip_bytes: bytes) -> None:
    root = write_ds(tmp_path, [rec("a"), rec("b"), rec("a")], clip_bytes)
    msg = rejected(root)
    assert "line 3: field 'id'" in msg and "duplicate video id 'a' (first defined on line 1)" in msg


@pytest.mark.parametrize(
    ("rating", "field"),
    [
        ("alice:7", "ratings[0]"),
        ({"user": "alice", "score": 7}, "ratings[0].rater_id"),
        ({"score": 7}, "ratings[0].rater_id"),
        ({"rater_id": ["alice"], "score": 7}, "ratings[0].rater_id"),
        ({"rater_id": "", "score": 7}, "ratings[0].rater_id"),
    ],
)
def test_unknown_rater_format_is_rejected(tmp_path: Path, clip_bytes: bytes, rating: Any, field: str) -> None:
    root = write_ds(tmp_path, [rec("a"), {**rec("b"), "ratings": [rating]}], clip_bytes)
    msg = rejected(root)
    assert f"line 2: field '{field}'" in msg and "unknown rater format" in msg


def test_choice_without_rater_and_choice_of_unknown_video_are_rejected(
    tmp_path: Path, clip_bytes: bytes
) -> None:
    records = [
        rec("a"),
        rec("b"),
        {"type": "choice", "chosen": "a", "rejected": "b"},
        {"type": "choice", "chosen": "a", "rejected": "zzz", "rater_id": "r"},
    ]
    msg = rejected(write_ds(tmp_path, records, clip_bytes))
    assert "line 3: field 'rater_id'" in msg and "unknown rater format" in msg
    assert "line 4: field 'rejected'" in msg and "unknown video id 'zzz'" in msg


def test_choice_across_prompts_is_rejected(tmp_path: Path, clip_bytes: bytes) -> None:
    records = [
        rec("a"),
        rec("b", prompt="a cat sits"),
        {"type": "choice", "chosen": "a", "rejected": "b", "rater_id": "r"},
    ]
    assert "must compare videos of one prompt" in rejected(write_ds(tmp_path, records, clip_bytes))


@pytest.mark.parametrize("path", ["../a.mp4", "/etc/passwd", "sub/../../a.mp4"])
def test_path_traversal_in_file_is_rejected(tmp_path: Path, clip_bytes: bytes, path: str) -> None:
    root = write_ds(tmp_path / "ds", [rec("a"), rec("b", file=path)], clip_bytes)
    (tmp_path / "a.mp4").write_bytes(clip_bytes)
    msg = rejected(root)
    assert "line 2: field 'file'" in msg and "inside the dataset" in msg


def test_symlink_leaving_the_dataset_is_rejected(tmp_path: Path, clip_bytes: bytes) -> None:
    root = write_ds(tmp_path / "ds", [rec("a"), rec("b", file="link.mp4")], clip_bytes)
    (tmp_path / "outside.mp4").write_bytes(clip_bytes)
    (root / "link.mp4").symlink_to(tmp_path / "outside.mp4")
    assert "leaves the dataset directory" in rejected(root)


def test_every_problem_is_reported_at_once(tmp_path: Path, clip_bytes: bytes) -> None:
    root = write_ds(tmp_path, [rec("a", 11), rec("a"), rec("c"), "not an object"], clip_bytes)
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    err = info.value
    assert [(i.line, i.field) for i in err.issues] == [
        (1, "ratings[0].score"),
        (2, "id"),
        (3, "file"),
        (4, "-"),
    ]


def test_json_list_manifest_with_separate_rating_and_choice_records(
    tmp_path: Path, clip_bytes: bytes
) -> None:
    write_ds(tmp_path, [], clip_bytes)
    (tmp_path / "manifest.jsonl").unlink()
    records: list[dict[str, Any]] = [
        {"id": "a", "file": "a.mp4", "category": "smile"},
        {"id": "b", "file": "b.mp4", "category": "smile"},
        {"type": "rating", "video_id": "a", "rater_id": 7, "score": 6, "ts": 1700000000},
        {"type": "rating", "video_id": "b", "rater_id": "x", "score": 4},
        {"type": "choice", "chosen": "b", "rejected": "a", "rater_id": "y", "time": "2026-01-01T00:00:00Z"},
    ]
    (tmp_path / "manifest.json").write_text(json.dumps(records, indent=2))
    ds = load_dataset(tmp_path)
    assert ds.videos["a"].prompt == "smile" and ds.videos["a"].ratings[0].rater_id == "7"
    assert ds.videos["a"].ratings[0].time == 1700000000
    assert ds.raters == ["7", "x", "y"] and ds.choices[0].chosen_id == "b"
    # JSON-list records keep their line numbers in messages too.
    records[3]["score"] = 42
    (tmp_path / "manifest.json").write_text(json.dumps(records, indent=2))
    msg = rejected(tmp_path)
    starts = [n for n, t in enumerate(json.dumps(records, indent=2).splitlines(), start=1) if t == "  {"]
    assert f"manifest.json: line {starts[3]}: field 'score'" in msg and "out of range" in msg


def test_invalid_json_line_and_ambiguous_manifests(tmp_path: Path, clip_bytes: bytes) -> None:
    root = write_ds(tmp_path, [rec("a")], clip_bytes)
    with (root / "manifest.jsonl").open("a") as fh:
        fh.write('{"id": "b", \n')
    assert "manifest.jsonl: line 2: field '-': invalid JSON" in rejected(root)
    (root / "manifest.json").write_text("[]")
    assert "both manifest.jsonl and manifest.json exist" in rejected(root)


def test_write_manifest_writes_nothing_when_invalid(tmp_path: Path, clip_bytes: bytes) -> None:
    write_ds(tmp_path, [], clip_bytes)
    (tmp_path / "manifest.jsonl").unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DatasetError, match="duplicate video id"):
        write_manifest(tmp_path, [rec("a"), rec("a")])
    with pytest.raises(DatasetError, match="undecodable"):
        (tmp_path / "b.mp4").write_bytes(b"junk")
        write_manifest(tmp_path, [rec("a"), rec("b")])
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "b.mp4").write_bytes(clip_bytes)
    out = write_manifest(tmp_path, [rec("a"), rec("b", 3)])
    assert out.name == "manifest.jsonl" and load_dataset(tmp_path).videos["b"].mean_score == 3


def test_synthetic_dataset_is_deterministic(tmp_path: Path) -> None:
    a = make_synthetic_dataset(tmp_path / "a", n_prompts=1, videos_per_prompt=3, seed=5)
    b = make_synthetic_dataset(tmp_path / "b", n_prompts=1, videos_per_prompt=3, seed=5)
    c = make_synthetic_dataset(tmp_path / "c", n_prompts=1, videos_per_prompt=3, seed=6)
    assert (a / "manifest.jsonl").read_bytes() == (b / "manifest.jsonl").read_bytes()
    assert (a / "videos/p0_v1.mp4").read_bytes() == (b / "videos/p0_v1.mp4").read_bytes()
    assert (a / "videos/p0_v1.mp4").read_bytes() != (c / "videos/p0_v1.mp4").read_bytes()
    ds = load_dataset(a)
    assert [v.mean_score for v in ds.videos.values()] == [8.0, 8.0, 2.0]
    assert all(v.num_frames == 8 for v in ds.videos.values())


def test_smooth_and_flickering_squares_share_a_path_and_differ_frame_to_frame() -> None:
    smooth = moving_square(8, 64, smooth=True, seed=3)
    flicker = moving_square(8, 64, smooth=False, seed=3)
    assert smooth.shape == flicker.shape == (8, 64, 64, 3) and smooth.dtype == np.uint8
    assert np.array_equal(smooth, moving_square(8, 64, smooth=True, seed=3))

    def step(x: np.ndarray) -> float:
        return float(np.abs(np.diff(x.astype(np.float32), axis=0)).mean())

    assert step(flicker) > 1.4 * step(smooth) > 0


@pytest.mark.parametrize(
    ("bad", "suggestion"),
    [("ratingz", "ratings"), ("scores", "ratings"), ("promt", "prompt")],
)
def test_unknown_video_key_is_rejected_with_the_nearest_known_key(
    tmp_path: Path, clip_bytes: bytes, bad: str, suggestion: str
) -> None:
    other = rec("b")
    other[bad] = other.pop("ratings")
    msg = rejected(write_ds(tmp_path, [rec("a"), other], clip_bytes))
    assert f"line 2: field '{bad}'" in msg and f"unknown key '{bad}'" in msg
    assert f"did you mean `{suggestion}`?" in msg


def test_unknown_keys_of_rating_and_choice_records_suggest_the_known_key(
    tmp_path: Path, clip_bytes: bytes
) -> None:
    records = [
        rec("a"),
        rec("b"),
        {"type": "rating", "video_id": "a", "rater_id": "r", "scroe": 3},
        {"type": "choice", "chosen": "a", "rejectd": "b", "rater_id": "r"},
        {**rec("c"), "ratings": [{"rater": "r", "score": 3}]},
    ]
    msg = rejected(write_ds(tmp_path, records, clip_bytes, videos=("a", "b", "c")))
    assert "line 3: field 'scroe'" in msg and "did you mean `score`?" in msg
    assert "line 4: field 'rejectd'" in msg and "did you mean `rejected`?" in msg
    assert "line 5: field 'ratings[0].rater_id'" in msg and "unknown key 'rater'" in msg
    assert "did you mean `rater_id`?" in msg
