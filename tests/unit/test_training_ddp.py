"""Data-parallel training through ``accelerate launch``, for real: two CPU processes talking gloo.

One launch of 2 processes with batch 1 each runs ``huvidpo train dpo`` for 2 steps and then, in the
same processes, ``huvidpo train dpo --resume`` for 2 more (restored from the step-2 checkpoint), then
2 steps of ``huvidpo train stage1``. They are compared with in-process runs with batch 2:

- both processes run, the launch exits 0, and the run's files (adapter, checkpoints, metrics.jsonl,
  config.json, the printed summary) come from the main process alone, each exactly once;
- each process trains on its own half of every global batch, and together on exactly the pairs of
  the 1-process run, with the same clip views, timesteps and noise (the step's draws are made for
  the global batch and sliced per process, so they do not depend on the number of processes);
- gradients are all-reduced: both processes end with identical LoRA weights, and these equal the
  1-process batch-2 weights to float tolerance (as do the logged losses, averaged over processes);
  the same holds for the stage-1 parameters;
- a stop requested in one process only stops all of them at the same step, with one checkpoint
  (otherwise one would wait in a checkpoint barrier while the other waits in a gradient all-reduce).

This file is also the worker: ``accelerate launch tests/unit/test_training_ddp.py --probe DIR ARGS
[--then ARGS...]`` runs ``huvidpo ARGS`` (then the next ``ARGS``; ``ARGS`` starting with
``--stop-rank1-after N`` stop in process 1 alone after N steps) in each process with the trainer's
data loading and loss step wrapped to record what that process did, then writes ``DIR/rank<r>.json``
and the process's own final LoRA weights to ``DIR/rank<r>.safetensors``. (Imports dominate a launch
on a small CPU machine, hence one launch for all three runs.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


# -- the worker (runs inside each launched process) -----------------------------------------------
class Recorder:
    """Replaces ``load_pair_batch`` and ``dpo_step`` of ``huvidpo.training.dpo`` through ``setattr_``
    (``monkeypatch.setattr`` in the test) with wrappers that record, per training step, the pairs and
    views loaded, the timesteps and a noise checksum, and keep the UNet."""

    def __init__(self, setattr_: Callable[[Any, str, Any], None]) -> None:
        import huvidpo.training.dpo as dpo

        self.steps: list[dict[str, Any]] = []
        self.unet: Any = None
        real_load, real_step = dpo.load_pair_batch, dpo.dpo_step

        def load(pairs: Any, paths: Any, source: Any, views: Any) -> Any:
            pair_ids = [[p.chosen_id, p.rejected_id] for p in pairs]
            self.steps.append({"pairs": pair_ids, "views": [[int(s), bool(f)] for s, f in views]})
            return real_load(pairs, paths, source, views)

        def step(policy: Any, reference: Any, base_unet: Any, scheduler: Any, batch: Any, t: Any,
                 noise: Any, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
            self.unet = base_unet
            self.steps[-1]["t"] = [int(x) for x in t]
            self.steps[-1]["noise"] = [float(n.double().sum()) for n in noise]
            return real_step(policy, reference, base_unet, scheduler, batch, t, noise, *args, **kwargs)

        setattr_(dpo, "load_pair_batch", load)
        setattr_(dpo, "dpo_step", step)


def _run_stopping_rank1(main: Callable[[list[str]], int], args: list[str], after: int) -> int:
    """``main(args)`` with a ``should_stop`` on the DPO run that turns True in process 1 only, once
    ``after`` steps are done (as when a stop signal reaches one process first)."""
    from accelerate import PartialState

    import huvidpo.training.dpo as dpo

    real_run, polls = dpo.run_dpo, [0]

    def should_stop() -> bool:
        polls[0] += 1
        return PartialState().process_index == 1 and polls[0] > after

    def run(config: Any, callbacks: Any = (), should_stop_: Any = None, resume: bool = False) -> Any:
        return real_run(config, callbacks, should_stop=should_stop, resume=resume)

    dpo.run_dpo = run  # type: ignore[assignment]
    try:
        return main(args)
    finally:
        dpo.run_dpo = real_run


def _worker(argv: list[str]) -> int:
    from accelerate import PartialState
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from huvidpo.cli import main

    probe = Path(argv[argv.index("--probe") + 1])
    args = [a for i, a in enumerate(argv) if a != "--probe" and (i == 0 or argv[i - 1] != "--probe")]
    runs: list[list[str]] = [[]]
    for a in args:
        runs.append([]) if a == "--then" else runs[-1].append(a)
    rec = Recorder(setattr)
    rcs = []
    for run in runs:
        if run[0] == "--stop-rank1-after":
            rcs.append(_run_stopping_rank1(main, run[2:], int(run[1])))
        else:
            rcs.append(main(run))
    group = PartialState()
    rank = group.process_index
    probe.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(rec.unet, adapter_name="huvidpo")  # the adapter file's names
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(weights, str(probe / f"rank{rank}.safetensors"))
    record = {"rank": rank, "world": group.num_processes, "rc": rcs, "steps": rec.steps}
    (probe / f"rank{rank}.json").write_text(json.dumps(record))
    return max(rcs)


# -- the test ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(probe: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the 2-process launch; on a timeout (a hang in a collective) stop it and fail with its output.

    SIGTERM goes to the launcher (torchrun's agent), which stops its workers (each in a session of
    its own, out of reach of a group kill); SIGKILL follows if it does not exit in time."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        # --multi_gpu picks torchrun's launcher; with --device cpu the trainer's Accelerator(cpu=True)
        # makes it a multi-CPU (gloo) group. (--cpu --num_processes 2 would start ONE process.)
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        __file__, "--probe", str(probe), *args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:  # fmt: skip
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGTERM)
            try:
                out, err = popen.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                out, err = popen.communicate()
            pytest.fail(f"the 2-process launch hung for {timeout} s:\n{out[-3000:]}{err[-6000:]}")
    assert popen.returncode == 0, out[-3000:] + err[-6000:]
    return subprocess.CompletedProcess(cmd, popen.returncode, out, err)


def _summaries(stdout: str) -> list[dict[str, Any]]:
    """The JSON summaries ``huvidpo train`` printed (each a multi-line object)."""
    found, depth, buf = [], 0, []
    for line in stdout.splitlines():
        if line == "{" or depth:
            buf.append(line)
            depth += line.count("{") - line.count("}")
            if depth == 0:
                found.append(json.loads("\n".join(buf)))
                buf = []
    return found


def _probe(probe: Path) -> tuple[list[dict[str, Any]], list[dict[str, torch.Tensor]]]:
    from safetensors.torch import load_file

    records = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    return records, [load_file(str(probe / f"rank{r}.safetensors")) for r in (0, 1)]


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from huvidpo.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ddp-data")
    # 4 prompts x (2 preferred x 2 others) pairs, half the prompts held out: 8 training pairs (4 steps
    # of global batch 2 never wrap around) and 8 held-out pairs (2 evaluation chunks, one per process).
    return make_synthetic_dataset(
        root / "data", n_prompts=4, videos_per_prompt=4, num_frames=6, size=64, seed=1
    )


OPTIONS = dict(
    num_frames=4, height=64, width=64, lora_rank=2, lora_alpha=2, lora_dropout=0.0, lr=1e-3, hflip_p=0.5,
    seed=5, checkpoint_every=2, keep_last=5, holdout_fraction=0.5, eval_draws=2, device="cpu", plot=False,
)  # fmt: skip
"""LoRA dropout off: its masks come from each process's global RNG, which no split can reproduce.
The clips have 6 frames for 4 sampled, so random start frames are drawn too."""


STAGE1 = dict(
    num_frames=4, height=64, width=64, lr=1e-3, adam_eps=1e-4, hflip_p=0.5, seed=5, device="cpu", plot=False,
)  # fmt: skip
"""Stage 1 trains whole temporal layers, whose zero-initialised gates get gradients that cancel to
~1e-8, pure float noise: with Adam's eps 1e-8 their g/(|g|+eps) step is +-lr by the noise's sign,
whatever the data split. eps 1e-4 keeps such steps ~1e-4 lr; real gradients still take full steps."""


SAMPLES = ["--sample-count", "1", "--sample-steps", "1"]
"""The 2-process runs render a sample video into each checkpoint (the main process alone, while the
other waits); the 1-process run renders none, and the weights still agree."""


def _flags(options: dict[str, Any]) -> list[str]:
    out = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        out += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_dpo_equals_one_process_with_the_global_batch(
    tiny_model_dir: Path, pref_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from huvidpo.training import (
        DPOConfig,
        Stage1Config,
        latest_checkpoint,
        list_checkpoints,
        run_dpo,
        run_stage1,
    )

    out = tmp_path / "ddp"
    common = ["train", "dpo", "--model", str(tiny_model_dir), "--dataset", str(pref_data), "--out", str(out),
              "--batch-size", "1", "--quiet", *_flags(OPTIONS), *SAMPLES]  # fmt: skip
    s1_out = tmp_path / "s1"
    stage1 = ["train", "stage1", "--model", str(tiny_model_dir), "--dataset", str(pref_data), "--out", str(s1_out),
              "--batch-size", "1", "--max-steps", "2", "--quiet", *_flags(STAGE1)]  # fmt: skip
    stopped_out = tmp_path / "stopped"
    stopping = ["--stop-rank1-after", "1", *common[:7], str(stopped_out), *common[8:], "--max-steps", "3"]
    probe = tmp_path / "probe"
    launch = _launch(probe, [*stopping, "--then", *common, "--max-steps", "2", "--then", *common, "--max-steps",
                             str(STEPS), "--resume", "--then", *stage1])  # fmt: skip

    # One process: the same global batch of 2, uninterrupted, recorded the same way (the latents come
    # from the 2-process run's cache: the same VAE means, without encoding them again).
    rec = Recorder(monkeypatch.setattr)
    cfg = DPOConfig(model=str(tiny_model_dir), dataset=str(pref_data), output_dir=str(tmp_path / "single"),
                    cache_dir=str(out / "cache"), batch_size=2, max_steps=STEPS, **OPTIONS)  # type: ignore[arg-type]  # fmt: skip
    single = run_dpo(cfg)
    assert single.weights_dir is not None and len(rec.steps) == STEPS
    reference = load_file(str(single.weights_dir / "adapter_model.safetensors"))

    # Both processes ran every step once (the resumed run went on from step 2), in a 2-process group;
    # the run stopped by process 1 alone ran 1 step in both.
    records, weights = _probe(probe)
    assert [(r["world"], r["rc"]) for r in records] == [(2, [0, 0, 0, 0])] * 2
    assert [len(r["steps"]) for r in records] == [1 + STEPS, 1 + STEPS]
    ranks = [r["steps"][1:] for r in records]

    # Disjoint shards that together are the 1-process global batch, with the same draws per item.
    for k, whole in enumerate(rec.steps):
        mine = [ranks[r][k] for r in (0, 1)]
        assert mine[0]["pairs"] != mine[1]["pairs"], f"step {k + 1}: both processes trained on one pair"
        for key in ("pairs", "views", "t"):
            assert mine[0][key] + mine[1][key] == whole[key], (k + 1, key)
        assert mine[0]["noise"] + mine[1]["noise"] == pytest.approx(whole["noise"], abs=1e-9)
    all_pairs = [tuple(p) for s in rec.steps for p in s["pairs"]]
    assert len(set(all_pairs)) == len(all_pairs) == 2 * STEPS  # one epoch: every pair once
    assert any(v[0] > 0 for s in rec.steps for v in s["views"])  # random starts were drawn

    # Gradients all-reduced: the two processes hold the same weights, those of the batch-2 run.
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == reference.keys() and len(saved) > 0
    assert weights[0].keys() == weights[1].keys() == saved.keys()
    for name in saved:
        assert torch.equal(weights[0][name], weights[1][name]), name
        assert torch.equal(weights[0][name], saved[name]), name  # the file holds the final weights
    # Float noise differs between one batch-2 backward and two batch-1 backwards plus an all-reduce,
    # and Adam's g/sqrt(v) enlarges it where gradients are near 0: measured ~1e-6 per element. A step
    # on other data moves elements by up to lr (1e-3); B (zero at init) changes ~50% from step 2 to 4.
    for name, ref in reference.items():
        assert torch.allclose(saved[name], ref, atol=2e-5, rtol=1e-4), name
    b_names = [k for k in reference if "lora_B" in k]
    b_norm = torch.stack([reference[k].norm() for k in b_names]).norm()
    b_diff = torch.stack([(saved[k] - reference[k]).norm() for k in b_names]).norm()
    assert b_norm > 1e-3 and b_diff < 1e-3 * b_norm, (float(b_diff), float(b_norm))

    # Written once, by the main process: one summary per run, 4 metric rows, complete checkpoints.
    summaries = _summaries(launch.stdout)
    # stopped dpo, dpo, dpo --resume, stage1
    assert [s["steps"] for s in summaries] == [1, 2, STEPS, 2], launch.stdout
    assert summaries[0]["stopped"] is True and summaries[0]["weights"] is None
    assert summaries[0]["last_checkpoint"] == str(stopped_out / "checkpoints" / "ckpt-000001")
    assert [p.name for p in list_checkpoints(stopped_out / "checkpoints")] == ["ckpt-000001"]
    assert not (stopped_out / "checkpoints" / "ckpt-000001" / "samples").exists()  # a stop's checkpoint: none
    summaries = summaries[1:]
    summary = summaries[1]
    assert summary["weights"] == str(out / "adapter") and summary["steps"] == STEPS
    # The held-out evaluation, sharded over the processes and gathered, matches the 1-process one.
    assert summary["eval_pairs"] == single.eval_metrics["eval_pairs"] == 8
    assert summary["eval_implicit_acc"] == single.eval_metrics["eval_implicit_acc"]
    # (a difference of near-equal errors times beta/2: float noise of the weights shows at ~1e-6)
    assert summary["eval_reward_margin"] == pytest.approx(single.eval_metrics["eval_reward_margin"], abs=2e-5)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    single_rows = [json.loads(line) for line in single.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row, one in zip(rows, single_rows, strict=True):  # process means == global-batch means
        for key in ("loss", "implicit_acc", "err_model_chosen", "err_ref_rejected", "grad_norm"):
            assert row[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (row["step"], key)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["ckpt-000002", "ckpt-000004"]
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "ckpt-000004"  # digests match
    assert not list((out / "checkpoints").glob("*.tmp"))
    ckpt = load_file(str(out / "checkpoints" / "ckpt-000004" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(ckpt[k], saved[k]) for k in saved)
    for name in ("ckpt-000002", "ckpt-000004"):  # rendered once, by the main process, in the manifest
        items = json.loads((out / "checkpoints" / name / "samples" / "samples.json").read_text())["items"]
        files = json.loads((out / "checkpoints" / name / "manifest.json").read_text())["files"]
        assert [i["index"] for i in items] == [0] and items[0]["video"] in files
    assert json.loads((out / "config.json").read_text())["max_steps"] == STEPS

    # Stage 1 goes the same way: its trained parameters and losses equal those of a batch-2 run.
    assert summaries[2]["weights"] == str(s1_out / "unet")
    s1 = run_stage1(Stage1Config(model=str(tiny_model_dir), dataset=str(pref_data), batch_size=2, max_steps=2,
                                 output_dir=str(tmp_path / "s1-single"), cache_dir=str(s1_out / "cache"),
                                 **STAGE1))  # type: ignore[arg-type]  # fmt: skip
    trained = [load_file(str(d / "checkpoints" / "ckpt-000002" / "state" / "trainable.safetensors"))
               for d in (s1_out, s1.output_dir)]  # fmt: skip
    assert trained[0].keys() == trained[1].keys() and len(trained[0]) > 0
    for name, ref in trained[1].items():
        assert torch.allclose(trained[0][name], ref, atol=2e-6, rtol=1e-5), name  # measured ~1e-7
    s1_rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
               for d in (s1_out, s1.output_dir)]  # fmt: skip
    assert [r["step"] for r in s1_rows[0]] == [1, 2]
    assert [r["loss"] for r in s1_rows[0]] == pytest.approx([r["loss"] for r in s1_rows[1]], rel=1e-4)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
