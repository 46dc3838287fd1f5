"""``python -m demo`` (``make demo``): the whole HuViDPO loop end to end on the embedded default.

Writes the tiny model, starts the control plane (local executor), registers the model through REST
(``huvidpo models register``), starts the inference service on 127.0.0.1, makes rated videos,
uploads them through REST, compiles pairs, runs a DPO fine-tune as a local Job (sample videos at its
checkpoint), rolls the checkpoint out, asks the gRPC service for a video from a first frame, and
writes ``video.mp4``, ``sample.mp4``, ``metrics.png`` and ``summary.json`` (with the lineage) into
``--out``. Every call goes through the SDK (``huvidpo.client.Client``) or the ``huvidpo`` CLI, and
each step prints the CLI command that does the same.

Other targets, same flow:

- ``--store s3``: the store named by ``HUVIDPO_STORE_*`` (MinIO, Ceph radosgw, AWS S3) instead of
  ``OUT/store``; the services started here and the trainers they start all use it.
- ``--executor kubernetes``: the control plane started here submits trainer Jobs to the cluster of the
  current kube context (``HUVIDPO_CONTROLPLANE_*`` for namespace, image, ...).
- ``--controlplane-url URL --inference-address HOST:PORT`` (with ``HUVIDPO_DEMO_TOKEN``): start nothing
  and drive services already deployed (``kubectl apply -k deploy/``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from demo.stack import REPO, Stack, local_store_env


def _store_env(args: argparse.Namespace, out: Path) -> dict[str, str]:
    if args.store == "local":
        return local_store_env(out / "store")
    env = {k: v for k, v in os.environ.items() if k.startswith("HUVIDPO_STORE_")}
    env["HUVIDPO_STORE_BACKEND"] = "s3"
    if "HUVIDPO_STORE_ENDPOINT" not in env:
        raise SystemExit("--store s3 needs HUVIDPO_STORE_ENDPOINT, _ACCESS_KEY, _SECRET_KEY (and _BUCKET)")
    return env


def _store(env: dict[str, str]):  # type: ignore[no-untyped-def]
    from services.common.settings import StoreSettings
    from services.common.store import make_store

    prefix = "HUVIDPO_STORE_"
    values: dict[str, Any] = {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}
    return make_store(StoreSettings(**values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    parser.add_argument("--executor", choices=("local", "kubernetes"), default="local")
    parser.add_argument("--controlplane-url", help="use a running control plane instead of starting one")
    parser.add_argument("--inference-address", help="use a running inference service (host:port)")
    parser.add_argument("--steps", type=int, default=100, help="DPO optimizer steps")
    parser.add_argument(
        "--train-seed", type=int, default=1, help="the fine-tune's seed (it also picks the held-out prompt)"
    )
    parser.add_argument("--gen-steps", type=int, default=10, help="denoising steps of the generation")
    parser.add_argument("--keep", action="store_true", help="keep the store of an earlier run in --out")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    out: Path = args.out.resolve()
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - t0:6.1f}s  {msg}", flush=True)

    # SIGTERM behaves as Ctrl-C: the finally blocks below stop what was started.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    # 1. the tiny model, written by the CLI (the same command a user runs)
    model_dir = work / "tiny-model"
    from demo.loop import LATENT_SCALE, learning_options, run_loop
    from huvidpo.client import Client

    init = ["init-tiny", str(model_dir), "--latent-scale", str(LATENT_SCALE)]
    subprocess.run([*_huvidpo(), *init], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    log(
        f"[setup] tiny model written to {model_dir} (VAE scaling factor {LATENT_SCALE}: unit-variance latents)"
    )
    log(f"  $ huvidpo {' '.join(init)}")
    store_env = _store_env(args, out)
    store = _store(store_env)  # read by the held-out evaluation only (no REST route serves pairs)
    opts = learning_options(
        train_steps=args.steps,
        checkpoint_every=args.steps,
        gen_steps=args.gen_steps,
        train_seed=args.train_seed,
    )

    stack: Stack | None = None
    client: Client | None = None
    finetune_id: list[str] = []
    ok = False
    try:
        if args.controlplane_url:
            if not args.inference_address:
                raise SystemExit("--controlplane-url needs --inference-address too")
            cp_url, grpc_addr, token = (
                args.controlplane_url,
                args.inference_address,
                os.environ.get("HUVIDPO_DEMO_TOKEN"),
            )
            log(f"[setup] using the running services: REST {cp_url}, gRPC {grpc_addr}")
        else:
            extra = {"HUVIDPO_CONTROLPLANE_EXECUTOR": args.executor}
            extra.update({k: v for k, v in os.environ.items() if k.startswith("HUVIDPO_CONTROLPLANE_")})
            extra["HUVIDPO_CONTROLPLANE_EXECUTOR"] = args.executor
            stack = Stack(work, store_env, extra, base_model=f"models/{opts.base_model}")
            cp_proc = stack.start_controlplane()
            where = store_env.get("HUVIDPO_STORE_ROOT") or store_env.get("HUVIDPO_STORE_ENDPOINT")
            log(
                f"[setup] control plane on {stack.controlplane_url} ({args.executor} executor, pid {cp_proc.pid}, "
                f"{args.store} store {where})"
            )
            cp_url, grpc_addr, token = stack.controlplane_url, stack.grpc_address, stack.token
        log(
            f"[setup] to repeat a step by hand: export HUVIDPO_URL={cp_url} HUVIDPO_GRPC_ADDRESS={grpc_addr} "
            "HUVIDPO_TOKEN=<the demo's token> (docs/client.md)"
        )

        # 2. the base model, registered through POST /v1/models by the CLI (the layout is verified)
        log(f"  $ huvidpo models register {model_dir} --name {opts.base_model}")
        model = register_model(model_dir, opts.base_model, cp_url, token)
        log(
            f"[setup] base model registered as {model['prefix']} ({model['digest'][:19]}…, "
            f"{model['files']} files, {model['unet']} UNet)"
        )
        if stack is not None:
            inf_proc = stack.start_inference(
                {"default_frames": "8", "default_height": "64", "default_width": "64", "default_steps": "10"}
            )
            log(
                f"[setup] inference gRPC on {stack.grpc_address}, metrics {stack.inference_metrics_url} "
                f"(pid {inf_proc.pid}, serving the base model)"
            )
        client = Client(cp_url, token, grpc_addr, timeout=120.0)
        summary = run_loop(client, store, work, out, opts, log, on_finetune=finetune_id.append)
        summary["base_model"] = {"id": opts.base_model, "digest": model["digest"]}
        summary["targets"] = {"store": args.store, "executor": args.executor}
        summary["timings"]["demo_seconds"] = round(time.perf_counter() - t0, 2)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        ok = True
        print_summary(summary, out)
        return 0
    except KeyboardInterrupt:
        log("[stop] interrupted")
        return 130
    finally:
        if not ok and client is not None and finetune_id:
            try:  # a trainer runs in its own session: stop it with the API, not with our signal
                if client.fine_tunes.get(finetune_id[0])["state"] not in ("succeeded", "failed", "cancelled"):
                    client.fine_tunes.cancel(finetune_id[0])
                    log(f"[stop] cancelled fine-tune {finetune_id[0]}")
            except Exception as exc:
                log(f"[stop] could not cancel fine-tune {finetune_id[0]}: {exc}")
        if client is not None:
            client.close()
        if stack is not None:
            codes = stack.stop()
            log(f"[stop] services stopped (exit codes {codes}); logs in {work / 'logs'}")


def _huvidpo() -> list[str]:
    """The ``huvidpo`` command of this environment."""
    exe = Path(sys.executable).with_name("huvidpo")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "huvidpo"]


def register_model(model_dir: Path, model_id: str, url: str, token: str | None) -> dict[str, Any]:
    """``huvidpo models register DIR --name ID -o json`` (POST /v1/models); returns the model. The
    same files registered again answer the existing model, so ``--keep`` reruns pass."""
    env = {**os.environ, "HUVIDPO_URL": url}
    env.pop("HUVIDPO_TOKEN", None)
    if token:
        env["HUVIDPO_TOKEN"] = token  # through the environment: never on a command line
    proc = subprocess.run(
        [*_huvidpo(), "models", "register", str(model_dir), "--name", model_id, "-o", "json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"huvidpo models register failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return dict(json.loads(proc.stdout))


def print_summary(summary: dict[str, Any], out: Path) -> None:
    ft, gen = summary["finetune"], summary["generation"]
    p = ft["progress"] or {}
    print()
    print("HuViDPO demo: the whole loop on the embedded default")
    print(f"  lineage     {summary['lineage_chain']}")
    print(f"  dataset     {summary['dataset']['name']} @ {summary['dataset']['version_digest']}")
    print(f"              {summary['dataset']['videos']} videos, {summary['dataset']['pairs']} pairs")
    print(
        f"  fine-tune   {ft['id']}: {ft['state']} after {p.get('step')} steps, loss {ft.get('first_loss'):.4f} -> {ft.get('last_loss'):.4f}, "
        f"implicit reward accuracy {ft.get('mean_reward_accuracy')} (mean over steps)"
    )
    held = summary.get("heldout")
    if held:
        ref, got = held["reference"], held["checkpoint"]
        print(
            f"  held out    {held['pairs']} pairs of {', '.join(map(repr, held['prompts']))} (never trained on): "
            f"implicit reward accuracy reference {ref['implicit_acc']:.2f} -> trained {got['implicit_acc']:.2f}, "
            f"mean reward margin {ref['reward_margin']:.2f} -> {got['reward_margin']:.2f}"
        )
    print(
        f"  checkpoint  {summary['checkpoint']['id']} (dataset_digest {summary['checkpoint']['lineage'].get('dataset_digest', '')[:12]}…)"
    )
    print(f"  rollout     {summary['rollout']['deployment']} revision {summary['rollout']['revision']}")
    print(
        f"  generation  {gen['frames']}x{gen['height']}x{gen['width']} seed {gen['seed']} by {gen['checkpoint_id']}"
    )
    samples = summary["checkpoint"].get("samples") or []
    if samples:
        print(f"  samples     {len(samples)} at the checkpoint: {', '.join(x['url'] for x in samples)}")
    files = [out / "video.mp4", *([out / "sample.mp4"] if samples else []), out / "metrics.png"]
    print(f"  files       {', '.join(map(str, files))}, {out / 'summary.json'}")
    print(
        f"  time        {summary['timings']['demo_seconds']:.1f} s ({', '.join(f'{k} {v}' for k, v in summary['timings'].items() if k != 'demo_seconds')})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
