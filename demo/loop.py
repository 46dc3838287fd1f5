"""The whole loop through the public interfaces, as one function the demo and the e2e tests share.

rated videos -> REST upload (an upload session) -> dataset version (digest) -> pairs -> DPO fine-tune
(a Job) -> checkpoint (manifest with lineage, sample videos) -> rollout -> gRPC Generate from a first
frame -> video that reports the checkpoint that made it.

Every call goes through the SDK (``huvidpo.client.Client``), and each step logs the ``huvidpo`` CLI
command that does the same (docs/client.md), so a reader can repeat the loop by hand.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from demo.metrics import metric_rows
from huvidpo.client import Client
from services.common.store import ObjectStore

Log = Callable[[str], None]


@dataclass
class LoopOptions:
    """Sizes of the loop; the defaults finish in a few minutes on 2 CPU cores with the tiny model."""

    dataset: str = "demo"
    base_model: str = "tiny"
    deployment: str = "default"
    # synthetic rated videos
    prompts: int = 2
    videos_per_prompt: int = 4
    video_frames: int = 8
    video_size: int = 64
    # DPO fine-tune (hyperparameters of huvidpo.training.DPOConfig)
    train_steps: int = 8
    checkpoint_every: int = 4
    train_frames: int = 4
    train_size: int = 64
    extra_hyperparameters: dict[str, Any] = field(default_factory=dict)
    # Whole prompts held out of the fine-tune (0: none); with a hold-out the loop measures the
    # held-out implicit reward accuracy of the reference and of the trained checkpoint.
    holdout_fraction: float = 0.0
    video_speed: float | None = None  # px/frame of the synthetic squares (None: size / 16)
    train_seed: int = 1
    # sample videos the trainer renders at each checkpoint (0: none); published with the checkpoint
    sample_count: int = 0
    sample_steps: int = 4
    # generation
    prompt: str = "a square slides to the right"
    gen_frames: int = 8
    gen_size: int = 64
    gen_steps: int = 10
    seed: int = 7
    timeout: float = 900.0

    def hyperparameters(self) -> dict[str, Any]:
        hp: dict[str, Any] = {
            "max_steps": self.train_steps,
            "checkpoint_every": self.checkpoint_every,
            "num_frames": self.train_frames,
            "height": self.train_size,
            "width": self.train_size,
            "batch_size": 1,
            "lora_rank": 4,
            "lora_alpha": 4.0,
            "lr": 1e-3,
            "beta": 50.0,
            "gradient_checkpointing": False,
            "seed": self.train_seed,
        }
        if self.holdout_fraction:
            hp["holdout_fraction"] = self.holdout_fraction  # by prompt; its seed is ``seed``
        if self.sample_count:
            # the data's prompts and first frames, at the training size: a few seconds per checkpoint
            hp.update(sample_count=self.sample_count, sample_steps=self.sample_steps)
        hp.update(self.extra_hyperparameters)
        return hp


# A fine-tune that visibly learns on 2 CPU cores in about a minute (tests/unit/test_training_learning.py
# found the recipe; the demo holds out whole prompts instead of videos). Smooth squares moving 1 px/frame
# beat flickering ones; unit-variance latents (LATENT_SCALE) and timesteps below 150, where the two
# kinds of clip differ more than the noise; LoRA on the attention and temporal layers without dropout.
LATENT_SCALE = 3.0  # huvidpo.models.tiny.UNIT_VARIANCE_LATENT_SCALE (this module loads no torch)
LEARNING_HYPERPARAMETERS: dict[str, Any] = {
    "batch_size": 4,
    "lr": 5e-3,
    "beta": 50.0,
    "lora_rank": 4,
    "lora_alpha": 4.0,
    "lora_dropout": 0.0,
    "lora_targets": r".*\.(attn1|attn2|attn_temp)\.(to_q|to_k|to_v|to_out\.0)|.*\.conv1d",
    "timestep_max": 150,
    "hflip_p": 0.5,
    "eval_draws": 4,
}


def learning_options(**overrides: Any) -> LoopOptions:
    """The demo's options: 4 prompts of 12 clips (6 smooth, 6 flickering), one prompt held out
    (36 held-out pairs, 108 training pairs), 100 DPO steps at the learning recipe, 2 sample videos
    (4 DDIM steps) rendered at the checkpoint."""
    values: dict[str, Any] = {
        "prompts": 4,
        "videos_per_prompt": 12,
        "video_frames": 4,
        "video_size": 64,
        "video_speed": 1.0,
        "holdout_fraction": 0.25,
        "train_steps": 100,
        "checkpoint_every": 100,
        "train_frames": 4,
        "train_size": 64,
        "extra_hyperparameters": dict(LEARNING_HYPERPARAMETERS),
        "sample_count": 2,
        "sample_steps": 4,
    }
    values.update(overrides)
    return LoopOptions(**values)


def heldout_accuracy(
    client: Client,
    store: ObjectStore,
    base_model: str,
    pairs_prefix: str,
    checkpoint_id: str,
    data_dir: Path,
    hyperparameters: dict[str, Any],
    work_dir: Path,
) -> dict[str, Any]:
    """Held-out implicit reward accuracy and mean reward margin (``huvidpo.training.dpo.evaluate_pairs``,
    fixed draws) of the reference (the base model) and of the checkpoint's adapter, on the pairs the
    compiler held out (``heldout.jsonl`` under ``pairs_prefix``). Runs here, on one CPU thread.

    The checkpoint comes through REST (``huvidpo checkpoints download``); the base model's files and
    the compiled pairs are read from the store, as no REST route serves them."""
    import torch

    from huvidpo.data import read_pairs
    from huvidpo.training import DPOConfig
    from huvidpo.training.common import make_accelerator
    from huvidpo.training.dpo import DPOTask
    from services.common.publish import fetch_published

    work = work_dir / "heldout-eval"
    model_dir, ckpt_dir = work / "model", work / "checkpoint"
    fetch_published(store, f"models/{base_model}", model_dir)
    client.checkpoints.download(checkpoint_id, ckpt_dir)
    for name in ("pairs.jsonl", "heldout.jsonl"):
        store.get_file(pairs_prefix + name, work / name)
    cfg = DPOConfig.from_mapping(
        {
            **hyperparameters,
            "model": str(model_dir),
            "dataset": str(data_dir),
            "output_dir": str(work / "out"),
            "pairs_file": str(work / "pairs.jsonl"),
            "heldout_file": str(work / "heldout.jsonl"),
            "device": "cpu",
            "plot": False,
        },
        source="the demo's held-out evaluation",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two busy cores: more threads wait on each other (see the learning test)
    try:
        task = DPOTask(cfg, make_accelerator(cfg))
        reference = task.evaluate()  # the adapter at its zero initialisation is the reference
        task.load_weights(ckpt_dir)
        trained = task.evaluate()
    finally:
        torch.set_num_threads(threads)
    heldout = read_pairs(work / "heldout.jsonl")

    def view(m: dict[str, float]) -> dict[str, float]:
        return {
            "implicit_acc": round(m["eval_implicit_acc"], 4),
            "reward_margin": round(m["eval_reward_margin"], 4),
        }

    return {
        "pairs": len(heldout),
        "prompts": sorted({p.prompt for p in heldout}),
        "reference": view(reference),
        "checkpoint": {"id": checkpoint_id, **view(trained)},
    }


def make_rated_videos(directory: Path, opts: LoopOptions) -> Path:
    """A small synthetic set of rated videos (MP4 + manifest.jsonl with per-rater scores)."""
    from huvidpo.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(
        directory,
        n_prompts=opts.prompts,
        videos_per_prompt=opts.videos_per_prompt,
        num_frames=opts.video_frames,
        size=opts.video_size,
        speed=opts.video_speed,
    )


def first_frame_png(video: Path, size: int) -> bytes:
    """Frame 0 of ``video`` resized to ``size`` x ``size``, PNG-encoded."""
    from PIL import Image

    from huvidpo.video_io import read_video

    frames, _fps = read_video(video)
    frame = np.asarray(frames)[0]
    buf = io.BytesIO()
    Image.fromarray(frame).resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def publish_base_model(store: ObjectStore, model_dir: Path, model_id: str) -> str:
    """Publish a local model directory as ``models/{id}/`` (manifest last); returns its digest.

    Idempotent: the same directory (same digest) already published is left alone."""
    from huvidpo.models import directory_digest
    from services.common.publish import is_published, publish_dir, read_manifest

    prefix = f"models/{model_id}"
    digest = directory_digest(model_dir)
    if not (is_published(store, prefix) and read_manifest(store, prefix).get("digest") == digest):
        publish_dir(store, model_dir, prefix, extra_manifest={"id": model_id, "digest": digest})
    return digest


def _describe(view: dict[str, Any]) -> str:
    p = view.get("progress") or {}
    parts = [f"{view['state']:<9}", f"step {p.get('step', 0)}/{p.get('total_steps') or '?'}"]
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("reward_accuracy") is not None:
        parts.append(f"reward acc {p['reward_accuracy']:.2f}")
    if p.get("eta_seconds") is not None and view["state"] == "running":
        parts.append(f"eta {p['eta_seconds']:.0f} s")
    if p.get("attempts", 0) > 1:
        parts.append(f"attempt {p['attempts']} (resumed from step {p.get('resumed_from_step')})")
    return "  ".join(parts)


def run_loop(
    client: Client,
    store: ObjectStore,
    work_dir: Path,
    out_dir: Path,
    opts: LoopOptions,
    log: Log = print,
    on_finetune: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the loop through the SDK ``client`` (REST and gRPC); writes ``video.mp4``,
    ``first_frame.png``, ``metrics.png`` (and ``sample.mp4`` when the trainer rendered samples) and
    returns the summary. ``store`` is read only by the held-out evaluation (see :func:`heldout_accuracy`).

    ``on_finetune(id)`` is called as soon as the fine-tune exists (so a caller can cancel it on Ctrl-C).
    Raises when a step fails or when the lineage does not hold together."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir.mkdir(parents=True, exist_ok=True)

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    def cli(command: str) -> None:
        log(f"  $ huvidpo {command}")

    # 1. rated videos -> REST (an upload session) -> an immutable dataset version named by its digest
    t = time.perf_counter()
    data_dir = make_rated_videos(work_dir / "rated-videos", opts)
    n_videos = len(list((data_dir / "videos").glob("*.mp4")))
    log(f"[data] {n_videos} synthetic rated videos in {data_dir}")
    cli(f"datasets create {opts.dataset} --exist-ok")
    client.datasets.create(opts.dataset, "synthetic rated videos of the demo", exist_ok=True)
    cli(f"datasets upload {opts.dataset} {data_dir}")
    version = client.datasets.upload(opts.dataset, data_dir)
    log(
        f"[data] uploaded through REST: dataset {opts.dataset!r} version {version['id'][:16]}… "
        f"({version.get('videos')} videos, {version.get('prompts')} prompts, {version.get('raters')} raters)"
    )
    # The fine-tune's pair options (seed; hold-out by prompt, seeded by it): it trains on these pairs.
    holdout: dict[str, Any] = {"holdout_fraction": opts.holdout_fraction} if opts.holdout_fraction else {}
    cli(
        f"pairs compile --dataset {opts.dataset} --version {version['id']} --seed {opts.train_seed}"
        + (f" --holdout-fraction {opts.holdout_fraction}" if holdout else "")
    )
    pairs = client.pairs.compile(opts.dataset, version["id"], seed=opts.train_seed, **holdout)
    log(f"[data] compiled {pairs['pairs']} preference pairs")
    if holdout:
        held = pairs["report"]["holdout"]
        log(
            f"[data] held out {pairs['heldout']} pairs of {len(held['prompts'])} prompt(s) for evaluation "
            f"(fraction {held['fraction']}, seed {held['seed']}): {', '.join(map(repr, held['prompts']))}"
        )
    t = lap("upload_and_pairs_seconds", t)

    # 2. DPO fine-tune as a Job, progress while it runs
    hp = opts.hyperparameters()
    hp_file = work_dir / "hyperparameters.json"
    hp_file.write_text(json.dumps(hp, indent=2) + "\n")
    cli(
        f"fine-tunes create --dataset {opts.dataset} --version {version['id']} "
        f"--base-model {opts.base_model} --hyperparameters-file {hp_file} --watch"
    )
    ft = client.fine_tunes.create(opts.dataset, version["id"], opts.base_model, hp)
    if on_finetune is not None:
        on_finetune(ft["id"])
    log(
        f"[fine-tune] {ft['id']} created ({ft['job'] and ft['job'].get('kind')} job {ft['job'] and ft['job'].get('name')})"
    )
    last = [""]

    def show(view: dict[str, Any]) -> None:
        line = _describe(view)
        if line != last[0]:
            log(f"[fine-tune] {line}")
            last[0] = line

    ft = client.fine_tunes.wait(ft["id"], show, timeout=opts.timeout)
    if ft["state"] != "succeeded":
        raise RuntimeError(f"fine-tune {ft['id']} {ft['state']}: {ft.get('reason')} {ft.get('message')}")
    if not ft["checkpoints"]:
        raise RuntimeError(f"fine-tune {ft['id']} succeeded without a checkpoint")
    t = lap("finetune_seconds", t)
    ckpt_id = ft["checkpoints"][-1]
    cli(f"checkpoints show {ckpt_id}")
    ckpt = client.checkpoints.get(ckpt_id)
    samples = []
    for sample in ckpt.get("samples") or []:
        samples.append({**sample, "url": client.url + sample["url"]})
        log(f"[fine-tune] sample video {sample['index']} ({sample['prompt']!r}): {client.url}{sample['url']}")
    sample_path = None
    if samples:
        sample_path = client.checkpoints.sample(ckpt_id, samples[0]["index"], out_dir / "sample.mp4")
        log(f"[fine-tune] sample video {samples[0]['index']} saved to {sample_path}")
    heldout = None
    if holdout:
        heldout = heldout_accuracy(
            client, store, opts.base_model, ft["pairs"]["prefix"], ckpt_id, data_dir, hp, work_dir
        )
        ref, got = heldout["reference"], heldout["checkpoint"]
        log(
            f"[eval] held-out implicit reward accuracy on {heldout['pairs']} pairs of unseen prompt(s): "
            f"reference {ref['implicit_acc']:.2f} -> {ckpt_id} {got['implicit_acc']:.2f} "
            f"(mean reward margin {ref['reward_margin']:.2f} -> {got['reward_margin']:.2f})"
        )
        t = lap("heldout_eval_seconds", t)
    cli(f"fine-tunes metrics {ft['id']}")
    metric_list = metric_rows(client.fine_tunes.metrics(ft["id"]))
    plot = None
    if metric_list:
        from huvidpo.training import plot_metrics

        lines = (
            {
                "held-out, reference": heldout["reference"]["implicit_acc"],
                "held-out, trained": heldout["checkpoint"]["implicit_acc"],
            }
            if heldout
            else None
        )
        # The library's plot takes plain rows (it knows nothing of the services): the metrics it has.
        plot = plot_metrics(metric_list, out_dir / "metrics.png", accuracy_lines=lines)
        log(
            f"[fine-tune] loss and reward accuracy plot: {plot} (metrics from GET /v1/fine-tunes/{{id}}/metrics)"
        )

    # 3. the newest checkpoint, rolled out through REST; wait until every replica serves it
    # The demo starts the deployment it serves on a fresh stack, so it asks for creation explicitly.
    cli(f"rollouts set {opts.deployment} {ckpt_id} --create --wait")
    rollout = client.rollouts.set(opts.deployment, ckpt_id, create=True)
    log(f"[rollout] {opts.deployment} -> {ckpt_id} (revision {rollout['revision']})")
    # (a replica that refuses the checkpoint never becomes ready: the wait ends with its reason)
    client.rollouts.wait(opts.deployment, rollout["revision"], timeout=min(opts.timeout, 300.0))
    client.wait_serving(ckpt_id, timeout=opts.timeout)  # and its gRPC ListModels says so
    log(f"[rollout] the inference service serves {ckpt_id}")
    t = lap("rollout_seconds", t)

    # 4. a video from a first frame, streamed progress, the checkpoint the service reports
    frame = first_frame_png(next(iter(sorted((data_dir / "videos").glob("*.mp4")))), opts.gen_size)
    (out_dir / "first_frame.png").write_bytes(frame)
    video = out_dir / "video.mp4"
    cli(
        f"generate --remote {client.grpc_address} --prompt {shlex.quote(opts.prompt)} "
        f"--first-frame {out_dir / 'first_frame.png'} --frames {opts.gen_frames} --height {opts.gen_size} "
        f"--width {opts.gen_size} --steps {opts.gen_steps} --guidance 7.5 --seed {opts.seed} --out {video}"
    )
    seen: set[tuple[int, int, int]] = set()

    def on_progress(p: Any) -> None:
        if (p.step, p.total, p.queue_position) in seen:
            return
        seen.add((p.step, p.total, p.queue_position))
        if p.queue_position > 0:
            log(f"[generate] queued (position {p.queue_position})")
        elif p.total:
            log(f"[generate] denoising step {p.step}/{p.total}")
        else:
            log("[generate] started")

    gen = client.generate(
        opts.prompt,
        first_frame=frame,
        out=video,
        frames=opts.gen_frames,
        height=opts.gen_size,
        width=opts.gen_size,
        steps=opts.gen_steps,
        guidance_scale=7.5,
        seed=opts.seed,
        fps=8,
        on_progress=on_progress,
        timeout=opts.timeout,
    )
    result, video_bytes = gen.result, gen.video
    lap("generate_seconds", t)
    log(f"[generate] {video} ({len(video_bytes)} bytes) from checkpoint {result.checkpoint_id}")

    lineage = ckpt.get("lineage") or {}
    summary: dict[str, Any] = {
        "dataset": {
            "name": opts.dataset,
            "version_digest": version["id"],
            "videos": version.get("videos"),
            "pairs": pairs["pairs"],
        },
        "finetune": {
            "id": ft["id"],
            "state": ft["state"],
            "job": ft.get("job"),
            "lineage": ft.get("lineage"),
            "hyperparameters": ft.get("hyperparameters"),
            "progress": ft.get("progress"),
            "mean_reward_accuracy": (
                round(sum(r.get("implicit_acc", 0.0) for r in metric_list) / len(metric_list), 3)
                if metric_list
                else None
            ),
            "first_loss": metric_list[0].get("loss") if metric_list else None,
            "last_loss": metric_list[-1].get("loss") if metric_list else None,
            "checkpoints": ft["checkpoints"],
        },
        "heldout": heldout,
        "checkpoint": {
            "id": ckpt_id,
            "lineage": lineage,
            "created_at": ckpt.get("created_at"),
            "samples": samples,
        },
        "rollout": {
            "deployment": opts.deployment,
            "revision": rollout["revision"],
            "current": rollout["current"],
        },
        "generation": {
            "checkpoint_id": result.checkpoint_id,
            "request_id": result.request_id,
            "seed": result.seed,
            "frames": result.frames,
            "height": result.height,
            "width": result.width,
            "fps": round(result.fps, 3),
            "video": str(video),
            "video_sha256": hashlib.sha256(video_bytes).hexdigest(),
            "timings": {
                "queue_seconds": round(result.timings.queue_seconds, 3),
                "denoise_seconds": round(result.timings.denoise_seconds, 3),
                "total_seconds": round(result.timings.total_seconds, 3),
            },
        },
        "artifacts": {
            "video": str(video),
            "first_frame": str(out_dir / "first_frame.png"),
            "plot": str(plot) if plot else None,
            "sample": str(sample_path) if sample_path else None,
        },
        "timings": {**timings, "loop_seconds": round(time.perf_counter() - t0, 2)},
        "options": asdict(opts),
    }
    check_lineage(summary)
    summary["lineage_chain"] = (
        f"dataset {version['id'][:12]} -> fine-tune {ft['id']} -> checkpoint {ckpt_id} "
        f"-> generation {result.request_id} (served by {result.checkpoint_id})"
    )
    return summary


def check_lineage(summary: dict[str, Any]) -> None:
    """The chain dataset digest -> fine-tune -> checkpoint -> generation must hold, on one base model
    digest; raise if not."""
    ds, ft, ck, gen = summary["dataset"], summary["finetune"], summary["checkpoint"], summary["generation"]
    problems = []
    if ck["lineage"].get("dataset_digest") != ds["version_digest"]:
        problems.append(
            f"checkpoint dataset_digest {ck['lineage'].get('dataset_digest')} != {ds['version_digest']}"
        )
    ft_base = (ft.get("lineage") or {}).get("base_model_digest")
    if ck["lineage"].get("base_model_digest") != ft_base:
        problems.append(f"checkpoint base_model_digest {ck['lineage'].get('base_model_digest')} != {ft_base}")
    if ck["lineage"].get("finetune_id") != ft["id"]:
        problems.append(f"checkpoint finetune_id {ck['lineage'].get('finetune_id')} != {ft['id']}")
    if ck["id"] not in ft["checkpoints"]:
        problems.append(f"checkpoint {ck['id']} is not one of the fine-tune's")
    if gen["checkpoint_id"] != ck["id"]:
        problems.append(f"the video was generated by {gen['checkpoint_id']}, not the rolled-out {ck['id']}")
    if problems:
        raise RuntimeError("lineage broken: " + "; ".join(problems))
