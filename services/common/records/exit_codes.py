"""The trainer's exit codes (docs/CONTRACTS.md): one enum for the trainer, the local supervisor and
the Kubernetes Job's ``podFailurePolicy``, so they cannot drift apart."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # Anything unexpected (a bug, an out-of-memory kill): retried up to the backoff limit.
    FAILED = 1
    # Bad data or config: a retry would fail the same way, so never retried (podFailurePolicy FailJob).
    # Also what argparse and the ``huvidpo`` CLI return for bad input (``huvidpo.cli.EXIT_BAD_INPUT``).
    BAD_INPUT = 2
    # EX_TEMPFAIL (sysexits.h): store unreachable, stopped by SIGTERM after a checkpoint: retry.
    TRANSIENT = 75
