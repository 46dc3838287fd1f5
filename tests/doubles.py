"""Test doubles shared by the control-plane tests."""

from __future__ import annotations

from collections.abc import Iterator

from services.controlplane.domain.ports import ExecStatus, JobSpec


class IdleExecutor:
    """An executor whose Jobs are accepted and stay pending forever (for tests of everything but
    scheduling); ``logs`` returns ``log_lines``."""

    kind = "none"

    def __init__(self, log_lines: tuple[bytes, ...] = ()) -> None:
        self.log_lines = log_lines

    def submit(self, spec: JobSpec) -> dict[str, str]:
        return {"name": spec.finetune_id}

    def status(self, finetune_id: str) -> ExecStatus:
        return ExecStatus("pending")

    def cancel(self, finetune_id: str) -> None:
        return None

    def logs(self, finetune_id: str, follow: bool = False) -> Iterator[bytes]:
        return iter(self.log_lines)

    def ready(self) -> bool:
        return True
