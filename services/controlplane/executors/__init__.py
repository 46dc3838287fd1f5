"""Executor adapters: ``LocalExecutor`` (subprocesses) and ``KubernetesExecutor`` (batch/v1 Jobs)."""
