"""Evaluations through the control plane: ``POST /v1/evaluations`` runs the real evaluator
(``python -m services.evaluator``) as a Job of the LocalExecutor on the tiny model, and its record
reaches ``GET /v1/evaluations/{id}``, ``GET /v1/checkpoints/{id}``, ``/metrics``, the comparison PNG,
the SDK and the CLI, all against a uvicorn server on 127.0.0.1.

The checkpoint is a random LoRA adapter (it changes the model) published under a fine-tune whose
spec the control plane really created: its pairs were compiled with a hold-out of one prompt, so the
evaluation's default held-out pairs and prompts are that fine-tune's.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from huvidpo.cli import main
from huvidpo.client import Client, ExitCode, InvalidInput
from services.common.publish import publish_dir
from services.common.records import keys
from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.domain.datasets import DatasetService
from services.controlplane.domain.finetunes import FineTuneRequest, FineTuneService
from services.controlplane.executors.local import LocalExecutor
from tests.doubles import IdleExecutor
from tests.unit.test_evaluation import random_adapter

REPO = Path(__file__).resolve().parents[2]
# The checkpoint's training config as its lineage records it (the held-out measure reuses it).
TRAINED = {"beta": 25.0, "num_frames": 4, "height": 32, "width": 32, "timestep_max": 150, "eval_draws": 1}
GENERATION = {"steps": 2, "guidance_scale": 1.0}


@dataclass
class Live:
    url: str
    store: LocalStore
    checkpoint: str  # of a fine-tune that held out a prompt
    no_heldout: str  # of a fine-tune that held out nothing
    finetune: dict[str, Any]
    version: str
    work: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    from huvidpo.data import make_synthetic_dataset

    tmp = tmp_path_factory.mktemp("evaluations")
    store = LocalStore(tmp / "store")
    publish_dir(store, tiny_model_dir, "models/tiny/", {"id": "tiny"})
    ds = make_synthetic_dataset(tmp / "ds", n_prompts=2, videos_per_prompt=2, num_frames=4, size=32)
    datasets = DatasetService(store, tmp / "cache")
    datasets.create("cats")
    upload = datasets.start_upload("cats")
    for p in sorted(q for q in ds.rglob("*") if q.is_file()):
        with p.open("rb") as fh:
            datasets.stage_stream("cats", upload["id"], p.relative_to(ds).as_posix(), fh)
    version = str(datasets.commit_upload("cats", upload["id"])["id"])
    # Fine-tune records as the control plane writes them (no trainer runs: the checkpoints are made here).
    fts = FineTuneService(store, IdleExecutor(), datasets)
    size = {"num_frames": 4, "height": 32, "width": 32}
    ft, _ = fts.create(FineTuneRequest("cats", version, "tiny", "dpo", {**size, "holdout_fraction": 0.5}))
    ft_plain, _ = fts.create(FineTuneRequest("cats", version, "tiny", "dpo", size))
    adapter = random_adapter(tiny_model_dir, tmp / "ckpt", seed=1)
    ids = []
    for f in (ft, ft_plain):
        cid = keys.checkpoint_id(f["id"], 1)
        lineage = {"finetune_id": f["id"], "base_model": "tiny", "dataset": "cats", "config": TRAINED}
        publish_dir(store, adapter, keys.checkpoint_prefix(cid), {"lineage": lineage, "step": 1})
        ids.append(cid)

    settings = ControlPlaneSettings(work_dir=tmp / "work", dev_mode=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HUVIDPO_STORE_BACKEND": "local",
        "HUVIDPO_STORE_ROOT": str(tmp / "store"),
        "HUVIDPO_EVALUATOR_WORK_DIR": str(tmp / "work" / "evaluator"),
        "OMP_NUM_THREADS": "1",
    }
    executor = LocalExecutor(settings.work_dir, env, max_retries=0, python=sys.executable)
    app = create_app(settings, store, executor, background=False)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield Live(f"http://127.0.0.1:{port}", store, ids[0], ids[1], ft, version, tmp)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def cli(live: Live, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main([*args, "--url", live.url])
    return code, out.getvalue()


def test_an_evaluation_job_runs_and_its_record_reaches_the_api_metrics_sdk_and_cli(live: Live) -> None:
    with Client(live.url) as c:
        first = c.evaluations.create(live.checkpoint, seeds=[0], generation=GENERATION, idempotency_key="k1")
        assert first["state"] in ("queued", "running"), first
        # By default: the held-out pairs the fine-tune compiled, and their prompts.
        assert first["spec"]["heldout_prefix"] == live.finetune["pairs"]["prefix"]
        assert first["spec"]["prompts"] and first["spec"]["generation"]["num_frames"] == 4
        # A retried create (same Idempotency-Key, same body) is the same evaluation: one Job.
        again = httpx.post(
            f"{live.url}/v1/evaluations",
            json={"checkpoint": live.checkpoint, "seeds": [0], "generation": GENERATION, "baseline": "base"},
            headers={"Idempotency-Key": "k1"},
        )
        assert again.status_code == 200 and again.json()["id"] == first["id"], again.text
        other = httpx.post(
            f"{live.url}/v1/evaluations",
            json={"checkpoint": live.checkpoint, "seeds": [1]},
            headers={"Idempotency-Key": "k1"},
        )
        assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key", other.text
        view = c.evaluations.wait(first["id"], timeout=900, interval=1.0)
        assert view["state"] == "succeeded", view
        summary = view["summary"]
        assert summary["heldout_pairs"] and 0 <= summary["heldout_implicit_acc"] <= 1
        assert summary["motion"] is not None and summary["base_motion"] is not None
        assert isinstance(summary["motion_collapse"], bool)
        assert view["record"]["results"][live.checkpoint]["adapter"] == f"checkpoints/{live.checkpoint}/"
        # Each default (held-out) prompt starts from frame 0 of one of its held-out videos: fidelity measured.
        for prompt in view["record"]["results"][live.checkpoint]["prompts"]:
            assert prompt["first_frame"].endswith(".mp4") and prompt["first_frame_psnr"] is not None, prompt
        (live.work / "report.json").write_text(json.dumps(view["record"], indent=2))

        # The checkpoint shows its latest succeeded evaluation.
        ck = c.checkpoints.get(live.checkpoint)
        assert ck["evaluation"]["evaluation_id"] == first["id"]
        assert ck["evaluation"]["heldout_implicit_acc"] == summary["heldout_implicit_acc"]
        assert c.checkpoints.get(live.no_heldout)["evaluation"] is None
        assert [v["id"] for v in c.evaluations.list(checkpoint=live.checkpoint)] == [first["id"]]
        assert list(c.evaluations.list(checkpoint=live.no_heldout)) == []

        png = c.evaluations.plot(first["id"], live.work / "comparison.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = httpx.get(f"{live.url}/metrics").text
    line = f'huvidpo_evaluation_heldout_accuracy{{checkpoint="{live.checkpoint}"}}'
    assert line in metrics
    value = float(next(ln for ln in metrics.splitlines() if ln.startswith(line)).split()[-1])
    assert value == pytest.approx(summary["heldout_implicit_acc"])
    assert f'huvidpo_evaluation_motion_collapse{{checkpoint="{live.checkpoint}"}}' in metrics
    assert f'huvidpo_evaluation_motion_magnitude{{checkpoint="{live.checkpoint}"}}' in metrics
    assert 'huvidpo_controlplane_evaluations{state="succeeded"} 1.0' in metrics

    code, out = cli(live, "evaluations", "show", first["id"], "--output", "json")
    assert code == 0 and json.loads(out)["summary"]["evaluation_id"] == first["id"]
    code, out = cli(live, "evaluations", "wait", first["id"])
    assert code == 0 and "held-out" in out and "motion" in out
    # every statistic the record holds reaches the summary and the CLI, the base's beside the checkpoint's
    for stat in ("warp_error", "flicker", "first_frame_psnr"):
        assert summary[stat] is not None and summary[f"base_{stat}"] is not None, (stat, summary)
    assert summary["clip_skipped"] and "clip_model" in summary["clip_skipped"]
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert (
        f"warp error {summary['warp_error']:.4g} (base {summary['base_warp_error']:.4g})"
        in lines["consistency"]
    )
    assert f"PSNR {summary['first_frame_psnr']:.1f} dB" in lines["first"]
    assert "skipped: no CLIP model configured" in lines["CLIP"]
    code, out = cli(live, "evaluations", "list", "--checkpoint", live.checkpoint)
    assert code == 0 and first["id"] in out and "succeeded" in out
    code, out = cli(live, "checkpoints", "show", live.checkpoint)
    assert code == 0 and f"evaluation       {first['id']}" in out and "acc " in out, out
    code, out = cli(live, "checkpoints", "show", live.no_heldout)
    assert code == 0 and "evaluation       none yet" in out


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"checkpoint": "ckpt-ft-nope-1"}, "checkpoint", "not found"),
        ({"baseline": "ckpt-ft-nope-2"}, "baseline", "not found"),
        ({"prompts": [{"prompt": "a cat", "first_frame": "nope.png"}]}, "prompts[0].first_frame", "nope.png"),
        ({"dataset": "cats"}, "version", "together"),
        ({"pairs": {"holdout_fraction": 0}}, "pairs.holdout_fraction", "> 0"),
    ],
)
def test_a_bad_request_is_refused_with_the_field_before_any_job(
    live: Live, body: dict[str, Any], field: str, says: str
) -> None:
    before = set(live.store.list_dirs(keys.EVALUATIONS))
    r = httpx.post(f"{live.url}/v1/evaluations", json={"checkpoint": live.checkpoint, **body})
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["field"] == field and says in problem["detail"], problem
    assert set(live.store.list_dirs(keys.EVALUATIONS)) == before


def test_a_checkpoint_whose_fine_tune_held_out_nothing_is_refused_naming_pairs(live: Live) -> None:
    r = httpx.post(f"{live.url}/v1/evaluations", json={"checkpoint": live.no_heldout})
    assert r.status_code == 422 and r.json()["field"] == "pairs", r.text
    assert "holdout_fraction" in r.json()["detail"]
    with Client(live.url, retries=0) as c, pytest.raises(InvalidInput):
        c.evaluations.create(live.no_heldout)
    code, _ = cli(live, "evaluations", "create", live.no_heldout)
    assert code == ExitCode.REFUSED


def test_unknown_evaluations_are_404(live: Live) -> None:
    assert httpx.get(f"{live.url}/v1/evaluations/ev-nope").status_code == 404
    assert httpx.get(f"{live.url}/v1/evaluations/ev-nope/comparison.png").status_code == 404
    code, _ = cli(live, "evaluations", "show", "ev-nope")
    assert code == ExitCode.NOT_FOUND


def test_a_running_evaluation_is_cancelled_its_job_stopped_and_it_stays_cancelled(live: Live) -> None:
    with Client(live.url) as c:
        slow = {"steps": 50, "guidance_scale": 1.0}  # long enough to be caught running
        ev = c.evaluations.create(live.checkpoint, seeds=[0, 1, 2, 3], generation=slow)
        deadline = time.monotonic() + 120
        while c.evaluations.get(ev["id"])["state"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.evaluations.get(ev["id"])["state"] == "running"
        run = json.loads(next((live.work / "work").rglob(f"{ev['id']}/run.json")).read_text())

        code, out = cli(live, "evaluations", "cancel", ev["id"])
        assert code == 0 and out.splitlines()[0].split()[:2] == [ev["id"], "cancelled"], out
        assert "reason           cancelled on request" in out
        with pytest.raises(ProcessLookupError):  # the Job's process group is gone
            os.killpg(int(run["pid"]), 0)
        time.sleep(1.0)
        view = c.evaluations.get(ev["id"])
        assert view["state"] == "cancelled" and view["summary"] is None
        assert c.evaluations.cancel(ev["id"])["state"] == "cancelled"  # again: a no-op
        assert [v["id"] for v in c.evaluations.list(state="cancelled")] == [ev["id"]]

        done = next(iter(c.evaluations.list(state="succeeded")), None)
        if done is not None:  # the first test's evaluation: finished, nothing to cancel
            r = httpx.post(f"{live.url}/v1/evaluations/{done['id']}/cancel")
            assert r.status_code == 409 and "already succeeded" in r.json()["detail"], r.text
    line, deadline = 'huvidpo_controlplane_evaluations{state="cancelled"} 1.0', time.monotonic() + 60
    while line not in httpx.get(f"{live.url}/metrics").text:  # the scrape caches the counts a few seconds
        assert time.monotonic() < deadline, f"{line} never reached /metrics"
        time.sleep(1.0)
