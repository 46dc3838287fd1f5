"""``services.common.records``: one exit-code enum and one home for store keys and ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.records import keys
from services.common.records.exit_codes import ExitCode
from services.common.records.listing import published_checkpoints
from services.common.settings import ControlPlaneSettings, StoreSettings
from services.common.store import LocalStore
from services.controlplane.domain.ports import JobSpec
from services.controlplane.executors.kubernetes import build_job


def _supervise(tmp_path: Path, code: int) -> dict[str, object]:
    run_dir = tmp_path / f"run-{code}"
    run_dir.mkdir()
    cmd = [sys.executable, "-c", f"import sys; sys.exit({code})"]
    supervisor = [sys.executable, "-m", "services.controlplane.executors.supervisor", str(run_dir), "1"]
    subprocess.run([*supervisor, "--", *cmd], check=True, timeout=60)
    return dict(json.loads((run_dir / "exit.json").read_text()))


def test_job_policy_supervisor_and_trainer_use_the_same_exit_codes(tmp_path: Path) -> None:
    job = build_job(JobSpec("ft-x"), ControlPlaneSettings(work_dir=tmp_path / "w"), StoreSettings())
    rules = job["spec"]["podFailurePolicy"]["rules"]
    by_action = {r["action"]: r["onExitCodes"]["values"] for r in rules if "onExitCodes" in r}
    assert by_action == {"FailJob": [ExitCode.BAD_INPUT], "Count": [ExitCode.TRANSIENT]}

    # The local supervisor plays the Job controller: bad input is not retried, transient is.
    assert _supervise(tmp_path, ExitCode.BAD_INPUT) == {
        "exit_code": ExitCode.BAD_INPUT,
        "attempts": 1,
        "cancelled": False,
    }
    assert _supervise(tmp_path, ExitCode.TRANSIENT)["attempts"] == 2

    # The trainer on a bad config exits with the code the Job fails at once on.
    env = {**os.environ, "HUVIDPO_TRAINER_CHECKPOINT_EVERY": "-1", "HUVIDPO_STORE_ROOT": str(tmp_path / "s")}
    proc = subprocess.run(
        [sys.executable, "-m", "services.trainer"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stderr
    assert "HUVIDPO_TRAINER_CHECKPOINT_EVERY" in proc.stderr


def test_the_library_cli_bad_input_code_is_the_services_one() -> None:
    from huvidpo.cli import EXIT_BAD_INPUT

    assert EXIT_BAD_INPUT == ExitCode.BAD_INPUT


# -------------------------------------------------------------------------------------------- keys
@pytest.mark.parametrize(("finetune_id", "step"), [("ft-abc", 100), ("ft-a-1", 0), ("x", 9_999_999_999)])
def test_checkpoint_id_round_trips(finetune_id: str, step: int) -> None:
    cid = keys.checkpoint_id(finetune_id, step)
    assert cid == f"ckpt-{finetune_id}-{step}"
    assert keys.parse_checkpoint_id(cid) == (finetune_id, step)


@pytest.mark.parametrize(
    "cid", ["", "base", "ckpt-", "ckpt-ft", "ckpt-ft-", "ckpt-FT-1", "ckpt-ft-1x", "x-ft-1"]
)
def test_what_is_not_a_checkpoint_id_parses_to_none(cid: str) -> None:
    assert keys.parse_checkpoint_id(cid) is None


def test_keys_are_the_documented_layout() -> None:
    """docs/CONTRACTS.md, "Store layout": the keys are a contract, byte for byte."""
    assert keys.checkpoint_prefix("ckpt-ft-a-3") == "checkpoints/ckpt-ft-a-3/"
    assert keys.checkpoint_manifest_key("ckpt-ft-a-3") == "checkpoints/ckpt-ft-a-3/manifest.json"
    assert keys.finetune_prefix("ft-a") == "finetunes/ft-a/"
    assert keys.finetune_record_key("ft-a") == "finetunes/ft-a/record.json"
    assert keys.progress_key("ft-a") == "finetunes/ft-a/progress.jsonl"
    assert keys.idempotency_key("ab" * 32) == f"idempotency/finetunes/{'ab' * 32}.json"
    assert keys.dataset_prefix("cats") == "datasets/cats/"
    assert keys.dataset_version_prefix("cats", "d" * 64) == f"datasets/cats/{'d' * 64}/"
    assert keys.model_prefix("tiny") == "models/tiny/"
    assert keys.model_manifest_key("tiny") == "models/tiny/manifest.json"
    assert keys.rollout_key("default") == "rollouts/default.json"
    assert keys.generation_key("default", "r1", "mp4") == "generations/default/r1.mp4"


def test_one_checkpoint_listing_for_trainer_finetunes_and_checkpoints(tmp_path: Path) -> None:
    """Only published checkpoints (manifest present) of that fine-tune, by step: ``ft-a``'s list
    holds neither ``ft-a-1``'s checkpoints (whose ids also start ``ckpt-ft-a-``) nor one mid-upload."""
    from services.controlplane.domain.checkpoints import CheckpointService
    from services.controlplane.domain.datasets import DatasetService
    from services.controlplane.domain.finetunes import FineTuneService
    from services.trainer.entry import published_steps
    from tests.doubles import IdleExecutor

    store = LocalStore(tmp_path / "s")
    for fid, step in [("ft-a", 10), ("ft-a", 2), ("ft-a-1", 5), ("ft-b", 1)]:
        store.put_json(keys.checkpoint_manifest_key(keys.checkpoint_id(fid, step)), {"step": step})
    store.put_bytes(keys.checkpoint_prefix("ckpt-ft-a-20") + "adapter/x", b"mid-upload")

    assert published_checkpoints(store, "ft-a") == [("ft-a", 2, "ckpt-ft-a-2"), ("ft-a", 10, "ckpt-ft-a-10")]
    assert published_steps(store, "ft-a") == [2, 10]
    finetunes = FineTuneService(store, IdleExecutor(), DatasetService(store, tmp_path / "cache"))
    assert finetunes.checkpoint_ids("ft-a") == ["ckpt-ft-a-2", "ckpt-ft-a-10"]
    listed, _ = CheckpointService(store).list(finetune_id="ft-a")
    assert [c["id"] for c in listed] == ["ckpt-ft-a-2", "ckpt-ft-a-10"]
    assert len(CheckpointService(store).list()[0]) == 4


def test_records_import_neither_torch_nor_the_libraries_heavy_parts() -> None:
    """The supervisor and the control plane import these at start: they must stay light. Of the
    library they import only the training config (the typed hyperparameters are made from it) and the
    names it checks against (``huvidpo.precision``'s compile backends), which import neither torch,
    diffusers nor numpy."""
    code = (
        "import sys, services.common.records.keys, services.common.records.exit_codes, "
        "services.common.records.listing, services.common.records.progress, services.common.records.lineage, "
        "services.common.records.finetune, services.common.records.hyperparameters; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'numpy', 'peft')"
        " or (m.startswith('huvidpo.') and m not in ('huvidpo._lazy', 'huvidpo.bounds', 'huvidpo.models',"
        " 'huvidpo.models.patterns', 'huvidpo.training', 'huvidpo.training.config',"
        " 'huvidpo.training.options', 'huvidpo.precision'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
