"""A tiny supervisor for the local executor: runs the trainer, retries transient failures, records the end.

It plays the part of a Kubernetes Job controller for one trainer (``ExitCode``): exit 0 ends the run,
exit 2 (bad data or config) fails it at once (``podFailurePolicy`` FailJob), any other exit is retried up to
``--max-retries`` times (``backoffLimit``). It runs in its own session, so the control plane can
restart without taking the trainer down, and writes ``exit.json`` atomically at the end.

    python -m services.controlplane.executors.supervisor RUN_DIR MAX_RETRIES -- CMD...
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.common.records.exit_codes import ExitCode


def _write_exit(run_dir: Path, record: dict[str, object]) -> None:
    tmp = run_dir / "exit.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, run_dir / "exit.json")


def main(argv: list[str]) -> int:
    run_dir, max_retries = Path(argv[0]), int(argv[1])
    cmd = argv[argv.index("--") + 1 :]
    child: subprocess.Popen[bytes] | None = None
    cancelled = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal cancelled
        cancelled = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, on_term)
    attempt = 0
    rc = 1
    with open(run_dir / "trainer.log", "ab") as log:
        while True:
            attempt += 1
            log.write(f"--- attempt {attempt} ---\n".encode())
            log.flush()
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            rc = child.wait()
            if cancelled:
                log.write(
                    f"--- cancelled on request: attempt {attempt} stopped (exit code {rc}) ---\n".encode()
                )
                log.flush()
                _write_exit(run_dir, {"exit_code": rc, "attempts": attempt, "cancelled": True})
                return rc
            if rc in (ExitCode.OK, ExitCode.BAD_INPUT) or attempt > max_retries:
                break
            log.write(f"--- attempt {attempt} exited with code {rc}: retrying ---\n".encode())
            time.sleep(min(10.0, 0.5 * 2 ** (attempt - 1)))
    _write_exit(run_dir, {"exit_code": rc, "attempts": attempt, "cancelled": False})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
