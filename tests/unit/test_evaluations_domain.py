"""The evaluations' state machine and watch routing (``domain/evaluations.py``), without a Job."""

from __future__ import annotations

from pathlib import Path

from services.common.records.evaluation import EvaluationRecord, EvaluationSpec, read_evaluation, write_spec
from services.common.store import LocalStore
from services.controlplane.domain.checkpoints import CheckpointService
from services.controlplane.domain.datasets import DatasetService
from services.controlplane.domain.evaluations import EvaluationService, derive_state, dispatch
from services.controlplane.domain.ports import ExecStatus, JobSpec
from tests.doubles import IdleExecutor


def record(state: str, error: str | None = None) -> EvaluationRecord:
    return EvaluationRecord.model_validate(
        {"id": "ev-1", "checkpoint_id": "ckpt-ft-a-1", "created_at": "t", "state": state, "error": error}
    )


def test_the_evaluators_own_terminal_record_wins_over_the_job() -> None:
    assert derive_state(record("failed", "bad pairs"), ExecStatus("failed", "BadData")) == (
        "failed",
        "bad pairs",
    )
    assert derive_state(record("succeeded"), ExecStatus("missing")) == ("succeeded", None)


def test_a_job_that_ended_without_the_evaluators_word_fails_the_evaluation() -> None:
    state, error = derive_state(record("running"), ExecStatus("failed", "SupervisorLost", "died"))
    assert state == "failed" and error is not None and "SupervisorLost" in error
    state, error = derive_state(record("queued"), ExecStatus("succeeded"))
    assert state == "failed" and error is not None and "without writing its result" in error
    assert derive_state(record("queued"), ExecStatus("running")) == ("running", None)
    assert derive_state(None, ExecStatus("pending")) == ("queued", None)


class Lost(IdleExecutor):
    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[JobSpec] = []

    def submit(self, spec: JobSpec) -> dict[str, str]:
        self.submitted.append(spec)
        return {"name": spec.finetune_id}

    def status(self, finetune_id: str) -> ExecStatus:
        return ExecStatus("failed", "SupervisorLost", "the supervisor died")


def test_reading_a_lost_evaluation_records_it_failed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    service = EvaluationService(
        store, Lost(), DatasetService(store, tmp_path / "c"), CheckpointService(store)
    )
    write_spec(
        store, EvaluationSpec(id="ev-1", created_at="t", checkpoint_id="ckpt-ft-a-1", base_model="tiny")
    )
    view = service.get("ev-1")
    assert view["state"] == "failed" and "SupervisorLost" in view["error"]
    assert read_evaluation(store, "ev-1").state == "failed"  # persisted: every replica agrees
    assert service.count_by_state()["failed"] == 1


def test_watch_events_of_evaluation_jobs_go_to_the_evaluations() -> None:
    seen: list[tuple[str, str]] = []
    handler = dispatch(lambda i, s: seen.append(("ft", i)), lambda i, s: seen.append(("ev", i)))
    handler("ft-abc", ExecStatus("running"))
    handler("ev-abc", ExecStatus("running"))
    assert seen == [("ft", "ft-abc"), ("ev", "ev-abc")]


class Recording(IdleExecutor):
    def __init__(self) -> None:
        super().__init__()
        self.cancelled: list[str] = []

    def cancel(self, finetune_id: str) -> None:
        self.cancelled.append(finetune_id)


def test_a_cancel_stops_the_job_and_wins_over_what_the_evaluator_writes_after_it(tmp_path: Path) -> None:
    import pytest

    from services.common.records.evaluation import read_evaluation_with_etag, write_evaluation
    from services.common.store import PreconditionFailed
    from services.controlplane.domain.errors import Conflict

    store = LocalStore(tmp_path / "s")
    executor = Recording()
    service = EvaluationService(
        store, executor, DatasetService(store, tmp_path / "c"), CheckpointService(store)
    )
    for eid in ("ev-1", "ev-2"):
        write_spec(
            store, EvaluationSpec(id=eid, created_at="t", checkpoint_id="ckpt-ft-a-1", base_model="tiny")
        )
    write_evaluation(store, record("running"))

    _, evaluators_etag = read_evaluation_with_etag(store, "ev-1")  # what the running evaluator holds
    view = service.cancel("ev-1", by="ann")
    assert view["state"] == "cancelled" and view["error"] == "cancelled on request by ann"
    assert executor.cancelled == ["ev-1"]
    assert service.cancel("ev-1", by="bob")["error"] == "cancelled on request by ann"  # a no-op
    # the evaluator's Job finishing after the cancel writes its record over its own: refused, the cancel wins
    with pytest.raises(PreconditionFailed):
        write_evaluation(store, record("succeeded"), if_match=evaluators_etag)
    assert service.get("ev-1")["state"] == "cancelled"
    assert service.latest_by_checkpoint() == {}  # a cancelled evaluation is no evidence for the gate
    assert service.count_by_state()["cancelled"] == 1
    assert [v["id"] for v in service.list(state="cancelled")[0]] == ["ev-1"]

    write_evaluation(store, record("succeeded").model_copy(update={"id": "ev-2"}))
    with pytest.raises(Conflict, match="evaluation ev-2 already succeeded; nothing to cancel"):
        service.cancel("ev-2")
    assert executor.cancelled == ["ev-1", "ev-1"]
