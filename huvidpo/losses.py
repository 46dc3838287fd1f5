"""Training losses: the masked diffusion error and the video Diffusion-DPO loss.

Both work per sample, so a batch of several clips or pairs is exact (the reference code averaged the
squared error over the whole batch, which mixes the terms of different pairs when the batch is > 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_diffusion_error(
    pred: torch.Tensor, target: torch.Tensor, skip_first_frame: bool = True
) -> torch.Tensor:
    """Per-sample mean squared error of a video prediction.

    ``pred`` and ``target``: ``(b, c, f, h, w)``. With ``skip_first_frame`` the mean runs over frames
    ``1..f-1`` only (frame 0 is the clean conditioning frame and carries no loss). Returns ``(b,)`` in
    float32, the mean over (c, frames, h, w) of each sample.
    """
    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(
            f"pred and target must both be (b, c, f, h, w); got {tuple(pred.shape)}, {tuple(target.shape)}"
        )
    if skip_first_frame:
        if pred.shape[2] < 2:
            raise ValueError("skip_first_frame needs clips of at least 2 frames")
        pred, target = pred[:, :, 1:], target[:, :, 1:]
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3, 4))


@dataclass(frozen=True)
class DPOStats:
    """Batch means of the DPO diagnostics (plain floats, for logging).

    ``implicit_acc``: fraction of pairs whose inside term is > 0 (the model prefers the chosen clip
    more than the reference does). ``reward_margin``: mean inside term, i.e. the implicit reward of the
    chosen clip minus that of the rejected one, ``r = -beta/2 * (e_model - e_ref)``.
    """

    loss: float
    dpo_loss: float
    implicit_acc: float
    reward_margin: float
    reward_chosen: float
    reward_rejected: float
    err_model_chosen: float
    err_model_rejected: float
    err_ref_chosen: float
    err_ref_rejected: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def dpo_loss(
    err_model_chosen: torch.Tensor,
    err_model_rejected: torch.Tensor,
    err_ref_chosen: torch.Tensor,
    err_ref_rejected: torch.Tensor,
    beta: float = 50.0,
    sft_weight: float = 0.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, DPOStats]:
    """Video Diffusion-DPO loss on per-sample errors (each ``(b,)``, e.g. from
    :func:`masked_diffusion_error`).

    ``inside = -0.5 * beta * ((e_model_w - e_model_l) - (e_ref_w - e_ref_l))`` and the per-pair loss is
    ``-log sigmoid(inside)`` (the Salesforce Diffusion-DPO convention with the factor 0.5; diffusers'
    script omits it, so its beta is twice ours for the same loss). ``sft_weight`` adds
    ``sft_weight * e_model_w`` per pair. ``weights`` ``(b,)`` scale each pair's loss (e.g. by score
    margin); the batch loss is ``mean(weights * per_pair_loss)``, so with batch 1 a weight of 0.5
    halves the gradient. Returns the scalar loss (differentiable) and :class:`DPOStats`.
    """
    shapes = {
        tuple(e.shape) for e in (err_model_chosen, err_model_rejected, err_ref_chosen, err_ref_rejected)
    }
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"all four errors must be (b,) tensors of one shape, got {sorted(shapes)}")
    ref_chosen, ref_rejected = err_ref_chosen.detach(), err_ref_rejected.detach()
    inside = dpo_inside_term(err_model_chosen, err_model_rejected, ref_chosen, ref_rejected, beta)
    per_pair = -F.logsigmoid(inside)
    dpo_part = per_pair
    if sft_weight:
        per_pair = per_pair + sft_weight * err_model_chosen
    if weights is None:
        weights = torch.ones_like(per_pair)
    elif weights.shape != per_pair.shape:
        raise ValueError(f"weights must have shape {tuple(per_pair.shape)}, got {tuple(weights.shape)}")
    w = weights.to(per_pair)
    loss = (w * per_pair).mean()
    with torch.no_grad():
        reward_chosen = -0.5 * beta * (err_model_chosen - ref_chosen)
        reward_rejected = -0.5 * beta * (err_model_rejected - ref_rejected)
        # One stack and one copy to the host: ten float() calls were ten blocking device syncs per step.
        parts = (
            loss.detach(),
            (w * dpo_part).mean(),
            (inside > 0).float().mean(),
            inside.mean(),
            reward_chosen.mean(),
            reward_rejected.mean(),
            err_model_chosen.mean(),
            err_model_rejected.mean(),
            ref_chosen.mean(),
            ref_rejected.mean(),
        )
        stats = DPOStats(*torch.stack([p.double() for p in parts]).tolist())
    return loss, stats


def dpo_inside_term(
    err_model_chosen: torch.Tensor,
    err_model_rejected: torch.Tensor,
    err_ref_chosen: torch.Tensor,
    err_ref_rejected: torch.Tensor,
    beta: float = 50.0,
) -> torch.Tensor:
    """The DPO logit per pair, ``-0.5*beta*((e_model_w - e_model_l) - (e_ref_w - e_ref_l))``, ``(b,)``."""
    return -0.5 * beta * ((err_model_chosen - err_model_rejected) - (err_ref_chosen - err_ref_rejected))
