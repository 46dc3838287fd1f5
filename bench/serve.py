"""Inference service throughput: 8 concurrent Generate calls with dynamic batching on versus off.

Two real gRPC servers on 127.0.0.1 in this process, loaded with the same model: ``batched``
(max_batch = concurrency) and ``unbatched`` (max_batch = 1, so every request is its own UNet call).
Each round sends ``--concurrency`` requests of the same shape at once from as many client threads and
times until the last result arrives; rounds alternate between the two servers after one warm-up
round each. Throughput = requests / wall seconds (median over rounds); the ratio is batched over
unbatched. Target: >= 1.5x.

Usage: python bench/serve.py [--quick] [--rounds N] [--concurrency 8] [--frames 8] [--size 64]
                             [--steps 10] [--device cpu|cuda] [--model-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from huvidpo.models.tiny import write_tiny_model
from services.common.settings import InferenceSettings
from services.common.store import LocalStore
from services.inference.gen import inference_pb2 as pb
from services.inference.testing import ServerThread, image_bytes


def one_round(srv: ServerThread, n: int, args: argparse.Namespace, seed0: int) -> tuple[float, list[int]]:
    image = image_bytes(args.size, args.size, seed=1)
    with srv.channel() as channel:
        stub = srv.stub(channel)

        def call(i: int) -> int:
            req = pb.GenerateRequest(
                prompt="a red ball rolling",
                first_frame_image=image,
                frames=args.frames,
                height=args.size,
                width=args.size,
                steps=args.steps,
                seed=seed0 + i,
            )
            batch = 0
            for event in stub.Generate(req, timeout=600):
                if event.HasField("result"):
                    batch = event.result.batch_size
            return batch

        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            batches = list(pool.map(call, range(n)))
        return time.perf_counter() - t0, batches


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 timed rounds per mode, 4 steps")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--model-dir", type=Path, default=None, help="a model directory (default: the tiny model)"
    )
    ap.add_argument("--json", action="store_true", help="also print one JSON line with the results")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 4
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_dir = args.model_dir or write_tiny_model(tmp / "model")
    n = args.concurrency
    servers: dict[str, ServerThread] = {}
    for mode, max_batch in (("unbatched", 1), ("batched", n)):
        s = InferenceSettings(
            port=0,
            metrics_port=0,
            base_model=str(model_dir),
            cache_dir=tmp / f"cache-{mode}",
            device=args.device,
            max_batch=max_batch,
            max_queue=n,
            batch_wait_ms=50,
            max_frames=max(32, args.frames),
            max_steps=max(100, args.steps),
            dev_mode=True,  # a loopback benchmark: no token
        )
        servers[mode] = ServerThread(s, LocalStore(tmp / "store")).start()
    times: dict[str, list[float]] = {m: [] for m in servers}
    sizes: dict[str, list[int]] = {m: [] for m in servers}
    try:
        for srv in servers.values():  # warm-up
            one_round(srv, n, args, 0)
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for mode in order:
                wall, batches = one_round(servers[mode], n, args, 1000 * (r + 1))
                times[mode].append(wall)
                sizes[mode].extend(batches)
                print(
                    f"round {r + 1} {mode:9s}: {n} requests in {wall:.2f}s, batch sizes {sorted(set(batches))}"
                )
    finally:
        for srv in servers.values():
            srv.stop()
    thr = {m: n / statistics.median(t) for m, t in times.items()}
    ratio = thr["batched"] / thr["unbatched"]
    conditions = (
        f"device={args.device} torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} "
        f"model={'tiny' if args.model_dir is None else args.model_dir} concurrency={n} "
        f"frames={args.frames} size={args.size} steps={args.steps} rounds={args.rounds} "
        f"python={platform.python_version()} torch={torch.__version__}"
    )
    if args.device.startswith("cuda"):
        conditions += f" gpu={torch.cuda.get_device_name(0)}"
    print(f"conditions: {conditions}")
    for m in ("unbatched", "batched"):
        print(
            f"{m:9s}: {thr[m]:.2f} requests/s (median of {len(times[m])} rounds: {statistics.median(times[m]):.2f}s)"
        )
    print(f"ratio batched/unbatched throughput: {ratio:.2f}x (target >= 1.5x)")
    if args.json:
        out: dict[str, Any] = {
            "ratio_batched_over_unbatched_throughput": round(ratio, 3),
            "batched_requests_per_s": round(thr["batched"], 3),
            "unbatched_requests_per_s": round(thr["unbatched"], 3),
            "mean_batch_size_batched": round(statistics.mean(sizes["batched"]), 2),
            "conditions": conditions,
            "quick": args.quick,
        }
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
