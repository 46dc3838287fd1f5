"""The training loop both stages share: get batch -> forward -> loss -> backward -> clip -> step ->
log -> checkpoint, one step per iteration and every step visible.

A stage is a :class:`Task`: its data, its loss, its trainable parameters and how they are saved
and restored. The loop owns the rest: the accelerator (data parallel under ``accelerate launch``),
the optimizer and LR schedule, the per-step randomness, stop requests, metrics and checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from huvidpo.models import directory_digest
from huvidpo.training.callbacks import TrainingCallback, peak_memory_bytes
from huvidpo.training.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint, restore_rng
from huvidpo.training.common import (
    ShouldStop,
    TrainResult,
    any_processes,
    build_optimizer,
    build_scheduler,
    checkpoint_saver,
    items_for_step,
    make_accelerator,
    mean_over_processes,
    rank_slice,
    resume_compatible,
    run_callbacks,
    seed_everything,
    step_generator,
    steps_per_epoch,
)
from huvidpo.training.config import TrainConfig
from huvidpo.training.samples import plan_samples, render_samples


class Task(Protocol):
    """What a stage brings to :func:`train`; built by ``make_task(cfg, accelerator)`` once the
    accelerator exists and the global RNGs are seeded."""

    @property
    def stage(self) -> str:
        """Recorded in every checkpoint's lineage (``"dpo"``, ``"stage1"``)."""

    @property
    def unet(self) -> torch.nn.Module:
        """The model the optimizer trains (the loop hands it to ``accelerator.prepare``)."""

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The trainable set (fp32 master weights), in optimizer order."""

    @property
    def num_items(self) -> int:
        """Training items (pairs, clips) one epoch goes through."""

    @property
    def model_digest(self) -> str: ...

    @property
    def data_report(self) -> dict[str, Any]: ...

    @property
    def components(self) -> Any:
        """The loaded ``ModelComponents`` (its UNet is ``unet``): what the sample videos render with."""

    def sample_sources(self) -> list[tuple[str, str | None]]:
        """(prompt, video path) of the training data, one per prompt, in the order sample videos
        take them by default (``huvidpo.training.samples.plan_samples``)."""
        ...

    def loss(
        self, model: torch.nn.Module, items: list[int], mine: slice, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Load this process's share ``mine`` of the step's global batch ``items`` (indices into the
        training items), run ``model`` (the prepared, possibly DDP-wrapped ``unet``) and return the
        scalar loss and the stats to log. Every draw of the step (clip views, noise, timesteps) comes
        from ``gen`` and is made for the whole global batch, so it does not depend on the number of
        processes."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (a collective: every process calls it), or ``{}`` when there are none."""
        ...

    def write_weights(self, directory: Path) -> None:
        """Write the trained weights into a checkpoint directory being built (``adapter/`` if they
        are what inference serves, else under ``state/``)."""
        ...

    def load_weights(self, checkpoint: Path) -> None:
        """Load the trained weights of ``checkpoint`` (raise :class:`CheckpointError` on a mismatch)."""
        ...

    def save_final(self, out: Path, model: torch.nn.Module) -> Path:
        """Write the final weights under ``out`` (main process only) and return their directory."""
        ...


C = TypeVar("C", bound=TrainConfig)


def train(
    cfg: C,
    make_task: Callable[[C, Any], Task],
    callbacks: Sequence[TrainingCallback] = (),
    should_stop: ShouldStop | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``make_task(cfg, accelerator)`` for ``cfg.max_steps`` (or ``cfg.epochs``) optimizer steps.

    ``should_stop()`` is polled before every step (on every process; one True stops all); a stopped
    run writes a checkpoint and returns with ``stopped=True``. With ``resume`` the newest complete
    checkpoint under ``<output_dir>/checkpoints`` is restored (weights, optimizer, schedule, RNG).
    Checkpoints every ``checkpoint_every`` steps (0: only at the end), when ``checkpoint_minutes`` of
    wall time passed since the last one, and at the last step."""
    cfg.validate()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    resume_from = latest_checkpoint(ckpt_dir) if resume else None
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    task = make_task(cfg, accelerator)

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.batch_size * world
    per_epoch = steps_per_epoch(task.num_items, global_batch)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch
    optimizer = build_optimizer(task.params, cfg)
    lr_sched = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(task.unet, optimizer)
    start_step = _restore(resume_from, task, cfg, optimizer, lr_sched) if resume_from is not None else 0
    # The caller's digests when it has them (the trainer: the ones the store publishes them under).
    lineage = {"base_model_digest": task.model_digest,
               "dataset_digest": cfg.dataset_digest or directory_digest(cfg.dataset),
               "config": cfg.to_dict(), "stage": task.stage}  # fmt: skip
    cb = run_callbacks(out, cfg, accelerator, start_step if resume_from else None, callbacks)
    specs = plan_samples(cfg, task.sample_sources()) if cfg.sample_count else []
    # Sample videos: rendered on the main process only, into the checkpoint, before its manifest.
    write_samples = (
        partial(
            render_samples, components=task.components, specs=specs, cfg=cfg, autocast=accelerator.autocast
        )
        if specs
        else None
    )
    save = checkpoint_saver(
        ckpt_dir, cfg, accelerator, optimizer, lr_sched, per_epoch, lineage, cb, task.write_weights,
        write_samples,
    )  # fmt: skip

    last_ckpt: Path | None = resume_from
    saved_step = start_step if resume_from is not None else None  # known on every process
    last_metrics: dict[str, Any] = {}
    eval_metrics: dict[str, Any] = {}
    stopped = False
    step = start_step
    mine = rank_slice(rank, cfg.batch_size)
    saved_at = time.monotonic()  # the main process's clock decides when a checkpoint is due by time
    while step < total_steps:
        due = (
            cfg.checkpoint_minutes > 0
            and step > start_step
            and time.monotonic() - saved_at >= 60 * cfg.checkpoint_minutes
        )
        stop_now, due = any_processes(
            accelerator, [should_stop is not None and should_stop(), due and accelerator.is_main_process]
        )
        if (stop_now or due) and saved_step != step:
            # A stop request's checkpoint skips the samples: the grace period is for the state.
            last_ckpt = save(step, samples=not stop_now) or last_ckpt  # the state after the previous step
            saved_step, saved_at = step, time.monotonic()
        if stop_now:
            stopped = True
            break
        t0 = time.perf_counter()
        # The step's draws are made for the whole global batch; this process takes its slice.
        epoch, items = items_for_step(task.num_items, step, global_batch, cfg.seed)
        loss, stats = task.loss(model, items, mine, step_generator(cfg.seed, step))
        accelerator.backward(loss)
        grad_norm = (
            accelerator.clip_grad_norm_(task.params, cfg.grad_clip)
            if cfg.grad_clip > 0
            else _grad_norm(task.params)
        )
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - t0
        last_metrics = {
            "step": step,
            "total_steps": total_steps,
            "epoch": epoch,
            **mean_over_processes(accelerator, stats),
            "lr": float(lr_sched.get_last_lr()[0]),
            "grad_norm": float(grad_norm),
            "step_seconds": seconds,
            "samples_per_second": len(items) / seconds,
            "peak_memory_bytes": peak_memory_bytes(accelerator.device),
        }
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            eval_metrics = task.evaluate()
            last_metrics.update(eval_metrics)
        if step % cfg.log_every == 0 or step == total_steps:
            cb.on_step(last_metrics)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total_steps:
            last_ckpt = save(step) or last_ckpt  # checkpoint_every 0: only at the end (and when stopped)
            saved_step, saved_at = step, time.monotonic()

    weights_dir: Path | None = None
    if not stopped:
        eval_metrics = task.evaluate()
        if accelerator.is_main_process:
            weights_dir = task.save_final(out, model)
        accelerator.wait_for_everyone()  # every process returns once the final weights are on disk
    cb.on_end({"steps": step, "total_steps": total_steps, "stopped": stopped, **eval_metrics,
               "final": last_metrics, "data": task.data_report})  # fmt: skip
    plot = out / "metrics.png"
    return TrainResult(
        output_dir=out,
        steps=step,
        total_steps=total_steps,
        stopped=stopped,
        weights_dir=weights_dir,
        last_checkpoint=last_ckpt,
        metrics_path=out / "metrics.jsonl",
        plot_path=plot if plot.exists() else None,
        resumed_from=resume_from,
        final_metrics=last_metrics,
        eval_metrics=eval_metrics,
        data_report=task.data_report,
        main_process=bool(accelerator.is_main_process),
    )


def _grad_norm(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The gradients' global L2 norm, for the log when clipping (which also measures it) is off."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def _restore(path: Path, task: Task, cfg: TrainConfig, optimizer: Any, lr_sched: Any) -> int:
    """Load the task's weights, the optimizer, the schedule and the RNG from checkpoint ``path``;
    returns its step."""
    ck = read_checkpoint(path)
    changed = resume_compatible(ck.trainer_state.get("config", {}), cfg.to_dict())
    if changed:
        raise CheckpointError(f"cannot resume from {path}: the config changed in {', '.join(changed)}")
    task.load_weights(path)
    optimizer.load_state_dict(ck.optimizer_state)
    lr_sched.load_state_dict(ck.trainer_state["scheduler"])
    restore_rng(ck.rng_tensors, ck.rng_meta)
    return ck.step
