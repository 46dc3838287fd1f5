"""``python -m services.inference``: run the gRPC inference server until SIGINT/SIGTERM, then drain
(services/inference/drain.py) and exit."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from services.common.auth import AuthConfigError, check_store_key
from services.common.records.exit_codes import ExitCode
from services.common.settings import InferenceSettings, SettingsError, StoreSettings, load_settings
from services.common.store import make_store
from services.inference.drain import drain_and_stop
from services.inference.server import BindError, InferenceServer


async def serve(settings: InferenceSettings, store_settings: StoreSettings) -> None:
    server = InferenceServer(settings, make_store(store_settings), bucket=store_settings.bucket)
    await server.start()
    # One line a supervisor (or a test) can wait for.
    print(
        f"huvidpo-inference listening grpc={settings.host}:{server.port} metrics={server.metrics_port}",
        flush=True,
    )
    stop, interrupted = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        # The first signal drains (services/inference/drain.py); a second one cuts the drain short.
        (interrupted if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    await drain_and_stop(server, settings.grace_seconds, interrupted)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(InferenceSettings)
        store_settings = load_settings(StoreSettings)
    except SettingsError as exc:
        print(f"huvidpo-inference: {exc}", file=sys.stderr)
        sys.exit(ExitCode.BAD_INPUT)
    try:
        check_store_key(
            store_settings.access_key.get_secret_value(),
            store_settings.secret_key.get_secret_value(),
            settings.dev_mode,
            "huvidpo-inference",
        )
        asyncio.run(serve(settings, store_settings))
    except AuthConfigError as exc:  # fail closed: no token, the dev token or the dev store key
        message = str(exc)  # most name the service already
        print(
            message if message.startswith("huvidpo-inference:") else f"huvidpo-inference: {message}",
            file=sys.stderr,
        )
        sys.exit(ExitCode.BAD_INPUT)
    except BindError as exc:
        # One line, like uvicorn's for the control plane: a traceback says nothing more here.
        print(f"huvidpo-inference: {exc}", file=sys.stderr)
        sys.exit(ExitCode.FAILED)


if __name__ == "__main__":
    main()
