"""Documented bounds of the numeric training options (``huvidpo.training`` configs).

One table for every place that checks them: ``TrainConfig.validate`` (the CLI and the trainer) and the
control plane's request schema (so OpenAPI shows them). This module imports nothing heavy: the control
plane reads it without loading torch.

The bounds keep a request from asking for what no run can do (``max_steps: 1e23``, a 100000 px frame),
with room above what the method uses (16 frames of 320x512, tens of thousands of steps).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """``lo <= value <= hi`` (``lo < value`` when ``lo_open``)."""

    lo: float
    hi: float
    lo_open: bool = False

    def contains(self, value: float) -> bool:
        return (value > self.lo if self.lo_open else value >= self.lo) and value <= self.hi

    def describe(self) -> str:
        lo = f"greater than {_num(self.lo)}" if self.lo_open else f"at least {_num(self.lo)}"
        return f"{lo} and at most {_num(self.hi)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


MAX_STEPS = 10_000_000

BOUNDS: dict[str, Bound] = {
    # clips
    "num_frames": Bound(2, 256),
    "height": Bound(8, 2048),
    "width": Bound(8, 2048),
    "frame_stride": Bound(1, 64),
    # optimisation
    "lr": Bound(0, 1, lo_open=True),
    "lr_warmup_steps": Bound(0, MAX_STEPS),
    "batch_size": Bound(1, 1024),
    "epochs": Bound(1, 1_000_000),
    "max_steps": Bound(1, MAX_STEPS),
    "seed": Bound(0, 2**32 - 1),
    # checkpoints, evaluation, logging
    "checkpoint_every": Bound(0, MAX_STEPS),
    "keep_last": Bound(1, 1000),
    "eval_every": Bound(0, MAX_STEPS),
    "log_every": Bound(1, MAX_STEPS),
    # sample videos at each checkpoint
    "sample_count": Bound(0, 16),
    "sample_num_frames": Bound(2, 128),
    "sample_height": Bound(8, 2048),
    "sample_width": Bound(8, 2048),
    "sample_steps": Bound(1, 999),
    "sample_seed": Bound(0, 2**32 - 1),
    # DPO
    "beta": Bound(0, 100_000, lo_open=True),
    "lora_rank": Bound(1, 1024),
    "eval_draws": Bound(1, 1000),
}
"""Option name -> its bound. Options a stage does not have are ignored for that stage."""

__all__ = ["BOUNDS", "MAX_STEPS", "Bound"]
