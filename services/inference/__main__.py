"""``python -m services.inference``: run the gRPC inference server until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from services.common.settings import InferenceSettings, StoreSettings
from services.common.store import make_store
from services.inference.server import InferenceServer


async def serve(settings: InferenceSettings, store_settings: StoreSettings) -> None:
    server = InferenceServer(settings, make_store(store_settings), bucket=store_settings.bucket)
    await server.start()
    # One line a supervisor (or a test) can wait for.
    print(
        f"huvidpo-inference listening grpc={settings.host}:{server.port} metrics={server.metrics_port}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(InferenceSettings(), StoreSettings()))


if __name__ == "__main__":
    main()
