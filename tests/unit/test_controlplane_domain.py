"""Pure pieces of the control plane's domain: the fine-tune state machine, progress, names, pages, digests."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.common.records.progress import EndEvent
from services.controlplane.domain.datasets import content_digest
from services.controlplane.domain.errors import InvalidRequest
from services.controlplane.domain.finetunes import derive_state, validate_hyperparameters
from services.controlplane.domain.names import validate_name, validate_relative_path
from services.controlplane.domain.ports import ExecStatus
from services.controlplane.domain.progress import parse_progress, summarize
from services.controlplane.domain.util import paginate

FAILED_END = EndEvent(state="failed", reason="DatasetError", message="bad video")


@pytest.mark.parametrize(
    ("record", "status", "end", "expected"),
    [
        ({"state": "queued", "submitted": True}, ExecStatus("pending"), None, ("queued", None)),
        ({"state": "queued", "submitted": True}, ExecStatus("running"), None, ("running", None)),
        ({"state": "running", "submitted": True}, ExecStatus("succeeded"), None, ("succeeded", None)),
        # the trainer's own reason beats the Job's generic one
        (
            {"state": "running", "submitted": True},
            ExecStatus("failed", "PodFailurePolicy"),
            FAILED_END,
            ("failed", "DatasetError"),
        ),
        (
            {"state": "running", "submitted": True},
            ExecStatus("failed", "BackoffLimitExceeded"),
            None,
            ("failed", "BackoffLimitExceeded"),
        ),
        # the Job was garbage-collected (ttlSecondsAfterFinished): the end record still tells
        (
            {"state": "running", "submitted": True},
            ExecStatus("missing"),
            EndEvent(state="succeeded"),
            ("succeeded", None),
        ),
        ({"state": "running", "submitted": True}, ExecStatus("missing"), None, ("failed", "JobLost")),
        ({"state": "queued", "submitted": False}, ExecStatus("missing"), None, ("queued", None)),
        # a cancel request wins; terminal states never change
        (
            {"state": "running", "submitted": True, "cancel_requested_at": "t"},
            ExecStatus("running"),
            None,
            ("cancelled", "CancelledByUser"),
        ),
        ({"state": "failed", "reason": "X"}, ExecStatus("succeeded"), None, ("failed", "X")),
        (
            {"state": "cancelled", "reason": "CancelledByUser"},
            ExecStatus("succeeded"),
            None,
            ("cancelled", "CancelledByUser"),
        ),
    ],
)
def test_state_machine(
    record: dict[str, Any], status: ExecStatus, end: EndEvent | None, expected: tuple[str, str | None]
) -> None:
    state, reason, _ = derive_state(record, status, end)
    assert (state, reason) == expected


def test_progress_summary_eta_attempts_and_torn_lines() -> None:
    lines = [
        {"event": "start", "total_steps": 10},
        {"event": "step", "step": 2, "loss": 0.7, "implicit_acc": 0.5, "step_seconds": 3.0},
        {"event": "checkpoint", "step": 2, "checkpoint_id": "ckpt-ft-a-2"},
        {"event": "end", "state": "failed", "exit_code": 75},
        {"event": "start", "total_steps": 10, "resumed_from_step": 2},
        {"event": "step", "step": 4, "loss": 0.6, "implicit_acc": 0.75, "step_seconds": 1.0},
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"event": "step", "st'  # torn last write
    s = summarize(parse_progress(text))
    assert (s.step, s.total_steps, s.attempts, s.resumed_from_step) == (4, 10, 2, 2)
    assert s.end is None  # the retry reset the failed attempt's end
    assert s.reward_accuracy == 0.75 and s.loss == 0.6
    assert s.eta_seconds == pytest.approx(6 * 2.0)  # 6 steps left at the mean step time (3 + 1) / 2
    assert s.checkpoints == ["ckpt-ft-a-2"]


@pytest.mark.parametrize("bad", ["", "A", "-a", "a-", "a_b", "a/b", "..", "a" * 64, "é"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_name(bad)


@pytest.mark.parametrize(
    "bad", ["../x.mp4", "/etc/x.json", "a//b.mp4", "a\\b.mp4", ".hidden.json", "a\nb.json", "a/./b.mp4"]
)
def test_bad_relative_paths_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_relative_path(bad)
    assert validate_relative_path("videos/clip_01.mp4") == "videos/clip_01.mp4"


def test_pages_follow_the_last_key_not_an_offset() -> None:
    items = [f"k{i:02d}" for i in range(5)]
    page, token = paginate(items, lambda x: x, 2, None)
    assert page == ["k00", "k01"] and token
    items.insert(0, "a-new-first-item")  # an insert before the cursor does not shift the next page
    page2, _ = paginate(sorted(items), lambda x: x, 2, token)
    assert page2 == ["k02", "k03"]
    assert paginate(items[::-1], lambda x: x, 10, None, descending=True)[1] is None


def test_content_digest_depends_on_content_not_order() -> None:
    a = {"x": {"sha256": "1", "size": 1}, "y": {"sha256": "2", "size": 2}}
    b = dict(reversed(list(a.items())))
    assert content_digest(a) == content_digest(b)
    assert content_digest(a) != content_digest({**a, "y": {"sha256": "3", "size": 2}})


def test_hyperparameters_are_checked_by_the_training_config() -> None:
    assert validate_hyperparameters("dpo", {"max-steps": 5}).max_steps == 5  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest) as err:
        validate_hyperparameters("dpo", {"beta": 0})
    assert err.value.field == "hyperparameters.beta"
    with pytest.raises(InvalidRequest):
        validate_hyperparameters("stage3", {})


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [
        # Messages naming two options (or an option whose name holds another's) once made the
        # control plane guess the wrong one from the text; the config now says which it refused.
        ({"lora_alpha": 0, "lora_dropout": 0.1}, "lora_alpha"),
        ({"adam_eps": 0, "weight_decay": 0.01}, "adam_eps"),
        ({"timestep_min": 0, "timestep_max": 2000}, "timestep_max"),
        ({"lr": 0.001, "lr_scheduler": "sometimes"}, "lr_scheduler"),
        ({"num_frames": 1, "frame_stride": 1}, "num_frames"),
        ({"bogus_option": 1}, "bogus_option"),
        ({"beta": "high"}, "beta"),
    ],
)
def test_a_refused_hyperparameter_is_named_by_the_config_not_guessed(
    hyperparameters: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate_hyperparameters("dpo", hyperparameters)
    assert err.value.field == f"hyperparameters.{field}"
