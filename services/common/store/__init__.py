"""Every durable record of HuViDPO (datasets, checkpoints, fine-tune records, rollouts) lives behind
the ``ObjectStore`` port.

- ``port``: the port and its contract (what every adapter guarantees);
- ``errors``: the store's errors; ``helpers``: constants, key validation, streaming digests;
- ``local``: ``LocalStore``, files under a root directory (the embedded default);
- ``s3``: ``MinioStore``, any S3 endpoint through the ``minio`` SDK (imported only when asked for);
- ``factory``: ``make_store``, the adapter a service's settings name.

Adapters import the port and the helpers, never the other way round. The names below are the
package's public face, so callers import ``from services.common.store import ...``.
"""

from services.common.store.errors import (
    ChecksumMismatch,
    IncompleteStream,
    InvalidKey,
    ObjectNotFound,
    PreconditionFailed,
    PresignedUrlInvalid,
    StoreAccessDenied,
    StoreError,
    StoreUnavailable,
)
from services.common.store.factory import make_store
from services.common.store.helpers import (
    CHUNK_SIZE,
    MAX_PRESIGN_EXPIRY,
    RESERVED_PREFIX,
    SHA256_METADATA_KEY,
    HashingReader,
    check_conditions,
    check_expiry,
    join_key,
    sha256_file,
    validate_key,
    validate_metadata,
    validate_prefix,
)
from services.common.store.local import DEFAULT_PUBLIC_BASE_URL, LocalStore
from services.common.store.port import ObjectInfo, ObjectReader, ObjectStore

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_PUBLIC_BASE_URL",
    "MAX_PRESIGN_EXPIRY",
    "RESERVED_PREFIX",
    "SHA256_METADATA_KEY",
    "ChecksumMismatch",
    "HashingReader",
    "IncompleteStream",
    "InvalidKey",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectReader",
    "ObjectStore",
    "PreconditionFailed",
    "PresignedUrlInvalid",
    "StoreAccessDenied",
    "StoreError",
    "StoreUnavailable",
    "check_conditions",
    "check_expiry",
    "join_key",
    "make_store",
    "sha256_file",
    "validate_key",
    "validate_metadata",
    "validate_prefix",
]
