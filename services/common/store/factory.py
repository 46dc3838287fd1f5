"""Building the adapter a service's settings name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.common.store.local import LocalStore
from services.common.store.port import ObjectStore

if TYPE_CHECKING:
    from services.common.settings import StoreSettings


def make_store(settings: StoreSettings) -> ObjectStore:
    """Build the adapter ``settings.backend`` names (``local`` or ``s3``). Does no network I/O."""
    if settings.backend == "local":
        return LocalStore(
            settings.root,
            public_base_url=settings.public_base_url,
            presign_secret=settings.presign_secret.get_secret_value() or None,
        )
    if settings.backend == "s3":
        from services.common.store.s3 import MinioStore  # the minio SDK only when asked for

        return MinioStore(
            endpoint=settings.endpoint,
            access_key=settings.access_key.get_secret_value(),
            secret_key=settings.secret_key.get_secret_value(),
            bucket=settings.bucket,
            secure=settings.secure,
            region=settings.region,
            create_bucket=settings.create_bucket,
            part_size=settings.part_size,
            timeout=settings.timeout_seconds,
            public_endpoint=settings.public_endpoint or None,
            ca_bundle=str(settings.ca_bundle) if settings.ca_bundle else None,
        )
    raise ValueError(f"unknown store backend {settings.backend!r}")
