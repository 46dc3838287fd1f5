"""LoRA adapters on the video UNet (peft), stored as safetensors.

An adapter directory holds ``adapter_config.json`` (a peft ``LoraConfig``) and
``adapter_model.safetensors`` (the LoRA weights only, keys without the adapter name). Loading is
strict: a key the UNet does not have, or a LoRA weight the file lacks, is an error (the reference
code loaded with ``strict=False`` and silently ran the base model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from huvidpo.models.video_unet import VideoUNet, ensure_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_PROJ = r"(to_q|to_k|to_v|to_out\.0)"
LORA_TARGETS = {
    # attn1 (SparseCausal), attn2 (cross) and attn_temp in every transformer block (the reference).
    "all": rf".*\.(attn1|attn2|attn_temp)\.{_PROJ}",
    "spatial": rf".*\.(attn1|attn2)\.{_PROJ}",
    "temporal": rf".*\.attn_temp\.{_PROJ}",
    "self": rf".*\.(attn1|attn_temp)\.{_PROJ}",
}


def lora_config(
    rank: int = 16, alpha: float = 32, dropout: float = 0.1, targets: str | list[str] = "all"
) -> LoraConfig:
    """A peft LoRA config. ``targets`` is a preset name (all, spatial, temporal, self), a regex, or a
    list of module-name suffixes."""
    target: str | list[str] = (
        LORA_TARGETS.get(targets, targets) if isinstance(targets, str) else list(targets)
    )
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=target
    )


def lora_parameters(unet: VideoUNet, adapter: str | None = None) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters (of one adapter, or all) by name."""
    out = {}
    for name, p in unet.named_parameters():
        if "lora_" in name and (adapter is None or name.endswith(f".{adapter}.weight")):
            out[name] = p
    return out


def check_adapter_name(adapter: str) -> None:
    """Adapter names become attribute names inside peft's layers: refuse ones that cannot be."""
    if not adapter.replace("-", "_").isidentifier() or hasattr(torch.nn.Module, adapter):
        raise ValueError(
            f"adapter name {adapter!r} is not usable: use letters, digits, '_' or '-', "
            "not starting with a digit and not a torch.nn.Module attribute such as 'train'"
        )


def set_lora_scale(unet: VideoUNet, adapter: str, scale: float) -> None:
    """Multiply adapter ``adapter``'s update by ``scale`` (on top of alpha/r). 0 gives the base model."""
    for module in unet.modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            module.set_scale(adapter, scale)


def save_lora(unet: VideoUNet, directory: str | os.PathLike[str], adapter: str = "default") -> Path:
    """Write one adapter's config and weights (fp32 safetensors); returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config[adapter]
    state = get_peft_model_state_dict(unet, adapter_name=adapter)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(state, str(d / ADAPTER_WEIGHTS), metadata={"format": "pt", "huvidpo": "lora"})
    cfg = config.to_dict()
    cfg["target_modules"] = (
        sorted(cfg["target_modules"])
        if isinstance(cfg["target_modules"], set | list)
        else cfg["target_modules"]
    )
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
    return d


def read_lora_config(directory: str | os.PathLike[str]) -> LoraConfig:
    d = Path(directory)
    if not (d / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{d} is not a LoRA adapter directory: no {ADAPTER_CONFIG}")
    ensure_safetensors(d)
    raw = json.loads((d / ADAPTER_CONFIG).read_text())
    known = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in raw.items() if k in known and k not in ("peft_type", "task_type")})


def load_lora(
    unet: VideoUNet, directory: str | os.PathLike[str], adapter: str = "default", scale: float = 1.0
) -> None:
    """Add adapter ``adapter`` from ``directory`` to ``unet`` (strictly), scaled by ``scale``, and make it
    the active adapter."""
    d = Path(directory)
    config = read_lora_config(d)
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{d} has no {ADAPTER_WEIGHTS}")
    state = load_file(str(weights))
    check_adapter_name(adapter)
    if adapter in getattr(unet, "peft_config", {}):
        raise ValueError(f"an adapter named {adapter!r} is already loaded")
    was_training = unet.training
    unet.add_adapter(config, adapter_name=adapter)
    # peft creates the new LoRA modules in training mode (dropout on): follow the UNet's own mode.
    unet.train(was_training)
    expected = set(get_peft_model_state_dict(unet, adapter_name=adapter))
    unexpected_in_file = set(state) - expected
    lacking = expected - set(state)
    if unexpected_in_file or lacking:
        unet.delete_adapters(adapter)
        raise ValueError(
            f"LoRA weights in {weights} do not fit this UNet: {len(unexpected_in_file)} unknown keys "
            f"(e.g. {sorted(unexpected_in_file)[:2]}), {len(lacking)} missing (e.g. {sorted(lacking)[:2]})"
        )
    device = next(unet.parameters()).device
    set_peft_model_state_dict(unet, {k: v.to(device) for k, v in state.items()}, adapter_name=adapter)
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    set_lora_scale(unet, adapter, scale)
    unet.set_adapter(adapter)
