"""bench/run_all.py reads each benchmark's own ratios: from its JSON, or from the lines it prints."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def _run_all() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run_all", REPO / "bench" / "run_all.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    return mod


def test_json_keys_with_the_word_ratio_only_and_their_conditions() -> None:
    m = _run_all()
    rows, cond = m.rows_from_json(
        {
            "generation_seconds_batched_cfg": 50.4,  # "generation" holds the letters r-a-t-i-o
            "ratio_unbatched_over_batched": 0.361,
            "put_stream_ratio": 0.91,
            "quick": True,
            "conditions": "8 frames 64x64",
        }
    )
    assert [(r.ratio, r.value) for r in rows] == [
        ("ratio_unbatched_over_batched", 0.361),
        ("put_stream_ratio", 0.91),
    ]
    assert cond == "conditions: 8 frames 64x64; quick: True"


def test_printed_ratio_lines_are_read_with_their_labels() -> None:
    m = _run_all()
    text = (
        "UNet block_out_channels=(32, 64) on cpu\n"
        "ours: 2.73x faster than reference (target >= 2x); peak memory 0.98x of reference, 0.41x above the imports\n"
        "  ratio API / direct    :    0.95   (target >= 0.8)\n"
        "some line without numbers\n"
    )
    rows, cond = m.rows_from_text(text)
    assert cond == "UNet block_out_channels=(32, 64) on cpu"
    assert [(r.ratio, r.value) for r in rows] == [
        ("ours speed-up", 2.73),
        ("ours: peak memory × of reference", 0.98),
        ("ours: × above the imports", 0.41),
        ("ratio API / direct", 0.95),
    ]


def test_table_is_rendered_from_saved_outputs_and_failures_are_shown(tmp_path: Path) -> None:
    m = _run_all()
    raw = {
        "started": "2026-11-25T13:00:00+00:00",
        "machine": "test host",
        "quick": True,
        "outcomes": [
            {
                "name": "generate",
                "command": ["python", "bench/generate.py", "--quick", "--json"],
                "seconds": 3.0,
                "returncode": 0,
                "error": "",
                "stdout": json.dumps({"ratio_unbatched_over_batched": 1.25, "conditions": "c1"}),
                "json_mode": True,
            },
            {
                "name": "upload",
                "command": ["python", "bench/upload.py", "--quick"],
                "seconds": 9.0,
                "returncode": 1,
                "error": "radosgw did not start",
                "stdout": "",
                "json_mode": False,
            },
        ],
    }
    out = tmp_path / "RESULTS.md"
    out.with_suffix(".raw.json").write_text(json.dumps(raw))
    assert m.main(["--out", str(out), "--render-only"]) == 0
    table = out.read_text()
    assert "| generate | ratio_unbatched_over_batched | 1.25 | conditions: c1 |" in table
    assert "| upload | **failed** (exit 1) | – | radosgw did not start |" in table
    assert "2026-11-25 13:00 UTC" in table and "test host" in table
