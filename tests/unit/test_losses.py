"""The masked diffusion error and the video DPO loss against direct computations of their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from huvidpo.losses import dpo_loss, masked_diffusion_error


def _direct_err(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Per-sample mean over (c, frames 1.., h, w), one element at a time."""
    out = []
    b, c, f, h, w = pred.shape
    for i in range(b):
        total, n = 0.0, 0
        for ci in range(c):
            for fi in range(1, f):
                for y in range(h):
                    for x in range(w):
                        total += (float(pred[i, ci, fi, y, x]) - float(target[i, ci, fi, y, x])) ** 2
                        n += 1
        out.append(total / n)
    return out


def test_masked_error_is_per_sample_and_ignores_frame_zero() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, 4, 3, 3, generator=g), torch.randn(3, 2, 4, 3, 3, generator=g)
    err = masked_diffusion_error(pred, target)
    assert err.shape == (3,)
    assert torch.allclose(err, torch.tensor(_direct_err(pred, target)), atol=1e-6)
    # Changing frame 0 changes nothing; changing frame 1 of sample 2 changes only sample 2.
    pred2 = pred.clone()
    pred2[:, :, 0] += 100.0
    assert torch.equal(masked_diffusion_error(pred2, target), err)
    pred2[2, :, 1] += 1.0
    err2 = masked_diffusion_error(pred2, target)
    assert torch.equal(err2[:2], err[:2]) and err2[2] != err[2]
    full = masked_diffusion_error(pred, target, skip_first_frame=False)
    assert torch.allclose(full, (pred - target).pow(2).mean(dim=(1, 2, 3, 4)))


def test_masked_error_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="b, c, f, h, w"):
        masked_diffusion_error(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="at least 2 frames"):
        masked_diffusion_error(torch.zeros(1, 4, 1, 2, 2), torch.zeros(1, 4, 1, 2, 2))


def _direct_dpo(
    ew: list[float],
    el: list[float],
    rw: list[float],
    rl: list[float],
    beta: float,
    weights: list[float],
    sft: float,
) -> float:
    total = 0.0
    for i in range(len(ew)):
        inside = -0.5 * beta * ((ew[i] - el[i]) - (rw[i] - rl[i]))
        loss_i = math.log1p(math.exp(-inside)) + sft * ew[i]  # -log sigmoid(x) = log(1 + e^-x)
        total += weights[i] * loss_i
    return total / len(ew)


@pytest.mark.parametrize("beta", [50.0, 5.0])
def test_dpo_loss_matches_formula_for_a_batch(beta: float) -> None:
    ew = [0.30, 0.52, 0.11, 0.90]
    el = [0.35, 0.40, 0.12, 0.70]
    rw = [0.31, 0.50, 0.10, 0.95]
    rl = [0.33, 0.45, 0.10, 0.71]
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    loss, stats = dpo_loss(t(ew), t(el), t(rw), t(rl), beta=beta)
    assert float(loss) == pytest.approx(_direct_dpo(ew, el, rw, rl, beta, [1.0] * 4, 0.0), rel=1e-12)
    insides = [-0.5 * beta * ((ew[i] - el[i]) - (rw[i] - rl[i])) for i in range(4)]
    assert stats.implicit_acc == pytest.approx(sum(x > 0 for x in insides) / 4)
    assert stats.reward_margin == pytest.approx(sum(insides) / 4)
    assert stats.err_model_chosen == pytest.approx(sum(ew) / 4)
    assert stats.err_ref_rejected == pytest.approx(sum(rl) / 4)
    assert stats.reward_chosen - stats.reward_rejected == pytest.approx(stats.reward_margin)


def test_dpo_loss_per_sample_weights_and_sft_term() -> None:
    ew, el, rw, rl = [0.2, 0.6], [0.3, 0.5], [0.25, 0.55], [0.25, 0.55]
    weights, sft = [0.25, 2.0], 0.7
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    loss, stats = dpo_loss(t(ew), t(el), t(rw), t(rl), beta=50.0, sft_weight=sft, weights=t(weights))
    assert float(loss) == pytest.approx(_direct_dpo(ew, el, rw, rl, 50.0, weights, sft), rel=1e-12)
    assert stats.dpo_loss == pytest.approx(_direct_dpo(ew, el, rw, rl, 50.0, weights, 0.0), rel=1e-12)
    # A batch of two is not the mean of errors first (the reference code's batch-global mean).
    pooled = _direct_dpo([sum(ew) / 2], [sum(el) / 2], [sum(rw) / 2], [sum(rl) / 2], 50.0, [1.0], 0.0)
    unweighted, _ = dpo_loss(t(ew), t(el), t(rw), t(rl), beta=50.0)
    assert float(unweighted) != pytest.approx(pooled, rel=1e-3)


def test_dpo_loss_is_ln2_when_model_equals_reference_and_gradient_sign() -> None:
    ew = torch.tensor([0.4, 0.8], requires_grad=True)
    el = torch.tensor([0.5, 0.3], requires_grad=True)
    loss, stats = dpo_loss(ew, el, ew.detach().clone(), el.detach().clone(), beta=50.0)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-7)
    assert stats.implicit_acc == 0.0 and stats.reward_margin == 0.0
    loss.backward()
    # Minimising the loss lowers the chosen error and raises the rejected one: d/d e_w = beta/4 / b.
    assert ew.grad is not None and el.grad is not None
    assert torch.allclose(ew.grad, torch.full((2,), 50.0 / 4 / 2))
    assert torch.allclose(el.grad, torch.full((2,), -50.0 / 4 / 2))


def test_dpo_loss_shape_errors() -> None:
    z = torch.zeros(2)
    with pytest.raises(ValueError, match=r"\(b,\)"):
        dpo_loss(z, z, z, torch.zeros(3))
    with pytest.raises(ValueError, match="weights"):
        dpo_loss(z, z, z, z, weights=torch.ones(3))


def test_dpo_stats_reach_the_host_in_one_copy_not_ten_scalar_reads() -> None:
    """Each ``float(tensor)`` is a blocking device sync on a GPU (``aten._local_scalar_dense``); the ten
    diagnostics are stacked and copied once, with the same values as the per-field means."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(3)
    errs = [torch.rand(5, generator=g, requires_grad=True) for _ in range(4)]
    with Record() as rec:
        loss, stats = dpo_loss(*errs, beta=20.0)
    assert not [op for op in rec.ops if "_local_scalar_dense" in op]
    inside = -0.5 * 20.0 * ((errs[0] - errs[1]) - (errs[2] - errs[3]))
    assert stats.loss == pytest.approx(float(loss))
    assert stats.implicit_acc == pytest.approx(float((inside > 0).float().mean()))
    assert stats.reward_margin == pytest.approx(float(inside.mean()), rel=1e-5)
    assert stats.err_ref_rejected == pytest.approx(float(errs[3].mean()))
