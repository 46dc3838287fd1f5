"""Fine-tune spec and status in the store: the spec is written once, the status only with
compare-and-swap, so two control-plane replicas on one store lose no update."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.records import finetune as records
from services.common.records import keys
from services.common.records.finetune import FineTuneSpec, FineTuneStatus, read_spec, read_status, write_spec
from services.common.store import LocalStore, ObjectStore
from services.controlplane.domain.datasets import DatasetService
from services.controlplane.domain.errors import Conflict
from services.controlplane.domain.finetunes import FineTuneService
from services.controlplane.domain.ports import ExecStatus, JobSpec, Phase


class SlowReadStore(LocalStore):
    """A LocalStore that dawdles between reading an object and returning it (``delay``: seconds, a
    range), as a replica on a slow network does: another replica may write in that window."""

    def __init__(self, root: Path, delay: tuple[float, float]) -> None:
        super().__init__(root)
        self.delay = delay

    def get_bytes_with_etag(self, key: str) -> tuple[bytes, str | None]:
        data = super().get_bytes_with_etag(key)
        time.sleep(random.uniform(*self.delay))
        return data


class PhaseExecutor:
    """An executor whose every Job reports ``phase``."""

    kind = "fake"

    def __init__(self, phase: Phase) -> None:
        self.phase = phase

    def submit(self, spec: JobSpec) -> dict[str, str]:
        return {"name": spec.finetune_id}

    def status(self, finetune_id: str) -> ExecStatus:
        return ExecStatus(self.phase)

    def cancel(self, finetune_id: str) -> None:
        return None

    def logs(self, finetune_id: str, follow: bool = False) -> Iterator[bytes]:
        return iter(())

    def ready(self) -> bool:
        return True


def _spec(finetune_id: str) -> FineTuneSpec:
    return FineTuneSpec(
        id=finetune_id,
        created_at="2026-01-01T00:00:00Z",
        dataset="cats",
        version="a" * 64,
        base_model="tiny",
        hyperparameters={"beta": 500.0},
        lineage={"dataset": "cats", "finetune_id": finetune_id},
        fingerprint="f" * 64,
    )


# Both replicas jittery; or the watching replica B so slow that A's cancel lands inside every one of
# B's read-to-write windows (the interleaving that loses the cancel without compare-and-swap).
JITTER = ((0.0, 0.004), (0.0, 0.004))
SLOW_WATCH = ((0.0, 0.0), (0.05, 0.05))


def _replicas(
    root: Path, phase: Phase, delays: tuple[tuple[float, float], ...]
) -> tuple[FineTuneService, FineTuneService]:
    """Two control-plane instances, each with its own store client, on one store."""
    out = []
    for delay in delays:
        store = SlowReadStore(root, delay)
        out.append(FineTuneService(store, PhaseExecutor(phase), DatasetService(store, root.parent / "cache")))
    return out[0], out[1]


def _one_round(
    a: FineTuneService, b: FineTuneService, spec: FineTuneSpec, queued: FineTuneStatus, phase: Phase
) -> str:
    """A cancels while B reconciles three times, started together; returns how the cancel was answered."""
    go = threading.Event()
    outcome: dict[str, str] = {}

    def cancel() -> None:
        go.wait()
        try:
            a.cancel(spec.id)
            outcome["cancel"] = "ok"
        except Conflict:
            outcome["cancel"] = "conflict"

    def watch() -> None:
        go.wait()
        for _ in range(3):
            b.reconcile(spec, queued, ExecStatus(phase))

    threads = [threading.Thread(target=cancel), threading.Thread(target=watch)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(timeout=30)
    return outcome["cancel"]


def _race(tmp_path: Path, phase: Phase, rounds: int, delays: tuple[tuple[float, float], ...]) -> list[str]:
    """Each round: replica A cancels a queued fine-tune while replica B reconciles it with a Job
    in ``phase`` (as the watch thread does). Returns what went wrong, one line per lost update."""
    a, b = _replicas(tmp_path / "store", phase, delays)
    lost = []
    for i in range(rounds):
        fid = f"ft-race-{i}"
        spec = records.write_spec(a.store, _spec(fid))
        queued = FineTuneStatus(submitted=True, job={"name": fid}, updated_at=spec.created_at)
        records.update_status(a.store, fid, lambda cur, q=queued: q)  # type: ignore[misc]
        outcome = _one_round(a, b, spec, queued, phase)
        final = read_status(a.store, fid)
        assert final is not None
        if outcome == "ok" and (final.state != "cancelled" or not final.cancel_requested_at):
            lost.append(f"{fid}: cancel answered ok, stored {final.state} {final.cancel_requested_at}")
        if outcome == "conflict" and final.state != phase:
            lost.append(f"{fid}: cancel refused as {phase}, stored {final.state}")
    return lost


@pytest.mark.parametrize(
    ("phase", "delays"),
    [("running", JITTER), ("succeeded", JITTER), ("running", SLOW_WATCH)],
    ids=["running-jitter", "succeeded-jitter", "running-slow-watch"],
)
def test_two_replicas_racing_cancel_and_watch_lose_no_update(
    tmp_path: Path, phase: Phase, delays: tuple[tuple[float, float], ...]
) -> None:
    assert _race(tmp_path, phase, 20, delays) == []


def test_the_race_loses_updates_with_blind_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race above is real: with the compare-and-swap write replaced by a plain put, updates are lost."""

    def blind(store: ObjectStore, key: str, status: FineTuneStatus, etag: str | None) -> None:
        store.put_json(key, status.model_dump(mode="json"))

    monkeypatch.setattr(records, "_put_status", blind)
    lost = _race(tmp_path, "running", 10, SLOW_WATCH)
    assert len(lost) >= 3, lost  # typically 8-10 of 10


def test_spec_is_written_once(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    spec = _spec("ft-a")
    assert records.write_spec(store, spec) == spec
    assert records.write_spec(store, spec) == spec  # a retried create finds its own spec
    with pytest.raises(records.SpecConflict):
        records.write_spec(store, spec.model_copy(update={"fingerprint": "0" * 64}))
    assert read_spec(store, "ft-a") == spec


def test_an_older_stores_single_record_reads_as_spec_and_status(tmp_path: Path) -> None:
    """Stores written before the split hold ``record.json`` only: it still reads, and the first status
    change writes ``status.json`` without touching the old record."""
    store = LocalStore(tmp_path / "s")
    old = {
        "id": "ft-old",
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:01Z",
        "state": "running",
        "reason": None,
        "message": None,
        "request": {
            "dataset": "cats",
            "version": "a" * 64,
            "base_model": "tiny",
            "stage": "dpo",
            "hyperparameters": {"beta": 100.0},
        },
        "lineage": {"dataset": "cats", "finetune_id": "ft-old"},
        "fingerprint": "f" * 64,
        "submitted": True,
        "job": {"name": "ft-old"},
        "cancel_requested_at": None,
        "finished_at": None,
    }
    store.put_json(keys.finetune_record_key("ft-old"), old)
    svc = FineTuneService(store, PhaseExecutor("running"), DatasetService(store, tmp_path / "cache"))
    view = svc.get("ft-old")
    assert (view["state"], view["hyperparameters"], view["job"]) == (
        "running",
        {"beta": 100.0},
        {"name": "ft-old"},
    )
    assert [v["id"] for v in svc.list()[0]] == ["ft-old"]
    svc.cancel("ft-old")
    assert store.get_json(keys.finetune_status_key("ft-old"))["state"] == "cancelled"
    assert store.get_json(keys.finetune_record_key("ft-old"))["state"] == "running"
    assert svc.get("ft-old")["state"] == "cancelled"


# ------------------------------------------------------------------ typed hyperparameters in the spec
def _typed_spec(stage: str, hyperparameters: dict[str, object]) -> FineTuneSpec:
    from services.common.records import hyperparameters as hp_mod

    return FineTuneSpec(
        id="ft-typed",
        created_at="2026-12-03T00:00:00Z",
        dataset="cats",
        version="0" * 64,
        base_model="tiny",
        stage=stage,  # type: ignore[arg-type]
        hyperparameters=hp_mod.parse(stage, hyperparameters),
    )


def test_a_spec_holds_typed_hyperparameters_and_stores_only_those_set(tmp_path: Path) -> None:
    from huvidpo.training.config import DPOConfig, Stage1Config
    from services.common.records import hyperparameters as hp_mod

    store = LocalStore(tmp_path)
    # As a YAML file or a JSON client may send them: 1e4 for an int, a string for a float, "-" keys.
    spec = write_spec(store, _typed_spec("dpo", {"max-steps": 1e4, "beta": "25", "lora_rank": 8}))
    stored = store.get_json(keys.finetune_spec_key(spec.id))
    assert stored["hyperparameters"] == {"max_steps": 10000, "beta": 25.0, "lora_rank": 8}
    back = read_spec(store, spec.id)
    assert back is not None and isinstance(back.hyperparameters, hp_mod.DPOHyperparameters)
    assert back.hyperparameters.model_fields_set == {"max_steps", "beta", "lora_rank"}
    # Unset options are the library's defaults, typed: the trainer's config comes from the spec alone.
    cfg = hp_mod.to_config("dpo", back.hyperparameters, model="m", dataset="d", output_dir="o")
    assert isinstance(cfg, DPOConfig)
    assert (cfg.max_steps, cfg.beta, cfg.lora_rank, cfg.lora_alpha) == (10000, 25.0, 8, DPOConfig.lora_alpha)

    stage1 = write_spec(store, _typed_spec("stage1", {"max_steps": 7}).model_copy(update={"id": "ft-s1"}))
    back1 = read_spec(store, stage1.id)
    assert back1 is not None and isinstance(back1.hyperparameters, hp_mod.Stage1Hyperparameters)
    assert isinstance(
        hp_mod.to_config("stage1", back1.hyperparameters, model="m", dataset="d", output_dir="o"),
        Stage1Config,
    )


def test_the_typed_models_are_the_library_config_less_what_the_trainer_sets() -> None:
    import dataclasses

    from huvidpo.training.config import ConfigError, DPOConfig, Stage1Config
    from services.common.records import hyperparameters as hp_mod

    for stage, cls in (("dpo", DPOConfig), ("stage1", Stage1Config)):
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(hp_mod.MODELS[stage].model_fields) == names - hp_mod.RESERVED
    # A stage-1 spec cannot carry a DPO option; a stored spec with one does not read as valid.
    with pytest.raises(ConfigError) as err:
        hp_mod.parse("stage1", {"beta": 10})
    assert err.value.field == "beta"
    with pytest.raises(ConfigError) as err:
        hp_mod.parse("dpo", {"pairs_file": "/etc/passwd"})
    assert err.value.field == "pairs_file"
    with pytest.raises(ValueError):
        FineTuneSpec.model_validate(
            {
                "id": "x",
                "created_at": "",
                "dataset": "d",
                "version": "v",
                "base_model": "b",
                "stage": "stage1",
                "hyperparameters": {"beta": 10},
            }
        )
