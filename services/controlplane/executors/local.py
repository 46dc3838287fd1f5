"""``LocalExecutor``: the trainer entrypoint as a local subprocess (the embedded default).

Each fine-tune gets ``{work_dir}/runs/{id}/`` with ``run.json`` (supervisor pid and start time),
``trainer.log`` and, at the end, ``exit.json``. Status comes from those files, the process table and
the trainer's progress records in the store, so a restarted control plane finds its runs again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import psutil

from services.common.records.exit_codes import ExitCode
from services.controlplane.domain.ports import ID_ENV, ExecStatus, JobSpec

EXIT_REASONS: dict[int, str] = {ExitCode.BAD_INPUT: "BadData", ExitCode.TRANSIENT: "TransientFailure"}


class LocalExecutor:
    kind = "local"
    # One trainer process: a shape with a larger world size is refused at create (422); multi-GPU
    # and multi-node fine-tunes are for the kubernetes and trainjob executors.
    max_world_size = 1

    def __init__(
        self,
        work_dir: Path,
        env: Mapping[str, str],
        max_retries: int = 2,
        command: list[str] | None = None,
        python: str = sys.executable,
        evaluator_command: list[str] | None = None,
    ) -> None:
        """``env`` is the trainer's (and the evaluator's) whole environment (store and trainer
        settings, PATH...); ``command`` runs a fine-tune, ``evaluator_command`` an evaluation."""
        self.runs = Path(work_dir) / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.env = dict(env)
        self.max_retries = max_retries
        self.command = command or [python, "-m", "services.trainer"]
        self.evaluator_command = evaluator_command or [python, "-m", "services.evaluator"]
        self.python = python
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def _dir(self, finetune_id: str) -> Path:
        return self.runs / finetune_id

    def submit(self, spec: JobSpec) -> dict[str, str]:
        d = self._dir(spec.finetune_id)
        d.mkdir(parents=True, exist_ok=True)
        try:  # exclusive create: two submits of the same fine-tune start one process
            fd = os.open(d / "submit.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
        except FileExistsError:
            return self._ref(spec.finetune_id)
        env = {**self.env, ID_ENV[spec.role]: spec.finetune_id}
        command = self.evaluator_command if spec.role == "evaluator" else self.command
        proc = subprocess.Popen(
            [
                self.python,
                "-m",
                "services.controlplane.executors.supervisor",
                str(d),
                str(self.max_retries),
                "--",
                *command,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(d / "supervisor.log", "ab"),  # noqa: SIM115 (the child keeps it)
            start_new_session=True,  # survives a control plane restart; killed as a group on cancel
            cwd=os.getcwd(),
        )
        self._procs[spec.finetune_id] = proc
        create_time = psutil.Process(proc.pid).create_time()
        (d / "run.json").write_text(
            json.dumps({"pid": proc.pid, "create_time": create_time, "started": time.time()})
        )
        return self._ref(spec.finetune_id)

    def _ref(self, finetune_id: str) -> dict[str, str]:
        return {"kind": self.kind, "name": finetune_id, "dir": str(self._dir(finetune_id))}

    def _alive(self, finetune_id: str) -> bool:
        proc = self._procs.get(finetune_id)
        if proc is not None:
            return proc.poll() is None
        try:
            run = json.loads((self._dir(finetune_id) / "run.json").read_text())
            p = psutil.Process(int(run["pid"]))
            return (
                abs(p.create_time() - float(run["create_time"])) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
            )
        except (FileNotFoundError, ValueError, KeyError, psutil.Error):
            return False

    def status(self, finetune_id: str) -> ExecStatus:
        d = self._dir(finetune_id)
        ref = self._ref(finetune_id)
        with contextlib.suppress(FileNotFoundError, ValueError):
            end = json.loads((d / "exit.json").read_text())
            rc = int(end["exit_code"])
            if rc == ExitCode.OK:
                return ExecStatus("succeeded", exit_code=rc, job=ref)
            reason = "Cancelled" if end.get("cancelled") else EXIT_REASONS.get(rc, "TrainerFailed")
            return ExecStatus(
                "failed",
                reason,
                f"trainer exited with code {rc} after {end.get('attempts')} attempt(s)",
                rc,
                ref,
            )
        if not (d / "submit.lock").exists():
            return ExecStatus("missing", job=ref)
        if self._alive(finetune_id):
            return ExecStatus("running", job=ref)
        if not (d / "run.json").exists():
            return ExecStatus("pending", job=ref)  # submit in progress
        return ExecStatus(
            "failed", "SupervisorLost", "the trainer's supervisor died without an exit record", None, ref
        )

    def cancel(self, finetune_id: str) -> None:
        d = self._dir(finetune_id)
        try:
            run = json.loads((d / "run.json").read_text())
        except (FileNotFoundError, ValueError):
            return
        if not self._alive(finetune_id):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(run["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self._alive(finetune_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._alive(finetune_id):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(run["pid"]), signal.SIGKILL)

    def logs(self, finetune_id: str, follow: bool = False) -> Iterator[bytes]:
        path = self._dir(finetune_id) / "trainer.log"

        def gen() -> Iterator[bytes]:
            pos = 0
            while True:
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as fh:
                    fh.seek(pos)
                    while chunk := fh.read(64 * 1024):
                        pos += len(chunk)
                        yield chunk
                if not follow or self.status(finetune_id).phase not in ("running", "pending"):
                    if follow:  # the last lines written between our read and the exit
                        with contextlib.suppress(FileNotFoundError), open(path, "rb") as fh:
                            fh.seek(pos)
                            yield from iter(lambda: fh.read(64 * 1024), b"")
                    return
                # Nothing new yet: an empty chunk, and the caller waits before asking again (the REST
                # route sleeps on the event loop, so no thread is held while the trainer is quiet).
                yield b""

        return gen()

    def ready(self) -> bool:
        return os.access(self.runs, os.W_OK)
