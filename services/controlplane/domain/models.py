"""Base models: registered from an upload or an existing store prefix, published at ``models/{id}/``.

A registration stages the files under ``models/{id}/uploads/{upload_id}/``, verifies the diffusers
layout there, and publishes by writing ``models/{id}/manifest.json`` last (``ModelManifest``: each file
with its sha256, size and the ``key`` it lies at, as dataset versions reference their staged
uploads). Readers (the fine-tune create, the trainer, the inference service) go through the manifest
(``services.common.publish.fetch_published``), so a half-staged model is never seen.

The identity of a model is the ``content_digest`` of its file listing: the same files registered
again under the same id return the existing model; other files under a taken id are a ``Conflict``.
No torch here: the layout is checked from the file names and the JSON configs alone.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from services.common.publish import write_manifest
from services.common.records import keys
from services.common.records.lineage import ModelManifest, content_digest
from services.common.store import ObjectNotFound, ObjectStore, PreconditionFailed
from services.controlplane.domain.errors import Conflict, DomainError, InvalidRequest, NotFound
from services.controlplane.domain.names import validate_name, validate_relative_path
from services.controlplane.domain.util import Clock, iso, new_id, paginate, read_json_or_none

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Folders whose weights the loader reads (huvidpo.models.load_components): each needs safetensors.
WEIGHTED = ("unet", "vae", "text_encoder")
# Weights in any other format than safetensors: pickles run code when loaded; the others are never read.
REFUSED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".msgpack", ".h5", ".onnx")
MAX_CONFIG_BYTES = 1 << 20
# Where a registration from the store reads: files put there for it (the control plane's store user
# may read only there and its own prefixes).
SOURCE_PREFIX = keys.IMPORTS
UPLOADS = "uploads/"


class InvalidModelLayout(DomainError):
    """The files are not a diffusers model directory the trainer and inference can load; ``field``
    names the offending file or folder."""

    kind = "invalid-model-layout"


@dataclass(frozen=True)
class StagedFile:
    path: str
    key: str
    sha256: str
    size: int


def check_file_name(path: str, field: str = "files") -> str:
    """A file of a model directory: a safe relative path, not a weight file of another format than
    safetensors, not the publication's own ``manifest.json``."""
    try:
        validate_relative_path(path, field)
    except InvalidRequest as exc:
        raise InvalidModelLayout(exc.message, field=path) from exc
    if PurePosixPath(path).suffix.lower() in REFUSED_WEIGHTS:
        raise InvalidModelLayout(
            f"{path}: weights are accepted as .safetensors only (pickle and other formats are refused); "
            "convert it with safetensors.torch.save_file in a trusted environment",
            field=path,
        )
    if path == keys.MANIFEST:
        raise InvalidModelLayout(f"{path} is the name the publication's manifest takes", field=path)
    return path


def verify_layout(sizes: dict[str, int], read_json: Callable[[str], Any]) -> str:
    """Check a diffusers model directory given its files' sizes (``{relpath: bytes}``) and a reader of
    its JSON files. Returns the UNet kind: ``"video"`` (a HuViDPO ``VideoUNet``) or ``"image"`` (an
    SD-1.x ``UNet2DConditionModel``, inflated to video when it is first loaded). Raises
    ``InvalidModelLayout`` naming the first file or folder at fault."""
    for path in sizes:
        check_file_name(path)
    for comp in COMPONENTS:
        if not any(p.startswith(comp + "/") for p in sizes):
            raise InvalidModelLayout(f"the model has no {comp}/ folder (diffusers layout)", field=comp + "/")
    for comp in WEIGHTED:
        if not any(
            p.startswith(comp + "/") and p.count("/") == 1 and p.endswith(".safetensors") for p in sizes
        ):
            raise InvalidModelLayout(f"{comp}/ holds no .safetensors weights", field=comp + "/")
    if not (
        {"tokenizer/vocab.json", "tokenizer/merges.txt"} <= sizes.keys()
        or "tokenizer/tokenizer.json" in sizes
    ):
        raise InvalidModelLayout(
            "tokenizer/ needs vocab.json and merges.txt (or tokenizer.json)", field="tokenizer/"
        )

    def config(path: str) -> dict[str, Any]:
        if path not in sizes:
            raise InvalidModelLayout(f"the model has no {path}", field=path)
        if sizes[path] > MAX_CONFIG_BYTES:
            raise InvalidModelLayout(f"{path} is larger than {MAX_CONFIG_BYTES} bytes", field=path)
        try:
            value = read_json(path)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidModelLayout(f"{path} is not valid JSON", field=path) from exc
        if not isinstance(value, dict):
            raise InvalidModelLayout(f"{path} must hold a JSON object", field=path)
        return value

    if "model_index.json" in sizes:
        config("model_index.json")
    config("scheduler/scheduler_config.json")
    unet = config("unet/config.json")
    kind, unet2d = _unet_kind(unet)
    in_channels = unet2d.get("in_channels", 4)
    if in_channels != 4 or unet2d.get("out_channels", 4) != 4:
        raise InvalidModelLayout(
            "unet/config.json: the UNet must take and predict 4-channel latents (SD-1.x)",
            field="unet/config.json",
        )
    if unet2d.get("addition_embed_type") is not None:
        raise InvalidModelLayout(
            "unet/config.json: an SDXL-style UNet (addition_embed_type) is not an SD-1.x UNet",
            field="unet/config.json",
        )
    cross = unet2d.get("cross_attention_dim")
    if not isinstance(cross, int):
        raise InvalidModelLayout(
            "unet/config.json: cross_attention_dim must be one integer (SD-1.x)", field="unet/config.json"
        )
    hidden = config("text_encoder/config.json").get("hidden_size")
    if hidden != cross:
        raise InvalidModelLayout(
            f"text_encoder/config.json: hidden_size {hidden} does not match the UNet's cross_attention_dim {cross}",
            field="text_encoder/config.json",
        )
    latent = config("vae/config.json").get("latent_channels", 4)
    if latent != in_channels:
        raise InvalidModelLayout(
            f"vae/config.json: latent_channels {latent} does not match the UNet's in_channels {in_channels}",
            field="vae/config.json",
        )
    return kind


def _unet_kind(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``("video", its 2D config)`` for a VideoUNet, ``("image", config)`` for a 2D UNet."""
    cls = config.get("_class_name")
    if cls == "VideoUNet":
        inner = config.get("unet_config")
        if not isinstance(inner, dict):
            raise InvalidModelLayout(
                "unet/config.json: a VideoUNet config needs the 2D config it inflates (unet_config)",
                field="unet/config.json",
            )
        return "video", inner
    if cls == "UNet2DConditionModel":
        return "image", config
    raise InvalidModelLayout(
        f"unet/config.json: _class_name {cls!r} is neither an SD-1.x UNet2DConditionModel nor a VideoUNet",
        field="unet/config.json",
    )


class ModelService:
    """Registers, reads and lists base models in the store."""

    def __init__(self, store: ObjectStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    # ------------------------------------------------------------------------------------ reads
    def get(self, model_id: str) -> dict[str, Any]:
        validate_name(model_id, "id")
        manifest = read_json_or_none(self.store, keys.model_manifest_key(model_id))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise NotFound(f"model {model_id!r} not found")
        return self._view(model_id, manifest)

    def list(
        self, page_size: int = 50, page_token: str | None = None
    ) -> tuple[builtins.list[dict[str, Any]], str | None]:
        ids = sorted(d[len(keys.MODELS) : -1] for d in self.store.list_dirs(keys.MODELS))
        published = [i for i in ids if self.store.exists(keys.model_manifest_key(i))]
        page, token = paginate(published, lambda i: i, page_size, page_token)
        out = []
        for model_id in page:
            manifest = read_json_or_none(self.store, keys.model_manifest_key(model_id))
            if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
                out.append(self._view(model_id, manifest))
        return out, token

    def _view(self, model_id: str, manifest: dict[str, Any]) -> dict[str, Any]:
        files = manifest["files"]
        unet = manifest.get("unet")
        if unet not in ("video", "image"):  # published before registration recorded it (publish_dir)
            unet = self._unet_of(model_id, files)
        return {
            "id": model_id,
            "prefix": keys.model_prefix(model_id),
            "digest": "sha256:" + content_digest(files),
            "unet": unet,
            "files": len(files),
            "size_bytes": sum(int(f.get("size", 0)) for f in files.values()),
            "created_at": manifest.get("created_at"),
            "created_by": manifest.get("created_by", ""),
            "description": manifest.get("description", ""),
        }

    def _unet_of(self, model_id: str, files: dict[str, Any]) -> str:
        entry = files.get("unet/config.json") or {}
        try:
            config = self.store.get_json(entry.get("key") or keys.model_prefix(model_id) + "unet/config.json")
        except (ObjectNotFound, ValueError):
            return "video"
        return "video" if isinstance(config, dict) and config.get("_class_name") == "VideoUNet" else "image"

    # ----------------------------------------------------------------------------- registration
    def start(self, model_id: str) -> str:
        """A new staging prefix for registering ``model_id``."""
        validate_name(model_id, "id")
        return keys.model_prefix(model_id) + UPLOADS + new_id("up") + "/"

    def stage_stream(self, staging: str, path: str, stream: BinaryIO, content_type: str | None) -> StagedFile:
        """Stream one uploaded file into ``staging`` (memory bounded; the store computes its sha256)."""
        check_file_name(path)
        info = self.store.put_stream(staging + path, stream, None, content_type or "application/octet-stream")
        return StagedFile(path, info.key, str(info.sha256), info.size)

    def stage_prefix(self, staging: str, source: str) -> builtins.list[StagedFile]:
        """Verify the layout at ``source`` (a store prefix) and copy its files into ``staging``."""
        source = validate_source(source)
        objects = self.store.list(source, recursive=True)
        if not objects:
            raise InvalidRequest(f"from_prefix {source!r} holds no files", field="from_prefix")
        sizes = {o.key[len(source) :]: o.size for o in objects}
        verify_layout(sizes, lambda rel: json.loads(self.store.get_bytes(source + rel)))
        staged = []
        for o in objects:
            rel = o.key[len(source) :]
            with self.store.open_read(o.key) as reader:
                info = self.store.put_stream(staging + rel, reader, o.size, o.content_type)  # type: ignore[arg-type]
            staged.append(StagedFile(rel, info.key, str(info.sha256), info.size))
        return staged

    def publish(
        self,
        model_id: str,
        staging: str,
        staged: Iterable[StagedFile],
        description: str,
        created_by: str,
    ) -> tuple[dict[str, Any], bool]:
        """Verify the staged files and publish them as ``model_id``. Returns ``(view, created)``:
        ``created`` is False when the same files were registered under this id before (the staged
        copy is then dropped). Raises ``Conflict`` when other files hold the id, ``InvalidModelLayout``
        for a bad layout (nothing is published; the caller discards the staging)."""
        files = {f.path: f for f in staged}
        if not files:
            raise InvalidRequest("the registration holds no files", field="files")
        unet = verify_layout(
            {p: f.size for p, f in files.items()},
            lambda rel: json.loads(self.store.get_bytes(files[rel].key)),
        )
        entries = {p: {"sha256": f.sha256, "size": f.size, "key": f.key} for p, f in sorted(files.items())}
        digest = content_digest(entries)
        manifest = ModelManifest.model_validate(
            {
                "id": model_id,
                "unet": unet,
                "description": description,
                "created_at": iso(self.clock()),
                "created_by": created_by,
                "files": entries,
            }
        )
        prefix = keys.model_prefix(model_id)
        try:
            write_manifest(self.store, prefix, manifest, if_none_match=True)
        except PreconditionFailed:
            existing = self.get(model_id)
            self.discard(staging)
            if existing["digest"] != "sha256:" + digest:
                raise Conflict(
                    f"model {model_id!r} is already registered with other files ({existing['digest']}); "
                    "register these under another id",
                    field="id",
                ) from None
            return existing, False
        return self._view(model_id, manifest.model_dump(mode="json")), True

    def discard(self, staging: str) -> None:
        self.store.delete_prefix(staging)

    def delete(self, model_id: str) -> None:
        """Unpublish (the manifest first: readers stop seeing it), then delete every file under
        ``models/{id}/``. Whether it may be deleted is the retention rule's (``Retention.delete_model``)."""
        self.store.delete(keys.model_manifest_key(model_id))
        self.store.delete_prefix(keys.model_prefix(model_id))


def validate_source(prefix: str) -> str:
    """A ``from_prefix``: a relative store prefix under ``imports/``, returned ending in ``/``."""
    value = prefix if prefix.endswith("/") else prefix + "/"
    try:
        validate_relative_path(value.rstrip("/"), "from_prefix")
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, field="from_prefix") from exc
    if not value.startswith(SOURCE_PREFIX) or value == SOURCE_PREFIX:
        raise InvalidRequest(
            f"from_prefix must be a folder under {SOURCE_PREFIX} (where the control plane reads models "
            f"to register), not {prefix!r}",
            field="from_prefix",
        )
    return value
