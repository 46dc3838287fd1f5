"""The trainer entrypoint as ranks of a multi-process fine-tune: the shape from Kubeflow Trainer's
``PET_*`` variables, one outcome for the whole group, the time-based checkpoint, and a real 2-node
run (two ``python -m services.trainer`` pods, each with its own work dir, rendezvous on 127.0.0.1,
gloo) that trains the same LoRA weights as one process on the same global batch, and that fails as a
whole when one node is killed and resumes on the retry."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.publish import publish_dir
from services.common.records.exit_codes import ExitCode
from services.common.records.finetune import FineTuneSpec, write_spec
from services.common.settings import TrainerSettings
from services.common.store import LocalStore
from services.controlplane.domain.datasets import DatasetService
from services.trainer.entry import published_steps, run
from services.trainer.ranks import NodeShape, Ranks, ShapeError, node_exit_code, node_shape, worst

REPO = Path(__file__).resolve().parents[2]


# -- the shape and the outcome ----------------------------------------------------------------------
def test_pet_variables_give_the_node_shape_and_the_job_index_is_the_node_rank() -> None:
    pet = {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "ft-0.ft",
           "PET_MASTER_PORT": "29400"}  # fmt: skip
    assert node_shape(pet) == NodeShape(4, 8, 3, "ft-0.ft", 29400)
    assert node_shape(pet).world_size == 32  # type: ignore[union-attr]
    indexed = {**pet, "JOB_COMPLETION_INDEX": "2"}
    del indexed["PET_NODE_RANK"]
    assert node_shape(indexed) == NodeShape(4, 8, 2, "ft-0.ft", 29400)
    assert node_shape({}) is None  # one process, as before
    assert node_shape({**pet, "RANK": "5"}) is None  # a worker torchrun started: not a node
    assert node_shape({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1"}) == NodeShape(
        1, 1, 0, "127.0.0.1", 29500
    )
    for bad, word in (({**pet, "PET_NNODES": "two"}, "PET_NNODES"), ({**pet, "PET_NODE_RANK": "4"}, "PET_NODE_RANK"),
                      ({"PET_NNODES": "2"}, "PET_MASTER_ADDR")):  # fmt: skip
        with pytest.raises(ShapeError, match=word):
            node_shape(bad)
    args = NodeShape(2, 1, 1, "10.0.0.7", 23456).torchrun_args()
    assert {"--nnodes=2", "--nproc-per-node=1", "--node-rank=1", "--master-addr=10.0.0.7",
            "--master-port=23456", "--max-restarts=0"} <= set(args)  # fmt: skip


def test_torchrun_variables_give_the_rank() -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    r = Ranks.from_environ(env)
    assert (r.rank, r.world_size, r.local_rank, r.node_rank, r.main, r.node_main, r.distributed) == (
        5, 8, 1, 1, False, False, True)  # fmt: skip
    assert Ranks.from_environ({}) == Ranks() and Ranks().main and not Ranks().distributed


def test_the_attempt_ends_with_the_most_severe_rank_outcome() -> None:
    ok, bad, crash, gone = (0, None, ""), (2, "ClipError", "x"), (1, "KeyError", "y"), (75, "PeerLost", "z")
    assert worst([ok, ok]) == ok
    assert worst([gone, bad]) == bad  # the rank that saw the bad data, not its peer's echo
    assert worst([gone, crash, ok]) == crash
    assert worst([gone, ok]) == gone
    # A node's code from its failed workers' (negative: killed by that signal).
    assert node_exit_code([75, -int(signal.SIGTERM)]) == ExitCode.TRANSIENT
    assert node_exit_code([-int(signal.SIGKILL)]) == ExitCode.FAILED
    assert node_exit_code([75, 2]) == ExitCode.BAD_INPUT
    assert node_exit_code([]) == ExitCode.OK


def test_a_bad_shape_is_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HUVIDPO_STORE_ROOT": str(tmp_path / "s"),
           "HUVIDPO_TRAINER_FINETUNE_ID": "ft-x", "PET_NNODES": "2", "PET_NODE_RANK": "5"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "services.trainer"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == ExitCode.BAD_INPUT and "PET_NODE_RANK" in proc.stderr


# -- a store with the tiny model, a dataset version and fine-tune specs ------------------------------
HP = dict(num_frames=4, height=32, width=32, lora_rank=2, lora_alpha=2, lora_dropout=0.0, lr=1e-3, seed=5,
          checkpoint_every=2, keep_last=10, plot=False)  # fmt: skip
"""LoRA dropout off: its masks come from each process's global RNG, which no split can reproduce."""


def _store(tmp_path: Path, tiny_model_dir: Path) -> tuple[LocalStore, str]:
    from huvidpo.data import make_synthetic_dataset

    store = LocalStore(tmp_path / "store")
    publish_dir(store, tiny_model_dir, "models/tiny/", {})
    ds = make_synthetic_dataset(
        tmp_path / "ds", n_prompts=2, videos_per_prompt=3, num_frames=6, size=32, seed=1
    )
    datasets = DatasetService(store, tmp_path / "cache")
    datasets.create("cats")
    upload = datasets.start_upload("cats")
    for p in sorted(q for q in ds.rglob("*") if q.is_file()):
        with p.open("rb") as fh:
            datasets.stage_stream("cats", upload["id"], p.relative_to(ds).as_posix(), fh)
    return store, str(datasets.commit_upload("cats", upload["id"])["id"])


def _spec(store: LocalStore, ft: str, version: str, **hp: Any) -> None:
    write_spec(store, FineTuneSpec.model_validate({
        "id": ft, "created_at": "2026-01-01T00:00:00Z", "dataset": "cats", "version": version,
        "base_model": "tiny", "stage": "dpo", "hyperparameters": {**HP, **hp}}))  # fmt: skip


def _events(store: LocalStore, ft: str) -> list[dict[str, Any]]:
    text = store.get_bytes(f"finetunes/{ft}/progress.jsonl").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _adapter(store: LocalStore, ft: str, step: int, tmp_path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    dest = tmp_path / f"{ft}-{step}.safetensors"
    store.get_file(f"checkpoints/ckpt-{ft}-{step}/adapter/adapter_model.safetensors", dest)
    return load_file(str(dest))


def test_a_time_based_checkpoint_is_published_when_the_interval_passed(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """HUVIDPO_TRAINER_CHECKPOINT_MINUTES (default 30) checkpoints by wall time besides
    ``checkpoint_every``: with an interval shorter than a step, every step is published."""
    store, version = _store(tmp_path, tiny_model_dir)
    assert TrainerSettings().checkpoint_minutes == 30
    for ft, minutes in (("ft-t", 1e-5), ("ft-u", 0.0)):
        _spec(store, ft, version, max_steps=2, checkpoint_every=0)
        settings = TrainerSettings(finetune_id=ft, work_dir=tmp_path / "w", checkpoint_minutes=minutes)
        assert run(store, settings) == ExitCode.OK
    assert published_steps(store, "ft-t") == [1, 2]
    assert published_steps(store, "ft-u") == [2]  # off: only at the end
    # The published weights are the same whenever the checkpoints were taken.
    a, b = _adapter(store, "ft-t", 2, tmp_path), _adapter(store, "ft-u", 2, tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the real 2-node run -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_nodes(
    store: LocalStore,
    ft: str,
    tmp_path: Path,
    attempt: int,
    *,
    torchrun_node1: bool = False,
    extra_env: dict[str, str] | None = None,
) -> list[subprocess.Popen[str]]:
    """Two pods of a 2-node Indexed Job: the same command, ``PET_*`` variables as Kubeflow Trainer
    sets them (an Indexed Job: the same, node rank from the completion index), a work dir each.
    ``torchrun_node1``: node 1 runs the ``torchrun`` command by hand instead (same env)."""
    port = _free_port()
    nodes = []
    for index in (0, 1):
        env = {
            **os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "HUVIDPO_STORE_BACKEND": "local", "HUVIDPO_STORE_ROOT": str(store.root),
            "HUVIDPO_TRAINER_FINETUNE_ID": ft, "HUVIDPO_TRAINER_WORK_DIR": str(tmp_path / f"node{index}"),
            "HUVIDPO_TRAINER_DEVICE": "cpu", "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1",
            "JOB_COMPLETION_INDEX": str(index), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
            **(extra_env or {}),
        }  # fmt: skip
        log = (tmp_path / f"node{index}-attempt{attempt}.log").open("w")
        cmd = [sys.executable, "-m", "services.trainer"]
        if index == 1 and torchrun_node1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                   "--node-rank=1", "--master-addr=127.0.0.1", f"--master-port={port}", "--max-restarts=0",
                   "-m", "services.trainer"]  # fmt: skip
        nodes.append(subprocess.Popen(cmd, env=env, cwd=tmp_path,
                                      stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True))  # fmt: skip
    return nodes


def _wait(nodes: list[subprocess.Popen[str]], tmp_path: Path, timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in nodes]
    except subprocess.TimeoutExpired:
        for p in nodes:
            os.killpg(p.pid, signal.SIGKILL)
        logs = "".join(f.read_text()[-4000:] for f in sorted(tmp_path.glob("node*.log")))
        pytest.fail(f"the 2-node run hung:\n{logs}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_train_the_weights_of_one_process_on_the_same_global_batch(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    store, version = _store(tmp_path, tiny_model_dir)
    steps = 4
    _spec(store, "ft-2n", version, batch_size=1, max_steps=steps)
    nodes = _start_nodes(store, "ft-2n", tmp_path, 1)
    codes = _wait(nodes, tmp_path)
    logs = "".join(f.read_text()[-3000:] for f in sorted(tmp_path.glob("node*.log")))
    assert codes == [0, 0], logs

    # One process, the same global batch of 2.
    _spec(store, "ft-1p", version, batch_size=2, max_steps=steps)
    assert run(store, TrainerSettings(finetune_id="ft-1p", work_dir=tmp_path / "single")) == ExitCode.OK

    two, one = _adapter(store, "ft-2n", steps, tmp_path), _adapter(store, "ft-1p", steps, tmp_path)
    assert two.keys() == one.keys() and len(one) > 0
    diff = max(float((two[k] - one[k]).abs().max()) for k in one)
    print(f"2-node vs 1-process LoRA weights after {steps} steps: max abs diff {diff:.3g}")
    for k in one:
        assert torch.allclose(two[k], one[k], atol=2e-5, rtol=1e-4), k

    # Rank 0 alone wrote the records: one start, a checkpoint every 2 steps, one end.
    events = _events(store, "ft-2n")
    assert [e["event"] for e in events if e["event"] != "step"] == [
        "start",
        "checkpoint",
        "checkpoint",
        "end",
    ]
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, steps + 1))
    assert published_steps(store, "ft-2n") == [2, 4]
    # Each node fetched the inputs into its own work dir (nothing is shared between nodes).
    for index in (0, 1):
        assert (tmp_path / f"node{index}" / "ft-2n" / "model" / ".complete").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killing_one_rank_fails_the_attempt_and_the_retry_resumes_from_the_last_checkpoint(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import psutil

    store, version = _store(tmp_path, tiny_model_dir)
    steps = 10
    # Checkpoints by time only, the interval shorter than a step: rank 0 decides at every step and
    # every rank follows (a rank that did not would hang in the checkpoint's barrier).
    _spec(store, "ft-k", version, batch_size=1, max_steps=steps, checkpoint_every=0)
    every_step = {"HUVIDPO_TRAINER_CHECKPOINT_MINUTES": "0.00001"}
    nodes = _start_nodes(store, "ft-k", tmp_path, 1, extra_env=every_step)
    deadline = time.monotonic() + 180
    while not published_steps(store, "ft-k") and time.monotonic() < deadline and nodes[1].poll() is None:
        time.sleep(0.05)
    assert published_steps(store, "ft-k"), "no checkpoint was published"
    # Rank 1 (node 1's worker) dies as a lost GPU or an out-of-memory kill would take it.
    (worker,) = psutil.Process(nodes[1].pid).children()
    worker.send_signal(signal.SIGKILL)
    codes = killed_codes = _wait(nodes, tmp_path)
    logs = "".join(f.read_text()[-3000:] for f in sorted(tmp_path.glob("node*attempt1.log")))
    # Node 0's rank 0 lost its peer: transient (retried); node 1's launcher reports its killed worker
    # as a failure (retried within the backoff limit); no node hangs.
    assert codes == [ExitCode.TRANSIENT, ExitCode.FAILED], logs
    end = _events(store, "ft-k")[-1]
    assert (end["event"], end["exit_code"], end["reason"]) == ("end", 75, "PeerLost"), end
    published = published_steps(store, "ft-k")
    assert published[-1] < steps, "the attempt finished before the kill"

    # The retry (the control plane starts a new attempt of the whole group) resumes on every rank
    # from the newest published checkpoint and finishes. (Node 1 is started by the torchrun command
    # itself this time: a worker it starts is a rank of the same group.)
    nodes = _start_nodes(store, "ft-k", tmp_path, 2, torchrun_node1=True, extra_env=every_step)
    codes = _wait(nodes, tmp_path)
    logs = "".join(f.read_text()[-3000:] for f in sorted(tmp_path.glob("node*attempt2.log")))
    assert codes == [0, 0], logs
    starts = [e for e in _events(store, "ft-k") if e["event"] == "start"]
    assert [(s["attempt"], s["resumed_from_step"]) for s in starts] == [(1, None), (2, published[-1])]
    assert published_steps(store, "ft-k") == list(range(1, steps + 1))
    print(
        f"killed rank 1 after step {published[-1]}: node exit codes {[int(c) for c in killed_codes]}, resumed at {published[-1]}"
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bad_data_on_one_rank_fails_the_attempt_as_bad_input(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Node 1's copy of the dataset is unreadable (as a bad disk would leave it): rank 1 fails with
    bad input (exit 2, never retried) and the attempt ends with that code and reason on every node,
    not with rank 0's echo of a lost peer (75, which would retry)."""
    from services.common.publish import fetch_published
    from services.common.records import keys

    store, version = _store(tmp_path, tiny_model_dir)
    _spec(store, "ft-b", version, batch_size=1, max_steps=2)
    copy = tmp_path / "node1" / "ft-b" / "dataset"
    fetch_published(store, keys.dataset_version_prefix("cats", version), copy)
    (copy / ".complete").write_text("")
    videos = [p for p in copy.rglob("*") if p.suffix in (".mp4", ".webm", ".gif")]
    assert videos
    for p in videos:
        p.write_bytes(b"not a video")
    codes = _wait(_start_nodes(store, "ft-b", tmp_path, 1), tmp_path)
    logs = "".join(f.read_text()[-3000:] for f in sorted(tmp_path.glob("node*.log")))
    # Rank 0 saw its peer go away, and took the reason rank 1 left: the whole group exits 2.
    assert codes == [ExitCode.BAD_INPUT, ExitCode.BAD_INPUT], logs
    end = _events(store, "ft-b")[-1]
    assert (end["event"], end["exit_code"], end["reason"]) == ("end", 2, "DatasetError"), end
    assert "videos/p0_v0.mp4" in end["message"] and str(tmp_path) not in end["message"], end


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_to_one_node_checkpoints_the_whole_group_and_exits_75(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A preempted node (Kubernetes sends its pod SIGTERM): every rank stops at the same step, rank 0
    publishes a checkpoint of it, and both nodes exit 75, so the retry loses no step."""
    store, version = _store(tmp_path, tiny_model_dir)
    steps = 30
    _spec(store, "ft-s", version, batch_size=1, max_steps=steps, checkpoint_every=0)
    nodes = _start_nodes(store, "ft-s", tmp_path, 1)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and nodes[1].poll() is None:
        if store.exists("finetunes/ft-s/progress.jsonl") and any(
            e["event"] == "step" for e in _events(store, "ft-s")
        ):
            break
        time.sleep(0.05)
    nodes[1].send_signal(signal.SIGTERM)  # node 1's launcher, as the kubelet signals a pod's first process
    codes = _wait(nodes, tmp_path)
    logs = "".join(f.read_text()[-3000:] for f in sorted(tmp_path.glob("node*.log")))
    assert codes == [ExitCode.TRANSIENT, ExitCode.TRANSIENT], logs
    events = _events(store, "ft-s")
    end = events[-1]
    assert (end["event"], end["exit_code"], end["reason"]) == ("end", 75, "Stopped"), end
    last_step = max(e["step"] for e in events if e["event"] == "step")
    assert last_step < steps and published_steps(store, "ft-s") == [last_step], (last_step, logs)
