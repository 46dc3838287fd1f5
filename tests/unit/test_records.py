"""``services.common.records``: one exit-code enum and one home for store keys and ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from services.common.records.exit_codes import ExitCode
from services.common.settings import ControlPlaneSettings, StoreSettings
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
