"""``python -m services.controlplane``: read the settings once, build the store and executor, serve."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from services.common.auth import AuthConfigError, check_store_key
from services.common.records.exit_codes import ExitCode
from services.common.settings import ControlPlaneSettings, SettingsError, StoreSettings, load_settings
from services.common.store import make_store
from services.controlplane.app import create_app
from services.controlplane.domain.ports import Executor


def build_executor(settings: ControlPlaneSettings, environ: dict[str, str]) -> Executor:
    if settings.executor == "trainjob":
        from services.controlplane.executors.kubernetes import load_api_client
        from services.controlplane.executors.trainjob import TrainJobExecutor

        return TrainJobExecutor(load_api_client(settings.kube_context), settings)
    if settings.executor == "kubernetes":
        from services.controlplane.executors.kubernetes import KubernetesExecutor, load_api_client

        return KubernetesExecutor(load_api_client(settings.kube_context), settings)
    from services.controlplane.executors.local import LocalExecutor

    env = {
        **environ,
        "HUVIDPO_TRAINER_WORK_DIR": str(settings.work_dir / "trainer"),
        "HUVIDPO_EVALUATOR_WORK_DIR": str(settings.work_dir / "evaluator"),
    }
    return LocalExecutor(settings.work_dir, env, max_retries=settings.local_max_retries)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(ControlPlaneSettings)
        store_settings = load_settings(StoreSettings)
    except SettingsError as exc:
        print(f"huvidpo-controlplane: {exc}", file=sys.stderr)
        sys.exit(ExitCode.BAD_INPUT)
    try:
        check_store_key(
            store_settings.access_key.get_secret_value(),
            store_settings.secret_key.get_secret_value(),
            settings.dev_mode,
            "huvidpo-controlplane",
        )
        store = make_store(store_settings)
        # The trainer subprocesses inherit this process's environment (store settings, PATH).
        executor = build_executor(settings, dict(os.environ))
        app = create_app(settings, store, executor)
    except AuthConfigError as exc:  # fail closed: no token, the dev token or the dev store key
        message = str(exc)  # most name the service already
        print(
            message if message.startswith("huvidpo-controlplane:") else f"huvidpo-controlplane: {message}",
            file=sys.stderr,
        )
        sys.exit(ExitCode.BAD_INPUT)
    tls = settings.tls_certfile
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        ssl_certfile=str(tls) if tls else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
    )


if __name__ == "__main__":
    main()
