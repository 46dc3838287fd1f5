"""Data-parallel DPO training: 2 processes against 1 at equal per-process batch, and what the
gradient all-reduce costs per step.

Each variant is a real training run of the library's loop (``huvidpo.training.run_dpo``: the tiny
model, a synthetic dataset, LoRA, latents cached) in fresh processes, one CPU thread per process:

1 process   ``batch_size`` items per step.
2 processes torchrun (``--standalone --nproc-per-node 2``, gloo): the same ``batch_size`` per process,
            a global batch twice as large, gradients all-reduced every step (DDP).
2 processes, no_sync  the same, with the gradient all-reduce skipped (``Accelerator.no_sync``):
            what the step costs without communication.

Throughput is items per second from the median step time after the first steps (latent cache
warm-up) are dropped: ``ratio = 2 * t(1 process) / t(2 processes)``; the ideal is 2.0. The
per-step communication overhead is measured twice: ``t(2 processes) - t(2 processes, no_sync)`` (what
the step pays; on a tiny LoRA it is below the noise of a shared machine), and the median time of one
all-reduce of as many values as the gradients, alone in the same gloo group (DDP overlaps it with
the backward in buckets, so this bounds what it can add). On a machine with
2 cores shared with anything else (the test machine) the ratio's ceiling is about 1.6-1.9: the two
processes also contend for memory bandwidth and the launcher's own threads.

Usage: python bench/dpo_scaling.py [--quick] [--steps N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WARMUP = 3


def child(args: argparse.Namespace) -> None:
    """One rank of one variant: train, and (rank 0) write the step times to ``args.result``."""
    import torch

    from huvidpo.training import CallbackBase, DPOConfig, run_dpo

    torch.set_num_threads(1)
    if args.no_sync:
        from accelerate import Accelerator

        backward = Accelerator.backward

        def backward_no_sync(self: Any, loss: Any, **kwargs: Any) -> None:
            with self.no_sync(self._models[0]):
                backward(self, loss, **kwargs)

        Accelerator.backward = backward_no_sync  # type: ignore[method-assign]

    class Times(CallbackBase):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step(self, metrics: dict[str, Any]) -> None:
            self.seconds.append(float(metrics["step_seconds"]))

    times = Times()
    frames, size = (4, 32) if args.quick else (8, 64)
    cfg = DPOConfig(
        model=str(args.work / "model"), dataset=str(args.work / "data"), output_dir=str(args.out),
        cache_dir=str(args.work / "cache"), batch_size=args.batch, max_steps=args.steps, num_frames=frames,
        height=size, width=size, lora_rank=8, lora_alpha=8, lora_dropout=0.0, device="cpu", plot=False,
        seed=3,
    )  # fmt: skip
    result = run_dpo(cfg, [times])
    allreduce = _time_allreduce(cfg) if torch.distributed.is_initialized() else None
    if result.main_process:
        args.result.write_text(json.dumps({"seconds": times.seconds, "allreduce": allreduce}))


def _time_allreduce(cfg: Any, repeats: int = 20) -> dict[str, float]:
    """Median seconds of one all-reduce of as many float32 values as the run's trainable LoRA
    parameters (what DDP all-reduces every step, in one call instead of its buckets)."""
    import time

    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    adapter = load_file(str(Path(cfg.output_dir) / "adapter" / "adapter_model.safetensors"))
    numel = sum(t.numel() for t in adapter.values())
    grads = torch.ones(numel, dtype=torch.float32)
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(grads)
        seconds.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(seconds[2:]), "bytes": 4 * numel}


def run_variant(
    work: Path, name: str, procs: int, batch: int, steps: int, quick: bool, no_sync: bool
) -> tuple[float, dict[str, float] | None]:
    """Median step seconds (after the warm-up steps) of one variant run in fresh processes, and the
    time of one all-reduce of its gradients (2 processes)."""
    result = work / f"{name}.json"
    script = [__file__, "--child", "--work", str(work), "--out", str(work / f"out-{name}"), "--batch", str(batch),
              "--steps", str(steps), "--result", str(result), *(["--quick"] if quick else []),
              *(["--no-sync"] if no_sync else [])]  # fmt: skip
    if procs == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            *script,
        ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    record = json.loads(result.read_text())
    return statistics.median(record["seconds"][WARMUP:]), record["allreduce"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 frames 32x32, fewer steps")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1, help="items per process per step")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-sync", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch

    from huvidpo.data import make_synthetic_dataset
    from huvidpo.models.tiny import write_tiny_model

    steps = args.steps or (WARMUP + 8 if args.quick else WARMUP + 20)
    frames, size = (4, 32) if args.quick else (8, 64)
    with tempfile.TemporaryDirectory(prefix="dpo-scaling-") as tmp:
        work = Path(tmp)
        write_tiny_model(work / "model")
        make_synthetic_dataset(work / "data", n_prompts=4, videos_per_prompt=4, num_frames=frames, size=size)
        one, _ = run_variant(work, "one", 1, args.batch, steps, args.quick, False)
        two, allreduce = run_variant(work, "two", 2, args.batch, steps, args.quick, False)
        two_no_sync, _ = run_variant(work, "two-no-sync", 2, args.batch, steps, args.quick, True)
    assert allreduce is not None
    ratio = 2 * one / two
    overhead = two - two_no_sync
    cpus = os.cpu_count() or 1
    conditions = (
        f"tiny model, {frames} frames {size}x{size}, batch {args.batch} per process, {steps} steps "
        f"(median after {WARMUP}), 1 CPU thread per process, gloo, {cpus} CPUs, "
        f"{platform.machine()}, torch {torch.__version__}; ideal 2.0"
        + ("; on 2 shared cores the ceiling is about 1.6-1.9" if cpus <= 2 else "")
    )
    if args.json:
        print(json.dumps({
            "ratio_2proc_over_1proc_throughput": round(ratio, 3),
            "ideal_speedup": 2.0,
            "step_seconds_1proc": round(one, 4),
            "step_seconds_2proc": round(two, 4),
            "step_seconds_2proc_no_sync": round(two_no_sync, 4),
            "step_seconds_no_sync_delta": round(overhead, 4),
            "allreduce_seconds_per_step": round(allreduce["seconds"], 5),
            "allreduce_bytes_per_step": allreduce["bytes"],
            "conditions": conditions,
            "quick": args.quick,
        }))  # fmt: skip
        return
    print(f"DPO data-parallel scaling: {conditions}")
    print(f"step time: 1 process {one * 1000:.1f} ms, 2 processes {two * 1000:.1f} ms, "
          f"2 processes without all-reduce {two_no_sync * 1000:.1f} ms")  # fmt: skip
    print(f"throughput ratio 2 processes / 1 process : {ratio:.2f}   (ideal 2.00)")
    print(f"communication per step: one all-reduce of the gradients ({allreduce['bytes'] / 1e6:.2f} MB) "
          f"{allreduce['seconds'] * 1000:.2f} ms ({100 * allreduce['seconds'] / two:.1f}% of the step); "
          f"step time with minus without all-reduce {overhead * 1000:+.1f} ms (the difference of two "
          "medians: noise on a shared machine can exceed it)")  # fmt: skip


if __name__ == "__main__":
    main()
