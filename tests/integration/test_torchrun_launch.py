"""The command a multi-node Indexed Job's pods run, run here as those pods would: one torchrun per
node with the Job's env and ``$(JOB_COMPLETION_INDEX)`` expanded as the kubelet does, rank 0's DNS
name (``<job>-0.<job>``) pointed at the loopback. Proves the flags fit this torch's torchrun and
that every rank gets the standard RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR env and reaches its peers.
The trainer module is swapped for a probe (tests/integration/rank_probe.py); the trainer's own
rank logic is tested with the trainer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.settings import ControlPlaneSettings, StoreSettings
from services.controlplane.domain.ports import JobSpec
from services.controlplane.executors.kubernetes import build_job, job_name

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # starts torchrun and its ranks: about 20 s on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pod_argv(command: list[str], index: int, master: str) -> list[str]:
    """The container command as the kubelet and this machine would run it."""
    argv = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)).replace(master, "127.0.0.1") for a in command]
    assert argv[0] == "torchrun"
    return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]


@pytest.mark.parametrize(("nodes", "gpus"), [(2, 1), (2, 2)])
def test_the_indexed_jobs_command_starts_every_rank_with_the_standard_env(
    tmp_path: Path, nodes: int, gpus: int
) -> None:
    port = _free_port()
    settings = ControlPlaneSettings(
        namespace="ml", trainer_command="python -m tests.integration.rank_probe", rendezvous_port=port
    )
    spec = JobSpec("ft-launch", nodes=nodes, gpus_per_node=gpus)
    job = build_job(spec, settings, StoreSettings())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    name = job_name("ft-launch")
    plain_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    procs = []
    for index in range(nodes):
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("HUVIDPO_", "RANK", "WORLD_SIZE"))},
            **plain_env,
            "JOB_COMPLETION_INDEX": str(index),
            "RANK_PROBE_DIR": str(tmp_path),
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                _pod_argv(container["command"], index, f"{name}-0.{name}"),
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]
    world = nodes * gpus
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for rank, rec in enumerate(records):
        assert rec["RANK"] == str(rank) and rec["WORLD_SIZE"] == str(world)
        assert rec["LOCAL_RANK"] == str(rank % gpus) and rec["GROUP_RANK"] == str(rank // gpus)
        assert rec["MASTER_ADDR"] == "127.0.0.1" and rec["MASTER_PORT"] == str(port)
        assert rec["HUVIDPO_TRAINER_FINETUNE_ID"] == "ft-launch"
        assert rec["sum_of_ranks"] == sum(range(world))  # every rank reached every other


def test_one_node_with_several_processes_runs_torchrun_standalone(tmp_path: Path) -> None:
    settings = ControlPlaneSettings(namespace="ml", trainer_command="python -m tests.integration.rank_probe")
    job = build_job(JobSpec("ft-launch", nodes=1, gpus_per_node=2), settings, StoreSettings())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HUVIDPO_")},
        "RANK_PROBE_DIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    argv = [sys.executable, "-m", "torch.distributed.run", *container["command"][1:]]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
    ranks = sorted(json.loads(p.read_text())["RANK"] for p in tmp_path.glob("rank*.json"))
    assert ranks == ["0", "1"]
