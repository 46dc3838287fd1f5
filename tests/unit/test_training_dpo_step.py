"""The DPO step on the tiny video UNet: ln 2 at init, one batched policy forward plus one adapter-off
reference forward, and a gradient on every LoRA weight with (non-reentrant) gradient checkpointing."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint

from huvidpo.lora import lora_config, lora_parameters
from huvidpo.models.tiny import tiny_components
from huvidpo.training.common import enable_checkpointing
from huvidpo.training.dpo import PairBatch, dpo_step


def _setup(perturb_b: bool) -> tuple:
    comps = tiny_components(seed=0)
    unet = comps.unet
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank=4, alpha=4, dropout=0.1), adapter_name="dpo")
    params = lora_parameters(unet, "dpo")
    for name, p in params.items():
        p.requires_grad_(True)
        if perturb_b and "lora_B" in name:
            with torch.no_grad():
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    unet.train()
    g = torch.Generator().manual_seed(3)
    b = 2
    batch = PairBatch(
        chosen=torch.randn(b, 4, 4, 8, 8, generator=g),
        rejected=torch.randn(b, 4, 4, 8, 8, generator=g),
        text=torch.randn(b, 16, 32, generator=g),
        weights=torch.ones(b),
    )
    t = torch.tensor([100, 700])
    noise = torch.randn(b, 4, 4, 8, 8, generator=g)
    return comps, unet, params, batch, t, noise


def test_loss_is_ln2_at_init_with_one_batched_forward_each() -> None:
    comps, unet, _params, batch, t, noise = _setup(perturb_b=False)
    calls: list[tuple[int, bool]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args[0].shape[0], bool(module.unet.down_blocks[0].attentions[0].transformer_blocks[0]
                                              .attn1.to_q._disable_adapters)))  # fmt: skip

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    loss, stats = dpo_step(unet, unet, unet, comps.ddpm(), batch, t, noise, beta=50.0)
    handle.remove()
    # LoRA B starts at zero, so the policy equals the reference exactly and L = ln 2.
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
    assert (
        stats.err_model_chosen == stats.err_ref_chosen and stats.err_model_rejected == stats.err_ref_rejected
    )
    # Two UNet calls, each on chosen+rejected together (batch 2b): the reference with adapters off.
    assert calls == [(4, True), (4, False)]
    layer = unet.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert not layer._disable_adapters  # switched back on after the reference forward


def _no_grad_names(params: dict[str, torch.nn.Parameter]) -> list[str]:
    return [n for n, p in params.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]


def test_every_lora_weight_gets_a_gradient_with_checkpointing() -> None:
    comps, unet, params, batch, t, noise = _setup(perturb_b=True)
    enable_checkpointing(unet)
    assert unet.is_gradient_checkpointing
    loss, _ = dpo_step(unet, unet, unet, comps.ddpm(), batch, t, noise, beta=50.0)
    loss.backward()
    assert len(params) > 0
    assert any("down_blocks" in n for n in params)
    assert _no_grad_names(params) == []


def test_reentrant_checkpointing_starves_down_block_lora() -> None:
    """The reference code's defect, reproduced: reentrant checkpoints of blocks whose inputs need no
    grad build no graph, so (at least) the down-block LoRA never trains."""
    comps, unet, params, batch, t, noise = _setup(perturb_b=True)
    unet.enable_gradient_checkpointing(
        gradient_checkpointing_func=lambda m, *a: torch_checkpoint.checkpoint(m, *a, use_reentrant=True)
    )
    loss, _ = dpo_step(unet, unet, unet, comps.ddpm(), batch, t, noise, beta=50.0)
    if loss.requires_grad:
        loss.backward()
    starved = _no_grad_names(params)
    down = [n for n in params if "down_blocks" in n]
    assert down and set(down) <= set(starved)


def test_frozen_copy_reference_gives_the_same_loss() -> None:
    import copy

    comps, unet, _params, batch, t, noise = _setup(perturb_b=True)
    unet.eval()  # no LoRA dropout, so the two calls are comparable
    loss_a, stats_a = dpo_step(unet, unet, unet, comps.ddpm(), batch, t, noise, beta=50.0)
    frozen = copy.deepcopy(unet)
    frozen.disable_adapters()
    loss_b, stats_b = dpo_step(unet, frozen, unet, comps.ddpm(), batch, t, noise, beta=50.0)
    assert float(loss_a.detach()) == pytest.approx(float(loss_b.detach()), abs=1e-6)
    assert stats_a.err_ref_chosen == pytest.approx(stats_b.err_ref_chosen, abs=1e-7)
    # The perturbed adapters make the policy differ from the reference, so the comparison is not
    # between two identical models.
    assert abs(stats_a.err_model_chosen - stats_a.err_ref_chosen) > 1e-4
    assert abs(stats_a.err_model_rejected - stats_a.err_ref_rejected) > 1e-4
