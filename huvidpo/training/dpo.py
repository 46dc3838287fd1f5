"""Stage 2: Diffusion-DPO fine-tuning of LoRA adapters on human preference pairs.

Differences from the reference code, each on purpose (spec sections 4 and 8): the reference model is
the same UNet with its adapters disabled under ``no_grad`` (no second copy), chosen and rejected clips
go through one batched forward, errors are per sample over frames 1..F-1, ties are dropped by
default, gradient checkpointing is non-reentrant (so down-block LoRA trains), autocast and the
GradScaler come from accelerate, the LR schedule is stepped, latents and text embeddings are cached,
and checkpoints are LoRA-only safetensors.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from huvidpo.lora import lora_config, lora_parameters, save_lora
from huvidpo.losses import DPOStats, dpo_inside_term, dpo_loss, masked_diffusion_error
from huvidpo.models import VideoUNet, directory_digest, load_components
from huvidpo.models.layers import SparseCausalMode
from huvidpo.precision import compile_unet
from huvidpo.training.callbacks import TrainingCallback
from huvidpo.training.checkpoint import CheckpointError
from huvidpo.training.common import (
    ClipSource,
    ShouldStop,
    TrainResult,
    check_clip_frames,
    clip_views,
    enable_checkpointing,
    make_clip_source,
    noisy_latents,
    sample_timesteps,
    step_generator,
    use_checkpointing,
    weight_dtype,
)
from huvidpo.training.config import ConfigError, DPOConfig
from huvidpo.training.loop import train


@contextmanager
def adapters_disabled(unet: VideoUNet) -> Iterator[None]:
    """The base model: LoRA off inside the block, back on after (also on error)."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@dataclass
class PairBatch:
    """``chosen``/``rejected``: ``(b, 4, f, h, w)`` latents; ``text``: ``(b, seq, dim)``; ``weights``: ``(b,)``."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    text: torch.Tensor
    weights: torch.Tensor


def dpo_errors(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    base_unet: VideoUNet,
    scheduler: Any,
    batch: PairBatch,
    t: torch.Tensor,
    noise: torch.Tensor,
    autocast: Any = nullcontext,
    skip_first_frame: bool = True,
    rejected_draws: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward half of :func:`dpo_step` (``x_t`` and ``e`` of its formula), shared with
    :func:`evaluate_pairs`: per-pair errors ``(e_model^w, e_model^l, e_ref^w, e_ref^l)``, each ``(b,)``.
    The reference forward runs under ``no_grad``; the policy's keeps its graph unless the caller is
    under ``no_grad`` (held-out evaluation)."""
    clean = torch.cat([batch.chosen, batch.rejected])  # (2b, 4, f, h, w): one batched forward
    noise_l, t_l = rejected_draws if rejected_draws is not None else (noise, t)
    eps, tt, text = torch.cat([noise, noise_l]), torch.cat([t, t_l]), torch.cat([batch.text, batch.text])
    zt = noisy_latents(scheduler, clean, eps, tt)
    with torch.no_grad(), autocast():
        ctx = adapters_disabled(base_unet) if reference is base_unet else nullcontext()
        with ctx:
            ref_pred = reference(zt, tt, text)
    with autocast():
        pred = policy(zt, tt, text)
    model_w, model_l = masked_diffusion_error(pred, eps, skip_first_frame).chunk(2)
    ref_w, ref_l = masked_diffusion_error(ref_pred, eps, skip_first_frame).chunk(2)
    return model_w, model_l, ref_w, ref_l


def dpo_step(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    base_unet: VideoUNet,
    scheduler: Any,
    batch: PairBatch,
    t: torch.Tensor,
    noise: torch.Tensor,
    beta: float,
    sft_weight: float = 0.0,
    autocast: Any = nullcontext,
    skip_first_frame: bool = True,
    rejected_draws: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, DPOStats]:
    """One DPO loss evaluation (forward only; the caller does backward and the optimizer step).

        x_t^k = sqrt(a_t) x^k + sqrt(1 - a_t) eps,  x_t^k[:, :, 0] = x^k[:, :, 0]      k in {w, l}
        e_M^k = mean over (c, f = 1..F-1, h, w) of (eps_M(x_t^k, t, text) - eps)^2    M in {model, ref}
        L     = -log sigmoid(-beta/2 * ((e_model^w - e_model^l) - (e_ref^w - e_ref^l)))  [+ sft * e_model^w]

    ``t (b,)`` and ``noise (b, 4, f, h, w)`` are shared by the chosen and rejected clip of a pair
    (the spec's default, ``shared_noise_timestep``: the pair's difference in error then comes from the
    clips, not from the draws); ``rejected_draws`` = ``(noise, t)`` gives the rejected clips their own.
    ``policy`` is the (possibly DDP-wrapped) UNet with LoRA; ``reference`` is ``base_unet`` itself
    (its adapters are switched off for the no-grad forward) or a frozen copy.
    """
    errors = dpo_errors(policy, reference, base_unet, scheduler, batch, t, noise, autocast,
                        skip_first_frame, rejected_draws)  # fmt: skip
    return dpo_loss(*errors, beta=beta, sft_weight=sft_weight, weights=batch.weights)


# -- data --------------------------------------------------------------------------------------
@dataclass
class PreparedPairs:
    train: list[Any]
    heldout: list[Any]
    paths: dict[str, str]
    frame_counts: dict[str, int]
    report: dict[str, Any]


def prepare_pairs(cfg: DPOConfig) -> PreparedPairs:
    """Load the dataset, compile pairs and split off the held-out prompts (``holdout_fraction``)."""
    from huvidpo.data import compile_pairs, load_dataset

    ds = load_dataset(cfg.dataset)
    check_clip_frames(ds, cfg)
    report_src: Any
    if cfg.pairs_file:
        # Pairs compiled (and shown to the user) beforehand: train on exactly those.
        pairs, report_src = _read_pairs_for(ds, cfg.pairs_file), {"pairs_file": cfg.pairs_file}
    else:
        pairset = compile_pairs(
            ds,
            tie_policy=cfg.tie_policy,
            min_margin=cfg.min_margin,
            margin_weighting=cfg.margin_weighting,
            seed=cfg.seed,
        )
        pairs, report_src = list(pairset.pairs), getattr(pairset, "report", None)
    if not pairs:
        raise ConfigError(
            f"{cfg.dataset}: no preference pairs after compiling (tie_policy={cfg.tie_policy}, "
            f"min_margin={cfg.min_margin}); rate more clips or relax the filters"
        )
    prompts = sorted({p.prompt for p in pairs})
    heldout_prompts: set[str] = set()
    heldout_videos: set[str] = set()
    rng = random.Random(cfg.seed)
    given: list[Any] = []
    if cfg.heldout_file:
        if not cfg.pairs_file:
            raise ConfigError(
                "heldout_file needs pairs_file (the pairs compiled with it)", field="heldout_file"
            )
        # Split off by the compiler already: train on every pair of pairs_file, evaluate on these.
        given = _read_pairs_for(ds, cfg.heldout_file, field="heldout_file")
        heldout_prompts = {p.prompt for p in given}
    elif cfg.holdout_fraction > 0 and cfg.holdout_by == "prompt":
        n_hold = max(1, round(len(prompts) * cfg.holdout_fraction))
        if n_hold >= len(prompts):
            raise ConfigError(
                f"holdout_fraction {cfg.holdout_fraction} leaves no training prompts "
                f"({len(prompts)} prompts in the dataset)",
                field="holdout_fraction",
            )
        heldout_prompts = set(rng.sample(prompts, n_hold))
    elif cfg.holdout_fraction > 0:
        for prompt in prompts:
            # Systematic sampling along the score order keeps good and bad clips in both splits.
            vids = sorted(
                (v for v in ds.videos.values() if v.prompt == prompt),
                key=lambda v: (v.mean_score or 0.0, v.id),
            )
            n_hold = round(len(vids) * cfg.holdout_fraction)
            if n_hold:
                gap = len(vids) / n_hold
                offset = rng.random() * gap
                heldout_videos |= {vids[int(offset + k * gap)].id for k in range(n_hold)}

    def split(p: Any) -> str:
        if p.prompt in heldout_prompts:
            return "heldout"
        held = (p.chosen_id in heldout_videos) + (p.rejected_id in heldout_videos)
        return {0: "train", 1: "dropped", 2: "heldout"}[held]

    train = [p for p in pairs if split(p) == "train"]
    heldout = given or [p for p in pairs if split(p) == "heldout"]
    if not train:
        raise ConfigError(
            f"holdout_fraction {cfg.holdout_fraction} leaves no training pairs", field="holdout_fraction"
        )
    paths = {vid: str(v.path) for vid, v in ds.videos.items()}
    frames = {str(v.path): int(v.num_frames) for v in ds.videos.values() if v.num_frames}
    report = _report_dict(report_src)
    report.update(
        train_pairs=len(train),
        heldout_pairs=len(heldout),
        heldout_prompts=sorted(heldout_prompts),
        heldout_videos=sorted(heldout_videos),
    )
    return PreparedPairs(train, heldout, paths, frames, report)


def _read_pairs_for(ds: Any, path: str, field: str = "pairs_file") -> list[Any]:
    """The pairs of ``path`` (a ``pairs.jsonl``), each naming two videos of ``ds``."""
    from huvidpo.data import read_pairs

    pairs = read_pairs(path)
    for n, p in enumerate(pairs, start=1):
        missing = [v for v in (p.chosen_id, p.rejected_id) if v not in ds.videos]
        if missing:
            raise ConfigError(f"{field} line {n}: video {missing[0]!r} is not in the dataset", field=field)
    return pairs


def _report_dict(report: Any) -> dict[str, Any]:
    if report is None:
        return {}
    if isinstance(report, dict):
        return dict(report)
    if hasattr(report, "to_dict"):
        return dict(report.to_dict())
    if hasattr(report, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(report)
    return {"report": str(report)}


def pair_start_limit(pair: Any, paths: dict[str, str], source: ClipSource) -> int:
    """Largest start frame both clips of ``pair`` allow (they share one start)."""
    return min(source.max_start(paths[pair.chosen_id]), source.max_start(paths[pair.rejected_id]))


def load_pair_batch(
    pairs: Sequence[Any], paths: dict[str, str], source: ClipSource, views: Sequence[tuple[int, bool]]
) -> PairBatch:
    """Latents of a list of pairs; ``views[i]`` (start frame, flip) is shared by pair i's two clips
    (see :func:`huvidpo.training.common.clip_views`)."""
    chosen, rejected, texts, weights = [], [], [], []
    for p, (start, flip) in zip(pairs, views, strict=True):
        pw, pl = paths[p.chosen_id], paths[p.rejected_id]
        chosen.append(source.clip(pw, start, flip))
        rejected.append(source.clip(pl, start, flip))
        texts.append(source.text(p.prompt))
        weights.append(float(getattr(p, "weight", 1.0)))
    device = source.device
    return PairBatch(
        torch.stack(chosen), torch.stack(rejected), torch.stack(texts), torch.tensor(weights, device=device)
    )


@torch.no_grad()
def evaluate_pairs(
    unet: VideoUNet,
    pairs: Sequence[Any],
    paths: dict[str, str],
    source: ClipSource,
    scheduler: Any,
    cfg: DPOConfig,
    autocast: Any = nullcontext,
    pairs_per_forward: int = 4,
    accelerator: Any = None,
) -> dict[str, float]:
    """Implicit reward accuracy on ``pairs``: the DPO inside term (from :func:`dpo_errors`, as in
    training) averaged over ``eval_draws`` (t, noise) draws per pair, counted as correct when > 0
    and as half when exactly 0 (a tie: the reference itself, or an adapter still at its zero
    initialisation, scores 0.5, chance, and not 0).
    The draws are fixed (same for every call), with timesteps stratified over
    ``[timestep_min, timestep_max)``; clips are unflipped and start at 0; LoRA dropout is off. Returns ``eval_implicit_acc``, ``eval_reward_margin`` and ``eval_pairs``.

    With an ``accelerator`` of several processes (all must call this) each process evaluates every
    ``num_processes``-th chunk of ``pairs_per_forward`` pairs and the margins are gathered; the draws
    depend on the pair's index only, so the result is the same for any number of processes."""
    was_training = unet.training
    unet.eval()
    k = cfg.eval_draws
    per_pair = 2 * k * cfg.num_frames * cfg.height * cfg.width
    pairs_per_forward = max(1, min(pairs_per_forward, cfg.eval_batch_pixels // per_pair))
    span = (cfg.timestep_max - cfg.timestep_min) / k
    t_draws = torch.tensor([int(cfg.timestep_min + (j + 0.5) * span) for j in range(k)])
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    margins: list[tuple[int, float]] = []
    for lo in list(range(0, len(pairs), pairs_per_forward))[rank::world]:
        chunk = pairs[lo : lo + pairs_per_forward]
        zw = torch.stack([source.clip(paths[p.chosen_id], 0, False) for p in chunk]).repeat_interleave(k, 0)
        zl = torch.stack([source.clip(paths[p.rejected_id], 0, False) for p in chunk]).repeat_interleave(k, 0)
        text = torch.stack([source.text(p.prompt) for p in chunk]).repeat_interleave(k, 0)
        gens = [step_generator(cfg.seed, lo + i, stream=99) for i in range(len(chunk))]
        noise = torch.cat([torch.randn((k, *zw.shape[1:]), generator=g) for g in gens]).to(zw.device)
        t = t_draws.repeat(len(chunk)).to(zw.device)
        batch = PairBatch(zw, zl, text, torch.ones(len(zw), device=zw.device))
        errors = dpo_errors(unet, unet, unet, scheduler, batch, t, noise, autocast, cfg.loss_skip_first_frame)
        inside = dpo_inside_term(*errors, beta=cfg.beta).view(len(chunk), k).mean(dim=1)
        margins.extend((lo + i, float(x)) for i, x in enumerate(inside))
    unet.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        margins = list(gather_object(margins))
    values = [m for _, m in sorted(margins)]
    n = max(1, len(pairs))
    return {
        "eval_implicit_acc": (sum(m > 0 for m in values) + 0.5 * sum(m == 0 for m in values)) / n,
        "eval_reward_margin": sum(values) / n,
        "eval_pairs": float(len(pairs)),
    }


# -- the trainer -------------------------------------------------------------------------------
class DPOTask:
    """Diffusion-DPO for :func:`huvidpo.training.loop.train`: batches of preference pairs, the DPO
    loss against the reference, the LoRA weights as the trainable set (checkpointed as an adapter)
    and the held-out evaluation."""

    stage = "dpo"

    def __init__(self, cfg: DPOConfig, accelerator: Any) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        device = accelerator.device
        self.data = data = prepare_pairs(cfg)
        components = load_components(
            cfg.model,
            device=device,
            dtype=weight_dtype(cfg),
            sparse_causal=cast(SparseCausalMode, cfg.sparse_causal),
            unet_dir=cfg.unet_dir,
        )
        # The trainer passes the publication digest; only library use hashes the model directory.
        self.model_digest = cfg.base_model_digest or directory_digest(cfg.model)
        self.source = make_clip_source(
            components, cfg, device, f"{self.model_digest}:{components.vae.dtype}", data.frame_counts
        )
        self.noise_sched = components.ddpm()
        self.components = components
        self.unet = unet = components.unet
        unet.requires_grad_(False)
        # frozen_copy: the reference is the base UNet as loaded, copied before the adapter is added.
        frozen = copy.deepcopy(unet).eval() if cfg.reference == "frozen_copy" else None
        unet.add_adapter(
            lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets),
            adapter_name=cfg.adapter_name,
        )
        unet.set_adapter(cfg.adapter_name)
        self.params = list(lora_parameters(unet, cfg.adapter_name).values())
        if not self.params:
            raise ConfigError(
                f"lora_targets {cfg.lora_targets!r} matched no layer of the UNet", field="lora_targets"
            )
        for p in self.params:  # fp32 master weights for the trained parameters, whatever the base dtype
            p.data = p.data.float()
            p.requires_grad_(True)
        frozen_bytes = sum(p.numel() * p.element_size() for p in frozen.parameters()) if frozen else 0
        self.checkpointing = use_checkpointing(
            cfg, unet, device, 2 * cfg.batch_size, weight_dtype(cfg), extra_weights=frozen_bytes
        )
        if self.checkpointing[0]:
            enable_checkpointing(unet)
        compile_unet(unet, cfg.compile)  # after the adapter: the compiled graph includes it
        unet.train()
        self.reference: torch.nn.Module = frozen if frozen is not None else unet
        self.num_items = len(data.train)
        self.data_report = {**data.report, "gradient_checkpointing": self.checkpointing[1]}

    def loss(
        self, model: torch.nn.Module, items: list[int], mine: slice, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, data, device = self.cfg, self.data, self.accelerator.device
        pairs = [data.train[i] for i in items]
        views = clip_views(gen, [pair_start_limit(p, data.paths, self.source) for p in pairs], cfg.hflip_p)
        batch = load_pair_batch(pairs[mine], data.paths, self.source, views[mine])
        noise = torch.randn((len(items), *batch.chosen.shape[1:]), generator=gen)[mine].to(device)
        t = sample_timesteps(cfg, len(items), gen)[mine].to(device)
        own = None  # shared_noise_timestep off: the rejected clips' own draws, made after the shared ones
        if not cfg.shared_noise_timestep:
            own = (
                torch.randn((len(items), *batch.chosen.shape[1:]), generator=gen)[mine].to(device),
                sample_timesteps(cfg, len(items), gen)[mine].to(device),
            )
        loss, stats = dpo_step(
            model, self.reference, self.unet, self.noise_sched, batch, t, noise, cfg.beta, cfg.sft_weight,
            self.accelerator.autocast, cfg.loss_skip_first_frame, rejected_draws=own,
        )  # fmt: skip
        return loss, stats.as_dict()

    def sample_sources(self) -> list[tuple[str, str | None]]:
        """Held-out prompts first, then the training prompts (each sorted), with the path of the
        prompt's first video (by id) among its pairs."""
        data, videos = self.data, dict[str, set[str]]()
        for p in [*data.heldout, *data.train]:
            videos.setdefault(p.prompt, set()).update((p.chosen_id, p.rejected_id))
        held = sorted({p.prompt for p in data.heldout})
        order = held + sorted(set(videos) - set(held))
        return [(prompt, data.paths.get(min(videos[prompt]))) for prompt in order]

    def evaluate(self) -> dict[str, float]:
        if not self.data.heldout:
            return {}
        return evaluate_pairs(
            self.unet, self.data.heldout, self.data.paths, self.source, self.noise_sched, self.cfg,
            self.accelerator.autocast, accelerator=self.accelerator,
        )  # fmt: skip

    def write_weights(self, directory: Path) -> None:
        save_lora(self.unet, directory / "adapter", adapter=self.cfg.adapter_name)

    def load_weights(self, checkpoint: Path) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
        device = self.params[0].device
        result = set_peft_model_state_dict(
            self.unet, {k: v.to(device) for k, v in state.items()}, adapter_name=self.cfg.adapter_name
        )
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointError(f"{checkpoint}: adapter weights do not fit the UNet ({unexpected[:2]})")

    def save_final(self, out: Path, model: torch.nn.Module) -> Path:
        return save_lora(self.unet, out / "adapter", adapter=self.cfg.adapter_name)


def run_dpo(
    config: DPOConfig,
    callbacks: Sequence[TrainingCallback] = (),
    should_stop: ShouldStop | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train LoRA adapters with Diffusion-DPO; callable from Python (the control plane's trainer Job)
    and from ``huvidpo train dpo``.

    ``should_stop()`` is polled before every step; when it returns True a checkpoint is written and
    the run returns with ``stopped=True``. With ``resume`` the newest complete checkpoint under
    ``<output_dir>/checkpoints`` is restored (weights, optimizer, schedule, RNG) and training goes on.
    Output: ``<output_dir>/adapter/`` (final LoRA), ``checkpoints/``, ``metrics.jsonl``,
    ``metrics.png``, ``config.json``.
    """
    return train(config, DPOTask, callbacks, should_stop, resume)
