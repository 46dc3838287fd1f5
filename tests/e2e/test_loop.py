"""The whole loop end to end, as ``make demo`` runs it: on the embedded default watched by a real
Prometheus (scraping the control plane, the inference service and the trainer at 1 s), and on the real
S3 server (Ceph radosgw) instead of the local store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from demo.loop import LoopOptions, run_loop
from demo.stack import free_port
from huvidpo.video_io import read_video
from tests.e2e.harness import fresh_bucket_env

pytestmark = pytest.mark.slow

# Small enough for CI on 2 cores, large enough for two checkpoints and a real generation.
OPTS = dict(
    prompts=2,
    videos_per_prompt=2,
    video_frames=6,
    video_size=32,
    train_steps=4,
    checkpoint_every=2,
    train_frames=4,
    train_size=32,
    gen_frames=4,
    gen_size=32,
    gen_steps=3,
    sample_count=1,  # one sample video at each checkpoint, 2 DDIM steps
    sample_steps=2,
    timeout=600.0,
)


def _check_outputs(summary: dict[str, Any], out: Path, opts: LoopOptions) -> None:
    video, _fps = read_video(out / "video.mp4")
    assert np.asarray(video).shape[:3] == (opts.gen_frames, opts.gen_size, opts.gen_size)
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ft = summary["finetune"]
    assert ft["state"] == "succeeded"
    assert ft["progress"]["step"] == opts.train_steps
    assert ft["checkpoints"] == [f"ckpt-{ft['id']}-2", f"ckpt-{ft['id']}-4"]
    # lineage: dataset digest -> fine-tune -> checkpoint -> generation
    assert summary["checkpoint"]["lineage"]["dataset_digest"] == summary["dataset"]["version_digest"]
    assert summary["checkpoint"]["lineage"]["finetune_id"] == ft["id"]
    assert summary["generation"]["checkpoint_id"] == summary["checkpoint"]["id"] == ft["checkpoints"][-1]
    assert summary["dataset"]["pairs"] > 0
    # the sample video the trainer rendered at the checkpoint, listed by REST and saved by the loop
    (sample,) = summary["checkpoint"]["samples"]
    assert sample["url"].endswith(f"/v1/checkpoints/{summary['checkpoint']['id']}/samples/0")
    sample_video, _fps = read_video(out / "sample.mp4")
    assert np.asarray(sample_video).shape[0] == opts.train_frames
    held = summary["heldout"]
    if opts.holdout_fraction:
        # One of the two prompts held out: its pair is evaluated, never trained on; the reference
        # (margin 0 on every pair) scores chance, the checkpoint its own margin.
        assert held["pairs"] == 1 and len(held["prompts"]) == 1
        assert held["reference"] == {"implicit_acc": 0.5, "reward_margin": 0.0}
        assert held["checkpoint"]["id"] == ft["checkpoints"][-1]
        assert held["checkpoint"]["reward_margin"] != 0.0
        assert summary["dataset"]["pairs"] == 1
    else:
        assert held is None


def test_loop_on_the_embedded_default_moves_finetune_rollout_and_generation_metrics(
    make_stack: Any, prometheus: Any, tmp_path: Path
) -> None:
    # every trainer the local executor starts serves its metrics on this port while it trains
    trainer_port = free_port()
    # The trainer lingers 5 s after its last step so the 1 s scrape sees its final values even when the
    # run is shorter than Prometheus' 5 s target-refresh tick.
    running = make_stack(
        extra_env={
            "HUVIDPO_TRAINER_METRICS_PORT": str(trainer_port),
            "HUVIDPO_TRAINER_METRICS_LINGER_SECONDS": "5",
        }
    )
    stack = running.stack
    prom = prometheus(
        {
            "controlplane": stack.controlplane_url + "/metrics",
            "inference": stack.inference_metrics_url,
            "trainer": f"http://127.0.0.1:{trainer_port}/metrics",
        }
    )
    # Prometheus applies new targets on a 5 s tick: wait until both are up before the loop starts.
    prom.wait_value('count(up{job=~"controlplane|inference"} == 1)', lambda v: v == 2, timeout=60)
    assert prom.value("sum(huvidpo_inference_rollout_outcomes_total)") in (None, 0.0)
    assert prom.value("sum(huvidpo_inference_generation_seconds_count)") in (None, 0.0)

    opts = LoopOptions(**{**OPTS, "holdout_fraction": 0.5})  # type: ignore[arg-type]
    out = tmp_path / "out"
    summary = run_loop(running.cp, running.store, tmp_path / "work", out, opts, print)
    _check_outputs(summary, out, opts)

    # fine-tune: the trainer's own metrics were scraped while it ran...
    assert prom.value('max_over_time(huvidpo_trainer_steps_total{job="trainer"}[30m])') >= 1  # type: ignore[operator]
    assert prom.value('count_over_time(huvidpo_trainer_loss{job="trainer"}[30m])') >= 1  # type: ignore[operator]
    # ...and the control plane saw it go to succeeded, and counts it by state
    prom.wait_value(
        'sum(huvidpo_controlplane_finetune_transitions_total{to_state="succeeded"})', lambda v: v >= 1
    )
    prom.wait_value('huvidpo_controlplane_finetunes{state="succeeded"}', lambda v: v == 1)
    prom.wait_value("sum(huvidpo_controlplane_upload_bytes_total)", lambda v: v > 0)
    # rollout: the inference service applied the rolled-out checkpoint
    prom.wait_value(
        'sum(huvidpo_inference_rollout_outcomes_total{outcome="applied",role="current"})', lambda v: v >= 1
    )
    ckpt = summary["checkpoint"]["id"]
    prom.wait_value(
        f'huvidpo_inference_loaded_checkpoint_info{{checkpoint="{ckpt}",role="current"}}', lambda v: v == 1
    )
    # generation: one request generated by that checkpoint, finished OK
    prom.wait_value(f'huvidpo_inference_generation_seconds_count{{checkpoint="{ckpt}"}}', lambda v: v >= 1)
    prom.wait_value('sum(huvidpo_inference_requests_total{code="OK"})', lambda v: v >= 1)
    # and nothing answered 5xx
    assert prom.value('sum(huvidpo_controlplane_requests_total{status=~"5.."})') in (None, 0.0)


def test_loop_against_the_real_s3_server(
    make_stack: Any, s3_endpoint: dict[str, str], tmp_path: Path
) -> None:
    env = fresh_bucket_env(s3_endpoint)
    running = make_stack(store_env=env)
    opts = LoopOptions(**OPTS)  # type: ignore[arg-type]
    out = tmp_path / "out"
    summary = run_loop(running.cp, running.store, tmp_path / "work", out, opts, print)
    _check_outputs(summary, out, opts)
    # everything the loop made lives in the bucket, published manifest-last
    store = running.store
    version = summary["dataset"]["version_digest"]
    assert store.exists(f"datasets/{opts.dataset}/{version}/manifest.json")
    assert store.exists(f"checkpoints/{summary['checkpoint']['id']}/manifest.json")
    assert store.get_json("rollouts/default.json")["current"] == summary["checkpoint"]["id"]
