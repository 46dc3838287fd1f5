"""The SDK and CLI over human win rates and the rollout gate, against a real control plane app in
this process (its TestClient transport under the SDK): ``checkpoints preference``, ``datasets
preference``, ``rollouts canary --policy...``, ``rollouts evaluate``, ``rollouts history``.

The same verbs against running services, with real traffic: tests/e2e/test_gate_cli.py."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from huvidpo.cli import main
from huvidpo.client import Client, ExitCode
from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.domain.preference import wilson
from tests.abrounds import judge, publish_checkpoints, upload, write_round
from tests.doubles import IdleExecutor

CKPTS = ["ckpt-x-10", "ckpt-x-20", "ckpt-x-30"]


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[TestClient, LocalStore, Path]:
    """A control plane (dev mode, no background loop) the CLI's Client talks to in-process."""
    store = LocalStore(tmp_path / "store")
    publish_checkpoints(store, tmp_path / "ckpts", CKPTS)
    settings = ControlPlaneSettings(dev_mode=True, host="127.0.0.1", work_dir=tmp_path / "w")
    tc = TestClient(create_app(settings, store, IdleExecutor(), background=False))
    import huvidpo.client.cli as cli

    real = cli.Client

    def forward(req: httpx.Request) -> httpx.Response:
        r = tc.request(req.method, str(req.url), content=req.read(), headers=dict(req.headers))
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)

    def make(*a: Any, **kw: Any) -> Client:
        return real(*a, transport=httpx.MockTransport(forward), **kw)

    monkeypatch.setattr(cli, "Client", make)
    return tc, store, tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str, expect: int = 0) -> str:
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == expect, out.err
    assert "Traceback" not in out.err
    return out.out


def test_checkpoint_preference_is_a_table_of_win_rates_with_wilson_intervals_and_the_ranking(
    app: tuple[TestClient, LocalStore, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    tc, _, tmp = app
    version = upload(tc, {}, "r", write_round(tmp / "ds", CKPTS))
    # ckpt-x-10 wins every pair on both prompts for both raters, except one tie with ckpt-x-30.
    for rater in ("ann", "bob"):
        for p in range(2):
            for x, y in itertools.combinations(CKPTS, 2):
                a, b = f"{x}-p{p}-s0", f"{y}-p{p}-s0"
                tie = (x, y, rater, p) == ("ckpt-x-10", "ckpt-x-30", "bob", 1)
                judge(tc, "r", version, rater, a, b, None if tie else a)
    lines = run(capsys, "checkpoints", "preference", "ckpt-x-10").splitlines()
    assert lines[0].startswith("checkpoint ckpt-x-10: 1 A/B round(s)")
    assert lines[2].startswith(f"round r@{version[:12]}  checkpoints ckpt-x-10, ckpt-x-20, ckpt-x-30")
    assert "judged 12/12  complete" in lines[2]
    assert lines[3].split() == [
        "OPPONENT",
        "PROMPT",
        "WINS",
        "TIES",
        "LOSSES",
        "N",
        "WIN",
        "RATE",
        "WILSON",
        "95%",
    ]
    lo, hi = wilson(7.5, 8)
    assert lines[4].split() == ["(all)", "(all)", "7", "1", "0", "8", "0.938", f"[{lo:.3f},", f"{hi:.3f}]"]
    lo, hi = wilson(3.5, 4)
    assert lines[6].split() == [
        "ckpt-x-30",
        "(all)",
        "3",
        "1",
        "0",
        "4",
        "0.875",
        f"[{lo:.3f},",
        f"{hi:.3f}]",
    ]
    per_prompt = [ln for ln in lines if "a square slides" in ln]
    assert len(per_prompt) == 4  # 2 opponents x 2 prompts
    assert lines[-1].startswith("Bradley-Terry ranking: 1. ckpt-x-10 (")
    # --output json is the API's object
    data = json.loads(run(capsys, "checkpoints", "preference", "ckpt-x-10", "-o", "json"))
    assert data == tc.get("/v1/checkpoints/ckpt-x-10/preference").json()
    # the round as the rating page sees it
    rows = run(capsys, "datasets", "preference", "r", "--version", "latest").splitlines()
    assert rows[1].split()[:3] == ["CHECKPOINT", "OPPONENT", "PROMPT"]
    assert rows[2].split()[:2] == ["ckpt-x-10", "ckpt-x-20"]
    # a round needing three raters is still in progress: no numbers
    out = run(capsys, "checkpoints", "preference", "ckpt-x-10", "--min-raters", "3")
    assert "in progress" in out and "WINS" not in out
    err = main(["checkpoints", "preference", "ckpt-y-1"])
    assert err == ExitCode.NOT_FOUND and "ckpt-y-1" in capsys.readouterr().err


def write_evaluation(store: LocalStore, eid: str, checkpoint: str, acc: float, collapse: bool) -> None:
    store.put_json(
        f"evaluations/{eid}.json",
        {
            "id": eid,
            "checkpoint_id": checkpoint,
            "baseline": "base",
            "created_at": datetime.now(UTC).isoformat(),
            "state": "succeeded",
            "heldout_implicit_acc": acc,
            "heldout_reward_margin": 0.1,
            "motion_collapse": collapse,
            "results": {},
        },
    )


def test_canary_policy_options_evaluate_and_history_with_the_gate_s_reasons(
    app: tuple[TestClient, LocalStore, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, store, tmp = app
    run(capsys, "rollouts", "set", "web", CKPTS[0], "--create")
    policy_file = tmp / "policy.json"
    policy_file.write_text(json.dumps({"min_requests": 500, "max_error_ratio_margin": 0.05}))
    view = json.loads(
        run(
            capsys,
            "rollouts",
            "canary",
            "web",
            CKPTS[1],
            "--percent",
            "10",
            "--policy",
            str(policy_file),
            "--policy-min-accuracy",
            "0.8",
            "--policy-min-requests",
            "100",
            "--policy-ignore-human-rounds",
            "-o",
            "json",
        )
    )
    assert view["policy"]["min_heldout_accuracy"] == 0.8
    assert view["policy"]["min_requests"] == 100  # the option over the file
    assert view["policy"]["max_error_ratio_margin"] == 0.05  # the file
    assert view["policy"]["require_human_win"] is False
    assert view["policy"]["require_no_motion_collapse"] is True

    # no evaluation, no traffic: wait (exit 0), with what is missing
    out = run(capsys, "rollouts", "evaluate", "web")
    assert out.splitlines()[0] == "web revision 2: wait (recorded)"
    assert f"  - no succeeded evaluation of {CKPTS[1]} yet" in out
    assert "  - canary served 0 of the 100 requests needed" in out
    assert "already recorded" in run(capsys, "rollouts", "evaluate", "web")

    # the evaluation says motion collapse: rolled back (exit 1), the reasons on the history
    write_evaluation(store, "ev-1", CKPTS[1], acc=0.9, collapse=True)
    out = run(capsys, "rollouts", "evaluate", "web", expect=ExitCode.FAILED)
    assert out.splitlines()[0] == "web revision 2: rollback (rolled back)"
    assert "  - motion collapse flagged by evaluation ev-1" in out
    assert f"web  revision 3  current {CKPTS[0]}  canary -" in out
    hist = run(capsys, "rollouts", "history", "web").splitlines()
    assert hist[0].startswith("revision 1 ") and "set_current" in hist[0]
    gated = [i for i, ln in enumerate(hist) if "gate: rollback" in ln]
    assert len(gated) == 1 and "by rollout-gate" in hist[gated[0]]
    assert hist[gated[0] + 1] == "    - motion collapse flagged by evaluation ev-1"
    assert any("gate: wait" in ln for ln in hist)
    entries = json.loads(run(capsys, "rollouts", "history", "web", "-o", "json"))
    assert entries[-1]["decision"] == "rollback"
    assert entries[-1]["reasons"] == ["motion collapse flagged by evaluation ev-1"]

    # nothing to evaluate any more: refused (409), one line
    assert main(["rollouts", "evaluate", "web"]) == ExitCode.REFUSED
    assert "no canary with a policy" in capsys.readouterr().err
    # a policy file that is not JSON is a usage error
    policy_file.write_text("min_requests: 5")
    assert main(["rollouts", "canary", "web", CKPTS[1], "--percent", "10", "--policy", str(policy_file)]) == 2
    assert "not a JSON object" in capsys.readouterr().err
    # a policy the API refuses names its field
    code = main(["rollouts", "canary", "web", CKPTS[1], "--percent", "10", "--policy-min-accuracy", "2"])
    assert code == ExitCode.REFUSED and "min_heldout_accuracy" in capsys.readouterr().err


def test_a_canary_the_gate_rolls_back_while_the_cli_waits_is_reported_and_fails(
    app: tuple[TestClient, LocalStore, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``rollouts canary ... --wait`` printed the rolled-back rollout ("canary -") and exited 0 when the
    background gate rolled the canary back before the replicas served it (seen by hand, issue 19)."""
    from huvidpo.client.client import Rollouts

    _, store, _ = app
    run(capsys, "rollouts", "set", "web", CKPTS[0], "--create")
    write_evaluation(store, "ev-low", CKPTS[1], acc=0.6, collapse=False)

    def gate_acts_then_served(self: Rollouts, deployment: str, revision: int | None = None, **_: Any) -> Any:
        self.evaluate(deployment)  # the control plane's gate loop, between the canary and its serving
        return self.get(deployment)

    monkeypatch.setattr(Rollouts, "wait", gate_acts_then_served)
    argv = [
        "rollouts",
        "canary",
        "web",
        CKPTS[1],
        "--percent",
        "10",
        "--policy-min-accuracy",
        "0.95",
        "--wait",
    ]
    assert main(argv) == ExitCode.FAILED
    out = capsys.readouterr()
    assert "meanwhile revision 3: rollback by rollout-gate (gate: rollback)" in out.err
    assert "  - held-out implicit accuracy 0.600 < 0.95 (evaluation ev-low)" in out.err
    assert out.out.startswith(f"web  revision 3  current {CKPTS[0]}  canary -")

    # a change nothing undid: exit 0 and nothing said on stderr; -o json stays the view alone
    monkeypatch.setattr(Rollouts, "wait", lambda self, d, revision=None, **_: self.get(d))
    view = json.loads(run(capsys, "rollouts", "set", "web", CKPTS[2], "--wait", "-o", "json"))
    assert view["current"] == CKPTS[2]


def test_delete_verbs_say_what_was_deleted_or_what_holds_it(
    app: tuple[TestClient, LocalStore, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``checkpoints|datasets|fine-tunes|models delete``: one line on success; a refusal (409) names
    what holds it (exit 4), a missing one is exit 3 (same control plane as the gate tests)."""
    run(capsys, "rollouts", "set", "web", CKPTS[0], "--create")
    assert run(capsys, "checkpoints", "delete", CKPTS[2]) == f"deleted checkpoint {CKPTS[2]}\n"
    assert main(["checkpoints", "show", CKPTS[2]]) == ExitCode.NOT_FOUND
    capsys.readouterr()
    assert main(["checkpoints", "delete", CKPTS[0]]) == ExitCode.REFUSED
    err = capsys.readouterr().err
    assert f"checkpoint {CKPTS[0]} cannot be deleted: it is the current checkpoint of deployment 'web'" in err
    assert err.rstrip().endswith("(HTTP 409)")
    run(capsys, "datasets", "create", "scratch")
    assert run(capsys, "datasets", "delete", "scratch") == "deleted dataset scratch\n"
    assert main(["models", "delete", "nope"]) == ExitCode.NOT_FOUND
    assert "model 'nope' not found (HTTP 404)" in capsys.readouterr().err
    assert main(["fine-tunes", "delete", "ft-nope"]) == ExitCode.NOT_FOUND
