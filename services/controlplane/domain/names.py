"""Validation of caller-chosen names and paths: no traversal, no control characters, bounded length."""

from __future__ import annotations

import re

from services.controlplane.domain.errors import InvalidRequest


def _whole(pattern: str) -> re.Pattern[str]:
    """``pattern`` (``^...$``, as the OpenAPI schema states it) matched against the whole string: in
    Python ``$`` also matches before a trailing newline, so ``"cats\\n"`` would pass ``re.match``."""
    return re.compile(pattern.removesuffix("$") + r"\Z")


# The patterns (``*_PATTERN``, ECMA-262 as OpenAPI states them) and their whole-string regexes.
# Lower-case DNS-label-like names: they become object-store prefixes, Kubernetes labels and URL segments.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
NAME_RE = _whole(NAME_PATTERN)
DIGEST_PATTERN = r"^[0-9a-f]{64}$"
DIGEST_RE = _whole(DIGEST_PATTERN)
# A dataset version as a caller may name it: its ``id`` (64 hex) or its ``digest`` (``sha256:`` + id).
VERSION_PATTERN = r"^(sha256:)?[0-9a-f]{64}$"
VERSION_RE = _whole(VERSION_PATTERN)
# A relative file path inside a dataset, as ``validate_relative_path`` accepts it (its length and depth
# bounds are separate: ``MAX_PATH_LEN``, ``MAX_PATH_DEPTH``).
RELATIVE_PATH_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}){0,7}$"
# Segments of a relative file path inside a dataset.
_SEGMENT_RE = _whole(r"^[A-Za-z0-9._-]{1,128}$")
MAX_PATH_LEN = 512
MAX_PATH_DEPTH = 8


def validate_name(value: str, field: str = "name") -> str:
    """Return ``value`` if it is a valid resource name, else raise :class:`InvalidRequest` saying why."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidRequest(
            f"{field} must be 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit",
            field=field,
        )
    return value


def validate_digest(value: str, field: str = "version") -> str:
    """A dataset version, named by its ``id`` (64 lower-case hex) or its ``digest`` (``sha256:<id>``).

    Returns the ``id`` form: the one place both forms become one, so store keys, fine-tune records and
    references always hold the same string. Raises :class:`InvalidRequest` naming ``field``."""
    if not isinstance(value, str) or not VERSION_RE.match(value):
        raise InvalidRequest(
            f"{field} must be a version id (64 lower-case hex characters) or its digest 'sha256:<id>'",
            field=field,
        )
    return value.removeprefix("sha256:")


def validate_relative_path(value: str, field: str = "filename") -> str:
    """A relative POSIX path of safe segments: no absolute path, no ``..``, no control characters."""
    if not value or len(value) > MAX_PATH_LEN:
        raise InvalidRequest(f"{field} must be 1-{MAX_PATH_LEN} characters", field=field)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidRequest(f"{field} must not contain control characters", field=field)
    if value.startswith("/") or "\\" in value:
        raise InvalidRequest(f"{field} must be a relative path with '/' separators", field=field)
    parts = value.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        raise InvalidRequest(f"{field} is nested deeper than {MAX_PATH_DEPTH} directories", field=field)
    for part in parts:
        if part in ("", ".", "..") or not _SEGMENT_RE.match(part) or part.startswith("."):
            raise InvalidRequest(
                f"{field} {value!r}: each path segment must be letters, digits, '.', '_' or '-' "
                "and must not be empty, '.', '..' or start with '.'",
                field=field,
            )
    return value
