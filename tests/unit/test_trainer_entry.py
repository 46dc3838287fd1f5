"""The trainer entrypoint's exit codes and end records: 2 for bad input (never retried), 75 for transient."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.common.publish import publish_dir
from services.common.records.exit_codes import ExitCode
from services.common.records.finetune import FineTuneSpec, write_spec
from services.common.settings import TrainerSettings
from services.common.store import LocalStore, StoreUnavailable
from services.controlplane.domain.datasets import DatasetService
from services.trainer.entry import published_steps, run


def _record(store: LocalStore, ft: str, **request: Any) -> None:
    req: dict[str, Any] = {
        "id": ft,
        "created_at": "2026-01-01T00:00:00Z",
        "dataset": "cats",
        "version": "a" * 64,
        "base_model": "tiny",
        "stage": "dpo",
        "hyperparameters": {},
    }
    req.update(request)
    write_spec(store, FineTuneSpec.model_validate(req))


def _end(store: LocalStore, ft: str) -> dict[str, Any]:
    lines = store.get_bytes(f"finetunes/{ft}/progress.jsonl").decode().splitlines()
    end = json.loads(lines[-1])
    assert end["event"] == "end"
    return dict(end)


def test_missing_record_or_dataset_is_bad_input_exit_2(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    settings = TrainerSettings(finetune_id="ft-a", work_dir=tmp_path / "w")
    assert run(store, settings) == ExitCode.BAD_INPUT
    assert _end(store, "ft-a")["reason"] == "BadInput"
    _record(store, "ft-b")
    assert run(store, TrainerSettings(finetune_id="ft-b", work_dir=tmp_path / "w")) == ExitCode.BAD_INPUT
    end = _end(store, "ft-b")
    assert end["state"] == "failed" and end["exit_code"] == 2 and "datasets/cats" in end["message"]
    assert run(store, TrainerSettings(finetune_id="", work_dir=tmp_path / "w")) == ExitCode.BAD_INPUT


def test_invalid_hyperparameters_are_exit_2(tmp_path: Path, tiny_model_dir: Path) -> None:
    from huvidpo.data import make_synthetic_dataset

    store = LocalStore(tmp_path / "s")
    publish_dir(store, tiny_model_dir, "models/tiny/", {})
    ds = make_synthetic_dataset(tmp_path / "ds", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    datasets = DatasetService(store, tmp_path / "cache")
    datasets.create("cats")
    upload = datasets.start_upload("cats")
    for p in sorted(q for q in ds.rglob("*") if q.is_file()):
        with p.open("rb") as fh:
            datasets.stage_stream("cats", upload["id"], p.relative_to(ds).as_posix(), fh)
    version = datasets.commit_upload("cats", upload["id"])["id"]
    _record(store, "ft-c", version=version, hyperparameters={"height": 30})
    assert run(store, TrainerSettings(finetune_id="ft-c", work_dir=tmp_path / "w")) == ExitCode.BAD_INPUT
    end = _end(store, "ft-c")
    assert end["reason"] == "ConfigError" and "height" in end["message"]


def _version(store: LocalStore, tmp_path: Path, tiny_model_dir: Path) -> str:
    """The tiny model and a committed version of 4-frame 32x32 clips in ``store``; returns its id."""
    from huvidpo.data import make_synthetic_dataset

    publish_dir(store, tiny_model_dir, "models/tiny/", {})
    ds = make_synthetic_dataset(tmp_path / "ds", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    datasets = DatasetService(store, tmp_path / "cache")
    datasets.create("cats")
    upload = datasets.start_upload("cats")
    for p in sorted(q for q in ds.rglob("*") if q.is_file()):
        with p.open("rb") as fh:
            datasets.stage_stream("cats", upload["id"], p.relative_to(ds).as_posix(), fh)
    return str(datasets.commit_upload("cats", upload["id"])["id"])


def test_clips_longer_than_the_videos_are_bad_config_exit_2(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = LocalStore(tmp_path / "s")
    version = _version(store, tmp_path, tiny_model_dir)
    for ft, hp in (("ft-f", {"num_frames": 8}), ("ft-g", {})):  # 8, and the default 16, on 4-frame clips
        _record(store, ft, version=version, hyperparameters={"height": 32, "width": 32, "max_steps": 1, **hp})
        assert run(store, TrainerSettings(finetune_id=ft, work_dir=tmp_path / "w")) == ExitCode.BAD_INPUT
        end = _end(store, ft)
        assert end["reason"] == "ConfigError", end
        assert "num_frames" in end["message"] and "has 4 frames" in end["message"], end["message"]
        assert str(tmp_path) not in end["message"]  # names the dataset's file, not the trainer's copy


class FlakyStore(LocalStore):
    def get_bytes(self, key: str) -> bytes:
        raise StoreUnavailable("connection refused")


def test_unreachable_store_is_transient_exit_75(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "s")
    assert run(store, TrainerSettings(finetune_id="ft-d", work_dir=tmp_path / "w")) == ExitCode.TRANSIENT


def test_only_checkpoints_with_a_manifest_count_for_resume(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    for step, complete in ((1, True), (2, True), (3, False)):
        store.put_bytes(f"checkpoints/ckpt-ft-e-{step}/adapter/adapter_model.safetensors", b"w")
        if complete:
            store.put_json(f"checkpoints/ckpt-ft-e-{step}/manifest.json", {"files": {}})
    store.put_json("checkpoints/ckpt-ft-e2-9/manifest.json", {"files": {}})  # another fine-tune
    assert published_steps(store, "ft-e") == [1, 2]


def test_the_trainer_reads_the_pairs_its_spec_names(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The spec's compiled ``pairs.jsonl`` is what the trainer trains on, checked against the digest
    recorded at create: pairs it cannot use, a changed file or a missing one are bad input (exit 2)."""
    import hashlib

    store = LocalStore(tmp_path / "s")
    version = _version(store, tmp_path, tiny_model_dir)
    clips = {"height": 32, "width": 32, "num_frames": 4, "max_steps": 1}
    bad = b'{"chosen_id": "nope", "rejected_id": "nada", "prompt": "x", "margin": 1.0}\n'
    store.put_bytes("datasets/cats/compiled/x/bad/pairs.jsonl", bad)
    cases = {
        "ft-p1": (
            {"prefix": "datasets/cats/compiled/x/bad/", "digest": hashlib.sha256(bad).hexdigest()},
            "nope",
        ),
        "ft-p2": ({"prefix": "datasets/cats/compiled/x/bad/", "digest": "0" * 64}, "changed since"),
        "ft-p3": ({"prefix": "datasets/cats/compiled/x/gone/", "digest": "0" * 64}, "are gone"),
    }
    for ft, (pairs, says) in cases.items():
        _record(store, ft, version=version, hyperparameters=clips, pairs=pairs)
        assert run(store, TrainerSettings(finetune_id=ft, work_dir=tmp_path / "w")) == ExitCode.BAD_INPUT
        end = _end(store, ft)
        assert says in end["message"], end


def test_a_finetune_with_a_holdout_never_trains_on_a_heldout_prompt(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: Any
) -> None:
    """Compiled with a hold-out, the spec's pairs.jsonl lacks the held-out prompts; the trainer trains
    on exactly those pairs (every batch it loads is recorded) and evaluates on heldout.jsonl."""
    import huvidpo.training.dpo as dpo
    from huvidpo.data import make_synthetic_dataset
    from services.common.records import hyperparameters
    from services.controlplane.domain.finetunes import pair_options

    store = LocalStore(tmp_path / "s")
    publish_dir(store, tiny_model_dir, "models/tiny/", {})
    ds = make_synthetic_dataset(tmp_path / "ds", n_prompts=4, videos_per_prompt=2, num_frames=4, size=32)
    datasets = DatasetService(store, tmp_path / "cache")
    datasets.create("cats")
    upload = datasets.start_upload("cats")
    for p in sorted(q for q in ds.rglob("*") if q.is_file()):
        with p.open("rb") as fh:
            datasets.stage_stream("cats", upload["id"], p.relative_to(ds).as_posix(), fh)
    version = str(datasets.commit_upload("cats", upload["id"])["id"])
    hp = {
        "height": 32,
        "width": 32,
        "num_frames": 4,
        "max_steps": 4,
        "batch_size": 2,
        "holdout_fraction": 0.5,
    }
    options = pair_options("dpo", hyperparameters.parse("dpo", hp))
    assert options is not None and options.holdout_fraction == 0.5
    report = datasets.compile_pairs("cats", version, options)
    held = set(report["report"]["holdout"]["prompts"])
    assert len(held) == 2 and report["heldout"] == 2 and report["pairs"] == 2
    pairs = {
        "prefix": datasets.pairs_prefix("cats", version, options),
        "digest": report["pairs_sha256"],
        "heldout_digest": report["heldout_sha256"],
    }
    _record(store, "ft-h", version=version, hyperparameters=hp, pairs=pairs)
    trained: list[str] = []
    evaluated: list[str] = []
    real_load, real_eval = dpo.load_pair_batch, dpo.evaluate_pairs

    def load(batch_pairs: Any, *args: Any) -> Any:
        trained.extend(p.prompt for p in batch_pairs)
        return real_load(batch_pairs, *args)

    def evaluate(unet: Any, eval_pairs: Any, *args: Any, **kw: Any) -> Any:
        evaluated.extend(p.prompt for p in eval_pairs)
        return real_eval(unet, eval_pairs, *args, **kw)

    monkeypatch.setattr(dpo, "load_pair_batch", load)
    monkeypatch.setattr(dpo, "evaluate_pairs", evaluate)
    assert run(store, TrainerSettings(finetune_id="ft-h", work_dir=tmp_path / "w")) == ExitCode.OK, _end(
        store, "ft-h"
    )
    assert len(trained) == 8 and not set(trained) & held  # 4 steps x 2 pairs, none held out
    assert set(evaluated) == held
