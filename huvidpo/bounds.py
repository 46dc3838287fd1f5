"""The numeric bounds of the training options, by name (a view kept for the callers that read it).

The bounds are declared once, with each option's description, beside its field in
``huvidpo.training.config`` (see ``huvidpo.training.options``); this table is derived from there.
Like the configs, it imports nothing heavy: the control plane reads it without loading torch.
"""

from __future__ import annotations

from huvidpo.training.config import DPOConfig, Stage1Config
from huvidpo.training.options import MAX_STEPS, Bound, infos

BOUNDS: dict[str, Bound] = {
    name: i.bound
    for cls in (Stage1Config, DPOConfig)
    for name, i in infos(cls).items()
    if i.bound is not None
}
"""Option name -> its bound. Options a stage does not have are ignored for that stage."""

__all__ = ["BOUNDS", "MAX_STEPS", "Bound"]
