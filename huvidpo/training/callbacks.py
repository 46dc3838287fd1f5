"""Metrics reporting through callbacks.

A trainer calls ``on_step(metrics)`` after every logged optimizer step, ``on_checkpoint(path, step)``
after a checkpoint is complete, and ``on_end(summary)`` once at the end. The services plug their own
callbacks in (Prometheus, progress records); the library ships a JSONL writer and a PNG plot.

Step metrics (keys of the dict; floats unless noted): ``step`` (int), ``epoch`` (int), ``loss``,
``lr``, ``grad_norm``, ``step_seconds``, ``samples_per_second``, ``peak_memory_bytes`` (CUDA max
allocated, or the process's peak RSS on CPU). DPO adds ``implicit_acc``, ``reward_margin``,
``reward_chosen``, ``reward_rejected``, ``err_model_chosen``, ``err_model_rejected``,
``err_ref_chosen``, ``err_ref_rejected``; evaluation steps add ``eval_implicit_acc`` and
``eval_reward_margin``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainingCallback(Protocol):
    """Receives a trainer's metrics; every method may be a no-op."""

    def on_step(self, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, path: Path, step: int) -> None: ...

    def on_end(self, summary: dict[str, Any]) -> None: ...


class CallbackBase:
    """Convenience base class with no-op methods."""

    def on_step(self, metrics: dict[str, Any]) -> None:
        return None

    def on_checkpoint(self, path: Path, step: int) -> None:
        return None

    def on_end(self, summary: dict[str, Any]) -> None:
        return None


class CallbackList(CallbackBase):
    def __init__(self, callbacks: Sequence[TrainingCallback]) -> None:
        self.callbacks = list(callbacks)

    def on_step(self, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_step(dict(metrics))

    def on_checkpoint(self, path: Path, step: int) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(path, step)

    def on_end(self, summary: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_end(dict(summary))


class JsonlMetrics(CallbackBase):
    """Appends one JSON object per step to ``path`` (flushed each line, so a crash loses nothing).

    On resume, lines with ``step`` beyond the resumed step are dropped first (they would repeat)."""

    def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def on_step(self, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(metrics, default=float) + "\n")


class LogMetrics(CallbackBase):
    """One log line per logged step (step, loss, reward accuracy, lr), per checkpoint and at the end,
    through ``logging`` (logger ``huvidpo.training``, level INFO): what a service's log shows."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("huvidpo.training")

    def on_step(self, metrics: dict[str, Any]) -> None:
        total = metrics.get("total_steps")
        parts = [f"step {metrics.get('step')}" + (f"/{total}" if total else "")]
        if "epoch" in metrics:
            parts.append(f"epoch {metrics['epoch']}")
        for key, label, fmt in (
            ("loss", "loss", ".4f"),
            ("implicit_acc", "reward_acc", ".3f"),
            ("reward_margin", "reward_margin", ".4f"),
            ("lr", "lr", ".3g"),
            ("eval_implicit_acc", "eval_reward_acc", ".3f"),
            ("step_seconds", "step_seconds", ".2f"),
        ):
            if metrics.get(key) is not None:
                parts.append(f"{label} {float(metrics[key]):{fmt}}")
        self.log.info(" ".join(parts))

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.log.info("checkpoint at step %d written", step)

    def on_end(self, summary: dict[str, Any]) -> None:
        how = "stopped" if summary.get("stopped") else "finished"
        self.log.info(
            "training %s after %s of %s steps", how, summary.get("steps"), summary.get("total_steps")
        )


class PlotMetrics(CallbackBase):
    """Draws loss and (implicit) accuracy against step into a PNG at the end of a run."""

    def __init__(self, jsonl_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> None:
        self.jsonl_path = Path(jsonl_path)
        self.png_path = Path(png_path)

    def on_end(self, summary: dict[str, Any]) -> None:
        if self.jsonl_path.exists():
            plot_metrics(read_jsonl(self.jsonl_path), self.png_path)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_metrics(
    rows: Sequence[Mapping[str, Any]],
    png_path: str | os.PathLike[str],
    accuracy_lines: Mapping[str, float] | None = None,
) -> Path:
    """Loss (left) and implicit reward accuracy (right; training and held-out) against step.
    ``accuracy_lines``: labelled horizontal lines on the accuracy axis (e.g. held-out accuracy of the
    reference and of the trained checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows if "loss" in r]
    has_acc = any("implicit_acc" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in rows if "loss" in r], lw=0.8, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    if has_acc:
        ax2 = axes[0][1]
        acc = [(r["step"], r["implicit_acc"]) for r in rows if "implicit_acc" in r]
        # Per-step accuracy is 0/1 for a batch of one pair; a running mean makes it readable.
        window = max(1, len(acc) // 20)
        vals = [a for _, a in acc]
        smooth = [
            sum(vals[max(0, i - window + 1) : i + 1]) / len(vals[max(0, i - window + 1) : i + 1])
            for i in range(len(vals))
        ]
        ax2.plot([s for s, _ in acc], smooth, lw=0.8, label=f"train (running mean of {window})")
        ev = [(r["step"], r["eval_implicit_acc"]) for r in rows if "eval_implicit_acc" in r]
        if ev:
            ax2.plot([s for s, _ in ev], [a for _, a in ev], "o-", label="held-out")
        for (label, value), color in zip(
            (accuracy_lines or {}).items(), ("tab:red", "tab:green", "tab:purple"), strict=False
        ):
            ax2.axhline(value, color=color, lw=1.2, ls="-.", label=f"{label}: {value:.2f}")
        ax2.set_ylim(-0.02, 1.02)
        ax2.axhline(0.5, color="grey", lw=0.5, ls="--")
        ax2.set_xlabel("step")
        ax2.set_title("implicit reward accuracy")
        ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated bytes on ``device``, else this process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
