"""bench/evaluate.py at its smallest: it measures a fine-tune step and an evaluation side by side and
reports their ratio and the video statistics' throughput, in the JSON bench/run_all.py reads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_reports_the_evaluation_to_step_ratio_and_frames_per_second(
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = importlib.util.spec_from_file_location("bench_evaluate", REPO / "bench" / "evaluate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    out = mod.main(["--quick", "--steps", "2", "--gen-steps", "1", "--stats-size", "64", "--json"])
    assert out["ratio_evaluation_over_step"] == pytest.approx(out["evaluation_s"] / out["finetune_step_s"])
    assert out["ratio_heldout_over_step"] == pytest.approx(out["heldout_only_s"] / out["finetune_step_s"])
    # Speeds are the benchmark's to report, not the test's to assert: both parts were timed, nothing more.
    assert out["ratio_evaluation_over_step"] > 0 and out["ratio_heldout_over_step"] > 0
    assert out["clips_per_model"] == 4
    assert out["video_stats_frames_per_s"] > 0
    assert 0 <= out["heldout_implicit_acc"] <= 1

    run_all = importlib.util.spec_from_file_location("bench_run_all", REPO / "bench" / "run_all.py")
    assert run_all is not None and run_all.loader is not None
    ra = importlib.util.module_from_spec(run_all)
    sys.modules[run_all.name] = ra
    run_all.loader.exec_module(ra)
    rows, conditions = ra.rows_from_json(out)
    assert {r.ratio for r in rows} == {"ratio_evaluation_over_step", "ratio_heldout_over_step"}
    assert "64x64" in conditions and "threads 1" in conditions
    assert '"ratio_evaluation_over_step"' in capsys.readouterr().out
