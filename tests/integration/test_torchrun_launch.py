"""What the pods of a multi-process fine-tune run, read as those pods would: the trainer command with
the Job's ``PET_*`` env and ``JOB_COMPLETION_INDEX`` as the kubelet sets it. Every node finds the
shape (nodes, processes, its node rank, node 0's address) the trainer's launcher starts its workers
with, and those torchrun arguments parse with this torch's torchrun. The real multi-node run of
the trainer with this env is tests/unit/test_trainer_ranks.py."""

from __future__ import annotations

import pytest

from services.common.settings import ControlPlaneSettings, StoreSettings
from services.controlplane.domain.ports import JobSpec
from services.controlplane.executors.kubernetes import build_job, job_name
from services.trainer.ranks import node_shape


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (1, 2), (2, 1), (2, 2), (4, 8)])
def test_every_pod_of_a_shape_finds_its_node_and_the_group_from_the_jobs_env(nodes: int, gpus: int) -> None:
    from torch.distributed.run import parse_args

    settings = ControlPlaneSettings(namespace="ml", rendezvous_port=29611)
    job = build_job(JobSpec("ft-launch", nodes=nodes, gpus_per_node=gpus), settings, StoreSettings())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "services.trainer"]  # exits with its workers' code
    plain = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    name = job_name("ft-launch")
    if nodes * gpus == 1:
        assert not any(k.startswith("PET_") for k in plain)
        assert node_shape(plain) is None  # one process: the trainer runs itself, no launcher
        return
    for index in range(nodes):
        env = {**plain, "JOB_COMPLETION_INDEX": str(index)} if nodes > 1 else dict(plain)
        shape = node_shape(env)
        assert shape is not None
        assert (shape.nnodes, shape.nproc_per_node, shape.node_rank) == (nodes, gpus, index)
        assert shape.master_addr == (f"{name}-0.{name}" if nodes > 1 else "127.0.0.1")
        assert shape.master_port == 29611
        args = parse_args([*shape.torchrun_args(), "--module", "services.trainer"])
        assert (args.nnodes, args.nproc_per_node, args.node_rank, args.max_restarts) == (
            str(nodes),
            str(gpus),
            index,
            0,
        )
