"""The trainer entrypoint a Kubernetes Job (or the local executor) runs for one fine-tune.

1. Read the fine-tune's spec ``finetunes/{id}/spec.json`` (``FineTuneSpec``: dataset version, base
   model, stage, hyperparameters), its only input.
2. Fetch the dataset version and the base model from the store, verifying every digest.
3. If the store already holds checkpoints of this fine-tune (a previous attempt was killed), restore
   the newest one and resume from it.
4. Run ``huvidpo.training``; each checkpoint directory (adapter/ for inference, state/ for resuming)
   is uploaded as is to ``checkpoints/ckpt-{id}-{step}/`` with its manifest written last, and a
   resume downloads it as is; progress records go to ``finetunes/{id}/progress.jsonl``.

Several processes (GPUs, nodes): every process runs this as one rank of a torchrun group
(``services.trainer.ranks``; the pod's command stays ``python -m services.trainer``, the shape comes
from the ``PET_*`` variables). Rank 0 reads the spec and the resume point; each node's local rank 0
fetches the inputs and the checkpoint into that node's work dir while the others wait; every rank
restores the same checkpoint; only rank 0 writes progress and publishes checkpoints. A failure on
any rank ends every rank's attempt with the most severe code.

Exit codes (``ExitCode``, docs/CONTRACTS.md): 0 success; 2 bad data or config (never retried:
podFailurePolicy FailJob); 75 transient (store unreachable, preempted by SIGTERM: retried); 1 anything else.
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from services.common.publish import NotPublished, fetch_published, publish_checkpoint, read_manifest
from services.common.records import hyperparameters, keys
from services.common.records.exit_codes import ExitCode
from services.common.records.finetune import PairsRef, read_spec, read_status
from services.common.records.lineage import (
    DatasetVersionManifest,
    Lineage,
    content_digest,
)
from services.common.records.listing import published_checkpoints
from services.common.records.progress import (
    CheckpointEvent,
    EndEvent,
    ProgressEvent,
    StartEvent,
    StepEvent,
    attempts,
    now,
    parse_progress,
)
from services.common.settings import SettingsError, StoreSettings, TrainerSettings, load_settings
from services.common.store import (
    ChecksumMismatch,
    ObjectNotFound,
    ObjectStore,
    StoreUnavailable,
    make_store,
)
from services.trainer.ranks import (
    Group,
    Outcome,
    PeerFailed,
    Ranks,
    ShapeError,
    launch_node,
    node_shape,
    worst,
)

log = logging.getLogger("huvidpo.trainer")


# Config keys that are this pod's paths or recorded on their own: not part of the lineage's config.
_LOCAL_CONFIG = (
    "model",
    "dataset",
    "output_dir",
    "cache_dir",
    "unet_dir",
    "dataset_digest",
    "base_model_digest",
    "pairs_file",  # the spec's pairs, recorded as spec.pairs (digest) in the fine-tune
    "heldout_file",  # likewise its held-out pairs (spec.pairs.heldout_digest)
)


class BadInput(Exception):
    """The fine-tune cannot run as recorded (missing dataset or model, invalid config): exit 2."""


class ProgressWriter:
    """Keeps ``finetunes/{id}/progress.jsonl`` (rewritten whole: object stores have no append).

    Step records are flushed at most every ``min_interval`` seconds; other events at once."""

    def __init__(self, store: ObjectStore, finetune_id: str, min_interval: float = 1.0) -> None:
        self.store = store
        self.key = keys.progress_key(finetune_id)
        self.min_interval = min_interval
        self._last_flush = 0.0
        try:
            text = store.get_bytes(self.key).decode("utf-8", "replace")
            # Earlier attempts' lines are kept as written; only their events are read.
            self.lines = [ln for ln in text.splitlines() if ln.strip()]
        except ObjectNotFound:
            self.lines = []
        self._attempts = attempts(parse_progress("\n".join(self.lines)))
        self._dirty = False

    def add(self, event: ProgressEvent, flush: bool = True) -> None:
        if event.time is None:
            event.time = now()
        self._attempts += isinstance(event, StartEvent)
        self.lines.append(event.to_line())
        self._dirty = True
        if flush or time.monotonic() - self._last_flush >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        if not self._dirty:
            return
        self.store.put_bytes(
            self.key, ("\n".join(self.lines) + "\n").encode(), content_type="application/jsonl"
        )
        self._dirty = False
        self._last_flush = time.monotonic()

    def attempts(self) -> int:
        """Attempts started so far: the start events read at open plus those added since."""
        return self._attempts


def published_steps(store: ObjectStore, finetune_id: str) -> list[int]:
    """Steps of this fine-tune's checkpoints that are fully published (manifest present), ascending."""
    return [step for _, step, _ in published_checkpoints(store, finetune_id)]


def restore_checkpoint(store: ObjectStore, finetune_id: str, step: int, checkpoints_dir: Path) -> Path:
    """Download a published checkpoint as is, with its manifest, into the training library's
    checkpoint directory (the two layouts are one; a checkpoint published before that, with the
    library's manifest under ``state/``, reads the same way)."""
    from huvidpo.training.checkpoint import checkpoint_name

    target = checkpoints_dir / checkpoint_name(step)
    tmp = checkpoints_dir / f"{checkpoint_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    fetch_published(
        store, keys.checkpoint_prefix(keys.checkpoint_id(finetune_id, step)), tmp, keep_manifest=True
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


class StoreCallback:
    """Training callback: progress records and checkpoint publication to the store."""

    def __init__(
        self,
        store: ObjectStore,
        progress: ProgressWriter,
        finetune_id: str,
        lineage: Lineage,
        total_steps: int | None,
    ) -> None:
        self.store = store
        self.progress = progress
        self.finetune_id = finetune_id
        self.lineage = lineage
        self.total_steps = total_steps
        self.summary: dict[str, Any] = {}

    def on_step(self, metrics: dict[str, Any]) -> None:
        keep = (
            "step",
            "epoch",
            "loss",
            "implicit_acc",
            "reward_margin",
            "step_seconds",
            "samples_per_second",
            "lr",
        )
        rec = {k: metrics[k] for k in keep if k in metrics}
        self.progress.add(StepEvent(total_steps=self.total_steps, **rec), flush=False)

    def on_checkpoint(self, path: Path, step: int) -> None:
        cid = keys.checkpoint_id(self.finetune_id, step)
        if self.store.exists(keys.checkpoint_manifest_key(cid)):
            return  # published by an earlier attempt (the resume point)
        started = time.monotonic()
        manifest = publish_checkpoint(self.store, path, cid, self.lineage, now())
        size = sum(f.size for f in manifest.files.values())
        log.info("checkpoint %s uploaded (%.1f MB in %.1f s)", cid, size / 1e6, time.monotonic() - started)
        self.progress.add(CheckpointEvent(step=step, checkpoint_id=cid))

    def on_end(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        self.progress.flush()


def run(
    store: ObjectStore,
    settings: TrainerSettings,
    stop: list[bool] | None = None,
    callbacks: tuple[Any, ...] = (),
    ranks: Ranks | None = None,
) -> int:
    """Run one fine-tune attempt on this rank (``callbacks`` see every step too, on rank 0); returns
    the exit code. With several ranks (``ranks``, default: from torchrun's variables) every rank
    calls this; a failure on any rank ends every rank's attempt with the worst code (:func:`worst`)."""
    finetune_id = settings.finetune_id
    if not finetune_id:
        log.error("HUVIDPO_TRAINER_FINETUNE_ID is not set")
        return ExitCode.BAD_INPUT
    stop = stop if stop is not None else [False]
    ranks = ranks if ranks is not None else Ranks.from_environ()
    try:
        group = Group(ranks, cpu=settings.device == "cpu")
    except Exception as exc:  # the training group never formed: a peer or the rendezvous went away
        log.warning("rank %d could not join the group: %s", ranks.rank, exc)
        return ExitCode.TRANSIENT
    try:
        # Only rank 0 writes the progress records (one writer: the object has no append).
        progress = group.phase(lambda: ProgressWriter(store, finetune_id) if ranks.main else None, _classify)
    except PeerFailed as exc:
        log.error("object store unavailable: %s", exc)
        return exc.outcome[0]
    code: int
    own = False
    try:
        code, reason, message = _run(store, settings, finetune_id, progress, stop, callbacks, ranks, group)
    except Exception as exc:
        code, reason, message = _classify(exc)
        own = not isinstance(exc, PeerFailed) and reason != "PeerLost"
    # Name the dataset's files as the user uploaded them, not by this trainer's local copy.
    work = Path(settings.work_dir) / finetune_id
    message = message.replace(f"{work}/dataset/data/", "").replace(f"{work}/", "")
    if reason == "PeerLost":  # why the peer went away, if it could say (bad data: exit 2 for all)
        code, reason, message = worst([(code, reason, message), *group.posted()])
    elif code != ExitCode.OK and own:
        group.post((code, reason, message))  # this rank's own failure, for rank 0, before it leaves
    if progress is None:  # not rank 0: rank 0 records the attempt's end
        if code != ExitCode.OK and reason != "Cancelled":
            log.warning("rank %d exits with %d (%s): %s", ranks.rank, code, reason, message)
        return code
    try:
        if code == ExitCode.OK:
            log.info("fine-tune %s succeeded: %s", finetune_id, message)
            progress.add(EndEvent(state="succeeded", exit_code=ExitCode.OK))
        else:
            if reason == "Cancelled":  # the user's choice, not a failure
                log.info("fine-tune %s %s", finetune_id, message)
            else:
                level = logging.WARNING if code == ExitCode.TRANSIENT else logging.ERROR
                log.log(level, "trainer exits with %d (%s): %s", code, reason, message)
            progress.add(
                EndEvent(
                    state="cancelled" if reason == "Cancelled" else "failed",
                    exit_code=code,
                    reason=reason,
                    message=message[:2000],
                )
            )
    except StoreUnavailable:
        return ExitCode.TRANSIENT
    return code


def _classify(exc: BaseException) -> Outcome:
    """(exit code, reason, message) of an attempt that raised ``exc``."""
    from huvidpo.data import ClipError, DatasetError
    from huvidpo.training import CheckpointError, ConfigError
    from huvidpo.video_io import VideoDecodeError

    if isinstance(exc, PeerFailed):
        return exc.outcome
    if isinstance(exc, StoreUnavailable):
        return ExitCode.TRANSIENT, "StoreUnavailable", str(exc)
    if isinstance(exc, ConnectionError | TimeoutError):
        return ExitCode.TRANSIENT, "Transient", str(exc)
    if isinstance(exc, BadInput):
        return ExitCode.BAD_INPUT, "BadInput", str(exc)
    # Data or config the trainer cannot use: a retry would fail the same way (exit 2, no retry).
    if isinstance(exc, DatasetError | ConfigError | CheckpointError | ClipError | VideoDecodeError):
        return ExitCode.BAD_INPUT, type(exc).__name__, str(exc)
    if _peer_lost(exc):
        # Another process of the group went away (its node was lost, it was killed or failed): the
        # next attempt of the whole group resumes from the last published checkpoint.
        return ExitCode.TRANSIENT, "PeerLost", f"another process of the training group went away: {exc}"
    log.exception("trainer failed")
    return ExitCode.FAILED, type(exc).__name__, str(exc)


def _peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because a peer went away (gloo raises a plain
    RuntimeError naming the connection; NCCL and the c10d store raise ``DistError``s)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo")
    )


def _plan(store: ObjectStore, finetune_id: str) -> dict[str, Any]:
    """What every rank trains on, read once by rank 0: the spec, the digests of the publications it
    names, the published resume point and the Job's name."""
    spec = read_spec(store, finetune_id)
    if spec is None:
        raise BadInput(f"fine-tune {finetune_id} has no spec in the store")
    try:
        # Identity of what this run trains on: the one digest of the publications it fetches.
        dataset_digest = DatasetVersionManifest.model_validate(
            read_manifest(store, keys.dataset_version_prefix(spec.dataset, spec.version))
        ).content_digest()
        base_model_digest = content_digest(read_manifest(store, keys.model_prefix(spec.base_model))["files"])
    except NotPublished as exc:
        raise BadInput(str(exc)) from exc
    # Resume from the newest *published* checkpoint only: a local one may never have reached the store.
    steps = published_steps(store, finetune_id)
    return {
        "spec": spec,
        "dataset_digest": dataset_digest,
        "base_model_digest": base_model_digest,
        "resume_step": steps[-1] if steps else None,
        "job": _job_name(store, finetune_id),
    }


def _fetch(store: ObjectStore, spec: Any, finetune_id: str, work: Path, resume_step: int | None) -> None:
    """Fetch the dataset version, the base model, the pairs and the resume checkpoint into ``work``
    (one process per node: its work dir), verifying every digest."""
    dataset_dir, model_dir = work / "dataset", work / "model"
    try:
        for target, prefix in (
            (dataset_dir, keys.dataset_version_prefix(spec.dataset, spec.version)),
            (model_dir, keys.model_prefix(spec.base_model)),
        ):
            if not (target / ".complete").exists():
                shutil.rmtree(target, ignore_errors=True)
                fetch_published(store, prefix, target)
                (target / ".complete").write_text("")
    except NotPublished as exc:
        raise BadInput(str(exc)) from exc
    if spec.pairs is not None:
        _fetch_pairs(store, spec.pairs, work / "pairs.jsonl")
        if spec.pairs.heldout_digest is not None:
            _fetch_pairs(store, spec.pairs, work / "heldout.jsonl", "heldout.jsonl")
    ckpt_dir = work / "out" / "checkpoints"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    if resume_step is not None:
        restore_checkpoint(store, finetune_id, resume_step, ckpt_dir)


def _run(
    store: ObjectStore,
    settings: TrainerSettings,
    finetune_id: str,
    progress: ProgressWriter | None,
    stop: list[bool],
    callbacks: tuple[Any, ...] = (),
    ranks: Ranks | None = None,
    group: Group | None = None,
) -> tuple[ExitCode, str | None, str]:
    from huvidpo.training import DPOConfig, LogMetrics, Stage1Config, run_dpo, run_stage1

    ranks = ranks or Ranks()
    group = group or Group(ranks, cpu=True)
    plan = group.broadcast(group.phase(lambda: _plan(store, finetune_id) if ranks.main else None, _classify))
    assert plan is not None
    spec, resume_step = plan["spec"], plan["resume_step"]
    work = Path(settings.work_dir) / finetune_id
    out = work / "out"
    inputs: dict[str, Any] = {
        "model": str(work / "model"),
        "dataset": str(work / "dataset" / "data"),
        "output_dir": str(out),
        "device": settings.device,
        "plot": False,
        "dataset_digest": plan["dataset_digest"],
        "base_model_digest": plan["base_model_digest"],
    }
    if spec.pairs is not None:
        inputs["pairs_file"] = str(work / "pairs.jsonl")
        if spec.pairs.heldout_digest is not None:  # evaluated on, never trained on
            inputs["heldout_file"] = str(work / "heldout.jsonl")
    set_by_spec = spec.hyperparameters.model_fields_set
    if settings.checkpoint_every and "checkpoint_every" not in set_by_spec:
        inputs["checkpoint_every"] = settings.checkpoint_every
    if "checkpoint_minutes" not in set_by_spec:
        inputs["checkpoint_minutes"] = settings.checkpoint_minutes

    def prepare() -> Any:
        config = hyperparameters.to_config(spec.stage, spec.hyperparameters, **inputs)
        config.validate()
        if ranks.node_main:  # the other processes of this node wait for its fetch in the agreement
            work.mkdir(parents=True, exist_ok=True)
            _fetch(store, spec, finetune_id, work, resume_step)
        return config

    cfg = group.phase(prepare, _classify)
    assert cfg is not None
    if resume_step is not None:
        log.info("resuming fine-tune %s from published checkpoint at step %d", finetune_id, resume_step)
    total = cfg.max_steps
    cbs: list[Any] = [LogMetrics()]  # 'written' is logged before 'uploaded'
    if progress is not None:  # rank 0: the only one that records progress and publishes
        lineage = Lineage.model_validate(
            {
                **spec.lineage,
                "dataset_digest": plan["dataset_digest"],
                "base_model_digest": plan["base_model_digest"],
                "finetune_id": finetune_id,
                "config": {k: v for k, v in cfg.to_dict().items() if k not in _LOCAL_CONFIG},
                "job": plan["job"],
            }
        )
        progress.add(
            StartEvent(total_steps=total, resumed_from_step=resume_step, attempt=progress.attempts() + 1)
        )
        log.info(
            "fine-tune %s: %s on dataset %s version %s, base model %s, %s steps, attempt %d%s%s",
            finetune_id, spec.stage, spec.dataset, str(spec.version)[:12], spec.base_model,
            total if total is not None else f"{cfg.epochs} epochs of", progress.attempts(),
            f", resuming at step {resume_step}" if resume_step is not None else "",
            f", {ranks.world_size} processes" if ranks.distributed else "",
        )  # fmt: skip
        cbs += [StoreCallback(store, progress, finetune_id, lineage, total), *callbacks]
    should_stop = lambda: stop[0]  # noqa: E731
    if isinstance(cfg, DPOConfig):
        result = run_dpo(cfg, cbs, should_stop=should_stop, resume=resume_step is not None)
    else:
        assert isinstance(cfg, Stage1Config)
        result = run_stage1(cfg, cbs, should_stop=should_stop, resume=resume_step is not None)
    if progress is not None:
        progress.flush()
    if result.stopped and progress is not None and _cancel_requested(store, finetune_id):
        return ExitCode.TRANSIENT, "Cancelled", f"cancelled on request at step {result.steps}"
    if result.stopped:
        return (
            ExitCode.TRANSIENT,
            "Stopped",
            "stopped by SIGTERM after a checkpoint; the retry resumes from it",
        )
    return ExitCode.OK, None, f"trained {result.steps} steps"


def _fetch_pairs(store: ObjectStore, pairs: PairsRef, dest: Path, name: str = "pairs.jsonl") -> Path:
    """The compiled pairs (or held-out pairs) the spec names, verified against the digest it recorded."""
    key = pairs.prefix + name
    digest = pairs.digest if name == "pairs.jsonl" else str(pairs.heldout_digest)
    try:
        store.get_file(key, dest, expected_sha256=digest.removeprefix("sha256:"))
    except ObjectNotFound as exc:
        raise BadInput(f"the fine-tune's compiled pairs {key} are gone from the store") from exc
    except ChecksumMismatch as exc:
        raise BadInput(f"the fine-tune's compiled pairs {key} changed since it was created") from exc
    return dest


def _job_name(store: ObjectStore, finetune_id: str) -> str:
    """The Job running this attempt, as the control plane's status names it (for the lineage)."""
    try:
        status = read_status(store, finetune_id)
    except ValueError:  # a status this trainer cannot read names no Job: the id still does
        return finetune_id
    return (status.job or {}).get("name", finetune_id) if status is not None else finetune_id


def _cancel_requested(store: ObjectStore, finetune_id: str) -> bool:
    """Whether the stop that ended this attempt is a user's cancel: the control plane records the
    request before it stops the Job or process (a stop without it is a preemption or a shutdown)."""
    try:
        status = read_status(store, finetune_id)
    except (StoreUnavailable, ValueError):
        return False
    return status is not None and bool(status.cancel_requested_at)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout
    )
    try:
        settings = load_settings(TrainerSettings)
        store = make_store(load_settings(StoreSettings))
    except SettingsError as exc:
        # A configuration error: retrying cannot fix it (docs/CONTRACTS.md, exit 2).
        print(f"huvidpo-trainer: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    try:
        shape = node_shape()
    except ShapeError as exc:
        print(f"huvidpo-trainer: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if shape is not None and shape.world_size > 1:
        # A node of a multi-process fine-tune: torchrun's launcher starts this node's workers, each
        # running this entrypoint as one rank (signals reach them through the launcher).
        return launch_node(shape)
    stop = [False]

    def on_term(signum: int, frame: object) -> None:
        if not stop[0]:  # a cancel signals the process group and the supervisor forwards it: log once
            log.warning("SIGTERM: checkpointing and stopping")
        stop[0] = True

    signal.signal(signal.SIGTERM, on_term)
    if not settings.metrics_port or not Ranks.from_environ().main:  # one /metrics: rank 0's
        return run(store, settings, stop)
    from services.trainer.metrics import TrainerMetrics

    metrics = TrainerMetrics()
    port = metrics.serve(settings.metrics_port, settings.metrics_host)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    try:
        return run(store, settings, stop, (metrics,))
    finally:
        deadline = time.monotonic() + settings.metrics_linger_seconds
        while not stop[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        metrics.stop()
