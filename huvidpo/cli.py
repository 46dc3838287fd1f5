"""``huvidpo`` command line: ``init-tiny``, ``generate`` (and the training commands).

Each subcommand lives in a ``_cmd_*`` function registered in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from huvidpo.pipeline import GenerationConfig

# Bad input (argparse's code for a usage error too). The services' ``ExitCode.BAD_INPUT`` has the same
# value (a test asserts it); the library does not import the services, so the number lives here too.
EXIT_BAD_INPUT = 2
# Modules of the `client` extra: without them the remote verbs are left out of the parser.
CLIENT_EXTRA = ("httpx", "grpc", "google", "google.protobuf")


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def add_generation_options(p: argparse.ArgumentParser, *, steps: int = 50) -> None:
    """Add the sampling options of :class:`huvidpo.pipeline.GenerationConfig` (all but the seed) to ``p``.

    Shared by ``huvidpo generate`` and the scripts that sample (``scripts/ab_samples.py``), so every
    sampler takes the same options with the same defaults (the dataclass's; a unit test keeps them
    equal). ``steps`` overrides the default number of denoising steps. Read back with
    :func:`generation_config`."""
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--frames", type=int, default=16, help="frames per video, frame 0 included")
    p.add_argument("--height", type=int, default=320, help="pixels, a multiple of 8")
    p.add_argument("--width", type=int, default=512, help="pixels, a multiple of 8")
    p.add_argument("--steps", type=int, default=steps, help="DDIM denoising steps")
    p.add_argument("--guidance", type=float, default=12.5, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--shared-noise-ratio", type=float, default=0.2)
    p.add_argument("--no-adain", action="store_true", help="switch latent AdaIN off")
    p.add_argument("--no-hist-match", action="store_true", help="switch histogram matching off")


def generation_config(args: argparse.Namespace, seed: int | None = None) -> GenerationConfig:
    """The :class:`GenerationConfig` that :func:`add_generation_options` options describe (validated).

    ``seed`` defaults to ``args.seed``."""
    from huvidpo.pipeline import GenerationConfig

    cfg = GenerationConfig(
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance_scale=args.guidance,
        eta=args.eta,
        negative_prompt=args.negative_prompt,
        seed=args.seed if seed is None else seed,
        shared_noise_ratio=args.shared_noise_ratio,
        latent_adain=not args.no_adain,
        hist_match=not args.no_hist_match,
    )
    cfg.validate()
    return cfg


def _cmd_init_tiny(args: argparse.Namespace) -> int:
    from huvidpo.models.tiny import write_tiny_model

    out = write_tiny_model(args.dir, seed=args.seed, latent_scale=args.latent_scale)
    print(f"wrote a tiny random HuViDPO model to {out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.remote:
        try:
            from huvidpo.client.cli import remote_generate
        except ModuleNotFoundError as exc:
            print(
                f'huvidpo generate: error: --remote needs the client extra ({exc.name} is missing): pip install "huvidpo[client]"',
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        return remote_generate(args)
    if args.model is None:
        print("huvidpo generate: error: --model is required (or --remote ADDRESS)", file=sys.stderr)
        return EXIT_BAD_INPUT
    import torch
    from tqdm import tqdm

    from huvidpo.lora import load_lora
    from huvidpo.pipeline import HuViDPOPipeline
    from huvidpo.precision import compile_unet, resolve_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    pipe = HuViDPOPipeline.from_pretrained(args.model, device=device, dtype=dtype)
    compile_unet(pipe.components.unet, args.compile)
    if args.lora:
        load_lora(pipe.components.unet, args.lora, adapter="cli", scale=args.lora_scale)
    cfg = generation_config(args)
    bar = tqdm(total=args.steps, desc="denoising", unit="step", disable=args.quiet)

    def progress(step: int, total: int) -> None:
        bar.total = total
        bar.n = step
        bar.refresh()

    result = pipe(args.prompt, args.first_frame, cfg, progress=progress)
    bar.close()
    out = result.save(args.out, fps=args.fps)
    print(
        f"wrote {out} ({cfg.num_frames} frames, {cfg.width}x{cfg.height}, seed {result.seed}, "
        f"{result.timings['total_s']:.2f} s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="huvidpo",
        description="HuViDPO: align text-to-video models with human preferences. Local commands (init-tiny, "
        "generate, pairs, train, eval) run the library on this machine; the others talk to a HuViDPO "
        "service (--url/HUVIDPO_URL, --token/HUVIDPO_TOKEN, --grpc-address/HUVIDPO_GRPC_ADDRESS; "
        "docs/client.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-tiny", help="write a tiny random model (diffusers layout) for tests and demos")
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--latent-scale",
        type=float,
        default=None,
        help="the VAE's scaling_factor (default SD's 0.18215); 3.0 gives the random VAE unit-variance "
        "latents, on which a DPO fine-tune visibly learns within minutes on a CPU (the demo's recipe)",
    )
    p.set_defaults(func=_cmd_init_tiny)

    p = sub.add_parser("generate", help="generate a video from a first frame (or from the prompt alone)")
    p.add_argument("--model", type=Path, help="model directory (diffusers layout); required without --remote")
    p.add_argument("--prompt", required=True)
    p.add_argument("--first-frame", type=Path, default=None, help="image for frame 0; omitted: text-to-image")
    p.add_argument("--lora", type=Path, default=None, help="LoRA adapter directory")
    p.add_argument("--lora-scale", type=float, default=1.0)
    add_generation_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="auto: bf16 on CUDA, fp32 on the CPU (the VAE is never fp16 unless asked)",
    )
    p.add_argument(
        "--compile",
        choices=("off", "inductor", "aot_eager", "eager"),
        default="off",
        help="torch.compile the UNet (inductor on a GPU; minutes of compiling, worth it for long videos)",
    )
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", required=True, type=Path, help="output .mp4 or .gif")
    remote = p.add_argument_group("remote generation (the inference service; needs the client extra)")
    remote.add_argument(
        "--remote", metavar="ADDRESS", default=None, help="generate on this gRPC address instead"
    )
    remote.add_argument("--token", default=None, help="bearer token (default: $HUVIDPO_TOKEN)")
    remote.add_argument(
        "--checkpoint", default=None, help="a checkpoint the service holds (default: its rollout)"
    )
    remote.add_argument("--retries", type=int, default=4, help="retries of UNAVAILABLE, with backoff")
    p.set_defaults(func=_cmd_generate)

    import importlib

    # `huvidpo pairs` (data), `huvidpo train` (training) and `huvidpo eval` register themselves; so do the
    # remote verbs (`huvidpo datasets ...`, docs/client.md), skipped without the client extra (httpx, grpcio).
    for module in (
        "huvidpo.data.cli",
        "huvidpo.training.cli",
        "huvidpo.evaluation.cli",
        "huvidpo.client.cli",
    ):
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module and not (module == "huvidpo.client.cli" and exc.name in CLIENT_EXTRA):
                raise
    return parser


# Commands that run the library here (and load diffusers); the others only talk to a service.
LOCAL_COMMANDS = ("init-tiny", "generate", "pairs", "train", "eval")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["pairs", "compile"]:  # the remote compile; `huvidpo pairs DIR` stays local
        try:
            from huvidpo.client.cli import rewrite_argv

            argv = rewrite_argv(argv)
        except ModuleNotFoundError:
            pass
    args = build_parser().parse_args(argv)
    if args.command in LOCAL_COMMANDS:
        quiet_libraries()  # imports diffusers (seconds): not for the remote verbs
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"huvidpo {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
