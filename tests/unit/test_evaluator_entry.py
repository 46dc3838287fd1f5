"""``python -m services.evaluator``: one evaluation from its spec in the store to its record."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.publish import publish_dir
from services.common.records import keys
from services.common.records.evaluation import (
    EvaluationRecord,
    EvaluationSpec,
    read_evaluation,
    write_evaluation,
    write_spec,
)
from services.common.records.exit_codes import ExitCode
from services.common.settings import EvaluatorSettings
from services.common.store import LocalStore
from services.controlplane.domain.datasets import DatasetService
from services.evaluator.entry import run
from tests.unit.test_evaluation import random_adapter

HELDOUT = "datasets/cats/compiled/v1/opts/"
CKPT = "ckpt-ft-a-1"
# The checkpoint's training config, as its lineage records it: the held-out measure reuses it.
TRAINED = {"beta": 25.0, "num_frames": 4, "height": 32, "width": 32, "timestep_max": 150, "eval_draws": 1,
           "lr": 5e-3}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def store(tmp_path: Path, tiny_model_dir: Path) -> tuple[LocalStore, str]:
    """The tiny model, a dataset version of 4-frame 32x32 clips with its held-out pairs, a published
    checkpoint and a first frame in a store; returns the store and the version id."""
    from huvidpo.data import compile_pairs, load_dataset, make_synthetic_dataset, write_pairs

    s = LocalStore(tmp_path / "s")
    publish_dir(s, tiny_model_dir, "models/tiny/", {})
    ds = make_synthetic_dataset(tmp_path / "ds", n_prompts=2, videos_per_prompt=2, num_frames=4, size=32)
    datasets = DatasetService(s, tmp_path / "cache")
    datasets.create("cats")
    upload = datasets.start_upload("cats")
    for p in sorted(q for q in ds.rglob("*") if q.is_file()):
        with p.open("rb") as fh:
            datasets.stage_stream("cats", upload["id"], p.relative_to(ds).as_posix(), fh)
    version = str(datasets.commit_upload("cats", upload["id"])["id"])
    write_pairs(compile_pairs(load_dataset(ds)), tmp_path / "heldout.jsonl")
    s.put_file(HELDOUT + "heldout.jsonl", tmp_path / "heldout.jsonl")
    ckpt = random_adapter(tiny_model_dir, tmp_path / "ckpt", seed=1)
    publish_dir(s, ckpt, keys.checkpoint_prefix(CKPT), {"lineage": {"config": TRAINED}})
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(
        tmp_path / "f.png"
    )
    s.put_file("uploads/first.png", tmp_path / "f.png")
    return s, version


def spec(version: str, **kw: Any) -> EvaluationSpec:
    values: dict[str, Any] = {
        "id": "ev-1", "created_at": "2026-01-01T00:00:00Z", "checkpoint_id": CKPT, "base_model": "tiny",
        "dataset": "cats", "version": version, "heldout_prefix": HELDOUT,
        "prompts": [{"prompt": "a red square", "first_frame": "uploads/first.png"}], "seeds": [0],
        "generation": {"num_frames": 4, "height": 32, "width": 32, "steps": 2, "guidance_scale": 1.0},
    }  # fmt: skip
    values.update(kw)
    return EvaluationSpec.model_validate(values)


def test_an_evaluation_job_writes_its_record_and_comparison_png(
    store: tuple[LocalStore, str], tmp_path: Path
) -> None:
    s, version = store
    write_spec(s, spec(version))
    assert run(s, EvaluatorSettings(evaluation_id="ev-1", work_dir=tmp_path / "w")) == ExitCode.OK
    record = read_evaluation(s, "ev-1")
    assert record.state == "succeeded" and record.checkpoint_id == CKPT and record.baseline == "base"
    assert record.heldout_implicit_acc is not None and 0 <= record.heldout_implicit_acc <= 1
    assert record.results[CKPT].heldout is not None and record.results[CKPT].heldout.pairs == 2
    # the held-out measure used the checkpoint's own training settings
    assert record.settings["dpo"]["beta"] == 25.0 and record.settings["dpo"]["eval_draws"] == 1
    assert record.results[CKPT].adapter == f"checkpoints/{CKPT}/"
    assert record.results["base"].prompts[0].first_frame_psnr is not None
    assert record.plot == "evaluations/ev-1/comparison.png"
    assert s.get_bytes(record.plot)[:4] == b"\x89PNG"
    assert str(tmp_path) not in json.dumps(record.model_dump())


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"checkpoint_id": "ckpt-gone-1"}, "checkpoint checkpoints/ckpt-gone-1/ is not published"),
        ({"heldout_prefix": "datasets/cats/compiled/v1/none/"}, "compile with holdout_fraction > 0"),
        ({"generation": {"frames": 4}}, "generation: "),
        ({"dpo": {"beta": -1}}, "beta"),
    ],
)
def test_bad_input_fails_the_evaluation_with_exit_2_and_the_reason(
    store: tuple[LocalStore, str], tmp_path: Path, change: dict[str, Any], says: str
) -> None:
    s, version = store
    write_spec(s, spec(version, **change))
    assert run(s, EvaluatorSettings(evaluation_id="ev-1", work_dir=tmp_path / "w")) == ExitCode.BAD_INPUT
    record = read_evaluation(s, "ev-1")
    assert record.state == "failed" and record.error is not None and says in record.error, record.error
    assert str(tmp_path) not in record.error


def test_no_spec_or_no_id_is_exit_2(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "s")
    assert run(s, EvaluatorSettings(evaluation_id="ev-x", work_dir=tmp_path / "w")) == ExitCode.BAD_INPUT
    assert run(s, EvaluatorSettings(evaluation_id="", work_dir=tmp_path / "w")) == ExitCode.BAD_INPUT
    assert not s.exists(keys.evaluation_key("ev-x"))


def test_an_evaluation_cancelled_before_its_job_starts_is_not_run(
    store: tuple[LocalStore, str], tmp_path: Path
) -> None:
    s, version = store
    write_spec(s, spec(version))
    cancelled = EvaluationRecord(
        id="ev-1", checkpoint_id=CKPT, created_at="t", state="cancelled", error="by ann"
    )
    write_evaluation(s, cancelled)
    assert run(s, EvaluatorSettings(evaluation_id="ev-1", work_dir=tmp_path / "w")) == ExitCode.OK
    assert read_evaluation(s, "ev-1") == cancelled  # nothing ran, nothing written
    assert not (tmp_path / "w").exists()


def test_a_cancel_while_the_evaluation_runs_stands_over_its_result(
    store: tuple[LocalStore, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control plane's cancel lands between the evaluator's "running" and its result: the
    result's compare-and-swap fails, the evaluator stops (exit 0), the record stays cancelled."""
    import services.evaluator.entry as entry

    s, version = store
    write_spec(s, spec(version))
    real = entry.evaluate

    def cancelled_meanwhile(*args: Any, **kw: Any) -> Any:
        report = real(*args, **kw)
        running = read_evaluation(s, "ev-1")
        assert running.state == "running"
        write_evaluation(s, running.model_copy(update={"state": "cancelled", "error": "by ann"}))
        return report

    monkeypatch.setattr(entry, "evaluate", cancelled_meanwhile)
    assert run(s, EvaluatorSettings(evaluation_id="ev-1", work_dir=tmp_path / "w")) == ExitCode.OK
    record = read_evaluation(s, "ev-1")
    assert record.state == "cancelled" and record.error == "by ann" and record.results == {}
