"""Where this trainer process stands in a multi-process (multi-GPU, multi-node) fine-tune.

A pod runs ``python -m services.trainer``. With a shape of more than one process it is a node: the
shape comes from the variables Kubeflow Trainer injects (``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``; an Indexed Job sets the same ones, or
leaves ``PET_NODE_RANK`` out and the node rank is ``JOB_COMPLETION_INDEX``), and the node starts its
workers through torchrun's own launcher (:func:`launch_node`, the code the ``torchrun`` command runs,
with the same arguments). A worker, or a process started by ``torchrun``/``accelerate launch``
directly, sees the standard ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``/``GROUP_RANK``
and ``MASTER_ADDR``/``MASTER_PORT`` (:class:`Ranks`).

Why the node does not simply exec ``torchrun``: ``torchrun`` exits 1 whenever a worker fails, which
would erase the trainer's exit codes (2: bad input, never retried; 75: transient, retried) that the
Job's ``podFailurePolicy`` and the local supervisor act on. :func:`launch_node` maps its workers'
codes back (:func:`node_exit_code`). Running ``torchrun -m services.trainer`` by hand works too; its
exit code is then torchrun's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from services.common.records.exit_codes import ExitCode

log = logging.getLogger("huvidpo.trainer")

T = TypeVar("T")


@dataclass(frozen=True)
class NodeShape:
    """The shape a node launches: ``nnodes`` x ``nproc_per_node`` workers; this is node ``node_rank``."""

    nnodes: int
    nproc_per_node: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def torchrun_args(self) -> list[str]:
        """``torchrun``'s arguments for this node (static rendezvous on node 0, no restarts: a failed
        worker fails the attempt, and the control plane starts the next one, which resumes). The
        rendezvous id stays torchrun's default, so a node started by ``torchrun`` by hand with the
        same arguments joins the same group."""
        return [
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            f"--node-rank={self.node_rank}",
            f"--master-addr={self.master_addr}",
            f"--master-port={self.master_port}",
            "--max-restarts=0",
            "--monitor-interval=0.5",
        ]


class ShapeError(ValueError):
    """The multi-process variables are present but unusable (exit 2: a retry cannot fix them)."""


def node_shape(environ: Mapping[str, str] | None = None) -> NodeShape | None:
    """The node shape the ``PET_*`` variables ask for, or None when they are absent or this process is
    already a worker (``RANK`` is set: torchrun or accelerate started it)."""
    env = os.environ if environ is None else environ
    if "RANK" in env or not ("PET_NNODES" in env or "PET_NPROC_PER_NODE" in env):
        return None

    def number(name: str, default: str | None = None, low: int = 0) -> int:
        raw = env.get(name, default)
        if raw is None:
            raise ShapeError(f"{name} is not set")
        try:
            value = int(raw)
        except ValueError:
            raise ShapeError(f"{name} must be a whole number") from None
        if value < low:
            raise ShapeError(f"{name} must be at least {low}")
        return value

    nnodes = number("PET_NNODES", "1", 1)
    nproc = number("PET_NPROC_PER_NODE", "1", 1)
    node_rank = number("PET_NODE_RANK", env.get("JOB_COMPLETION_INDEX", "0"))
    if node_rank >= nnodes:
        raise ShapeError(f"PET_NODE_RANK {node_rank} is not below PET_NNODES {nnodes}")
    port = number("PET_MASTER_PORT", "29500", 1)
    addr = env.get("PET_MASTER_ADDR", "127.0.0.1" if nnodes == 1 else "")
    if not addr:
        raise ShapeError("PET_MASTER_ADDR is not set (the rendezvous host: node 0's address)")
    return NodeShape(nnodes, nproc, node_rank, addr, port)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group, from the variables torchrun sets for each worker."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Ranks:
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        rank = int(env.get("RANK", "0"))
        return cls(
            rank=rank,
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=local_world,
            node_rank=int(env.get("GROUP_RANK", str(rank // max(1, local_world)))),
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes progress, checkpoints and publishes."""
        return self.rank == 0

    @property
    def node_main(self) -> bool:
        """Local rank 0: fetches the inputs into its node's work dir."""
        return self.local_rank == 0


# -- agreement between the ranks ---------------------------------------------------------------------
Outcome = tuple[int, str | None, str]
"""(exit code, reason, message) of a phase on one rank; code 0: it went well."""

# Which rank's failure names the attempt's: bad input (never retried) before a crash before a
# transient failure (often only the echo of another rank's failure, e.g. a peer that went away).
_SEVERITY: dict[int, int] = {ExitCode.BAD_INPUT: 3, ExitCode.FAILED: 2, ExitCode.TRANSIENT: 1, ExitCode.OK: 0}


def worst(outcomes: Sequence[Outcome]) -> Outcome:
    """The outcome the attempt ends with: the most severe rank's (ties: the lowest rank's)."""
    return max(outcomes, key=lambda o: _SEVERITY.get(int(o[0]), 2))


class PeerFailed(Exception):
    """Another rank failed a phase every rank takes part in; this rank ends with the same outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome[2])
        self.outcome = outcome


class Group:
    """Control messages between the ranks of one attempt (a gloo group on CPU beside the training's
    own group, so the messages need no GPU); a no-op with one process."""

    def __init__(self, ranks: Ranks, cpu: bool) -> None:
        self.ranks = ranks
        self._group: Any = None
        if ranks.distributed:
            from accelerate import PartialState

            # The training's group (gloo on CPU, NCCL on GPUs); the Accelerator the library makes
            # later shares this state.
            PartialState(cpu=cpu)
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (any picklable value)."""
        if not self.ranks.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def agree(self, mine: Outcome) -> Outcome:
        """Every rank's phase outcome gathered; all return the worst (a collective: all must call it)."""
        if not self.ranks.distributed:
            return mine
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.ranks.world_size
        dist.all_gather_object(gathered, mine, group=self._group)
        return worst([tuple(o) for o in gathered])  # type: ignore[misc]

    def post(self, outcome: Outcome) -> None:
        """Leave this rank's failure where rank 0 finds it after this rank exits (the group's
        rendezvous store): the peers only see a connection go away, not why."""
        if not self.ranks.distributed:
            return
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            _get_default_store().set(f"huvidpo/outcome/{self.ranks.rank}", json.dumps(list(outcome)))
        except Exception as exc:  # best effort: the store may be gone with rank 0's node
            log.debug("could not post this rank's outcome: %s", exc)

    def posted(self) -> list[Outcome]:
        """The failures other ranks posted before they went away."""
        if not self.ranks.distributed:
            return []
        found: list[Outcome] = []
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            store = _get_default_store()
            for rank in range(self.ranks.world_size):
                key = f"huvidpo/outcome/{rank}"
                if rank != self.ranks.rank and store.check([key]):
                    code, reason, message = json.loads(store.get(key))
                    found.append((int(code), reason, str(message)))
        except Exception as exc:
            log.debug("could not read the other ranks' outcomes: %s", exc)
        return found

    def phase(self, fn: Callable[[], T], classify: Callable[[BaseException], Outcome]) -> T | None:
        """Run ``fn`` on this rank, then agree: if any rank failed, every rank raises
        :class:`PeerFailed` with the worst outcome (the failing rank too), so none waits in a
        barrier for a rank that has given up."""
        result: T | None = None
        try:
            result = fn()
            mine: Outcome = (ExitCode.OK, None, "")
        except Exception as exc:
            mine = classify(exc)
        outcome = self.agree(mine)
        if outcome[0] != ExitCode.OK:
            raise PeerFailed(outcome)
        return result


# -- a node's launch -----------------------------------------------------------------------------------
def node_exit_code(codes: Sequence[int]) -> int:
    """The node's exit code from its failed workers' (negative: killed by that signal). A worker
    stopped by SIGTERM or SIGINT (a preemption) is transient; other signals (SIGKILL: out of memory)
    are failures; then the most severe code, as :func:`worst` orders them."""
    mapped = []
    for code in codes:
        if code < 0:
            code = ExitCode.TRANSIENT if -code in (signal.SIGTERM, signal.SIGINT) else ExitCode.FAILED
        elif code not in _SEVERITY:
            code = ExitCode.FAILED
        mapped.append((int(code), None, ""))
    return int(worst(mapped)[0]) if mapped else int(ExitCode.OK)


def launch_node(shape: NodeShape) -> int:
    """Start this node's ``shape.nproc_per_node`` workers of ``python -m services.trainer`` through
    torchrun's launcher and wait for the group; returns the node's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    args = [*shape.torchrun_args(), "--module", "services.trainer"]
    log.info("node %d of %d: torchrun %s", shape.node_rank, shape.nnodes, " ".join(args))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the workers are workers, not nodes (and torchrun reads PET_* itself)
    try:
        torchrun(parse_args(args))
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        code = node_exit_code(codes)
        log.warning("node %d: workers exited with %s: the node exits with %d", shape.node_rank, codes, code)
        return code
    except SignalException as exc:
        log.warning("node %d stopped by signal %s", shape.node_rank, exc.sigval)
        return int(ExitCode.TRANSIENT)
    except RendezvousError as exc:  # a node that never came, or went away before the start
        log.warning("node %d: rendezvous failed: %s", shape.node_rank, exc)
        return int(ExitCode.TRANSIENT)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    sys.stdout.flush()
    return int(ExitCode.OK)
