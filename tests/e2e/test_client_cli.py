"""The whole loop through the ``huvidpo`` CLI alone, against a real control plane and inference
service on 127.0.0.1 (``demo.stack.Stack``, the tiny model), plus the error paths a person meets:
the one line they read and the exit code a script sees.

``HUVIDPO_CLI_TRANSCRIPT=path`` keeps the loop's transcript (every command and its output)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.loop import publish_base_model
from demo.stack import REPO, Stack, free_port, local_store_env
from huvidpo.client import ExitCode
from huvidpo.video_io import read_video
from tests.e2e.harness import store_from_env

pytestmark = pytest.mark.slow

SMALL_TRAINING = [
    "--hp", "max_steps=4", "--hp", "checkpoint_every=2", "--hp", "num_frames=4", "--hp", "height=32",
    "--hp", "width=32", "--hp", "batch_size=1", "--hp", "lora_rank=4", "--hp", "lr=0.001",
    "--hp", "gradient_checkpointing=false", "--hp", "seed=1",
]  # fmt: skip


@dataclass
class Cli:
    """Runs ``python -m huvidpo ...`` with the stack's address and token in the environment."""

    env: dict[str, str]
    transcript: list[str] = field(default_factory=list)

    def __call__(self, *args: str, expect: int = 0, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "huvidpo", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        self.transcript.append(
            f"$ huvidpo {' '.join(args)}\n{proc.stderr}{proc.stdout}[exit {proc.returncode}]\n"
        )
        assert proc.returncode == expect, (
            f"huvidpo {' '.join(args)} -> {proc.returncode}\n{proc.stderr}\n{proc.stdout}"
        )
        assert "Traceback" not in proc.stderr
        return proc

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--output", "json").stdout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "huvidpo", *args],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # A shell that starts the suite in the background (`.ci/run &`) leaves SIGINT ignored, and
            # Python then never raises KeyboardInterrupt: give the CLI the terminal's default, as a
            # person's Ctrl-C would find it.
            preexec_fn=_default_sigint,
        )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Live:
    stack: Stack
    cli: Cli
    data: Path
    frame: Path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    """A control plane (local executor, token auth) and an inference service on 127.0.0.1, the tiny
    model published as ``models/tiny``, and a small set of rated videos on disk."""
    from huvidpo.data.synthetic import make_synthetic_dataset

    work = tmp_path_factory.mktemp("cli-stack")
    env = local_store_env(work / "store")
    publish_base_model(store_from_env(env), tiny_model_dir, "tiny")
    stack = Stack(work, env)
    try:
        stack.start_controlplane()
        stack.start_inference(
            {"default_frames": "4", "default_height": "32", "default_width": "32", "default_steps": "2"}
        )
        data = make_synthetic_dataset(work / "rated", n_prompts=2, videos_per_prompt=2, num_frames=6, size=32)
        frame = work / "frame.png"
        Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(frame)
        cli_env = {k: v for k, v in os.environ.items() if not k.startswith("HUVIDPO_")}
        cli_env.update(
            {
                "PYTHONPATH": str(REPO),
                "HF_HUB_OFFLINE": "1",
                "HUVIDPO_URL": stack.controlplane_url,
                "HUVIDPO_TOKEN": stack.token,
                "HUVIDPO_GRPC_ADDRESS": stack.grpc_address,
            }
        )
        yield Live(stack, Cli(cli_env), data, frame)
    finally:
        stack.stop()


def test_the_whole_loop_through_the_cli_alone(live: Live, tmp_path: Path) -> None:
    cli = live.cli
    cli("datasets", "create", "loop", "--description", "rated videos")
    version = cli.json("datasets", "upload", "loop", str(live.data))
    assert isinstance(version, dict) and version["videos"] == 4
    listed = cli.json("datasets", "list")
    assert "loop" in [d["name"] for d in listed]  # type: ignore[union-attr]
    assert "VERSION" in cli("datasets", "show", "loop").stdout
    pairs = cli.json("pairs", "compile", "--dataset", "loop", "--version", "latest")
    assert pairs["pairs"] > 0  # type: ignore[index]

    # the fine-tune, watched to its end on a live line (stderr), the result on stdout
    proc = cli("fine-tunes", "create", "--dataset", "loop", "--version", "latest", "--base-model", "tiny",
               *SMALL_TRAINING, "--watch", "--interval", "0.5", "--output", "json")  # fmt: skip
    ft = json.loads(proc.stdout)
    assert ft["state"] == "succeeded" and ft["progress"]["step"] == 4
    assert f"created fine-tune {ft['id']}" in proc.stderr
    assert "step 4/4" in proc.stderr and "loss " in proc.stderr and "reward acc " in proc.stderr
    assert ft["id"] in [f["id"] for f in cli.json("fine-tunes", "list")]  # type: ignore[union-attr]
    assert "step" in cli("fine-tunes", "logs", ft["id"]).stdout.lower()

    checkpoints = cli.json("checkpoints", "list", "--fine-tune", ft["id"])
    ids = [c["id"] for c in checkpoints]  # type: ignore[union-attr]
    assert ids == [f"ckpt-{ft['id']}-2", f"ckpt-{ft['id']}-4"]
    shown = cli.json("checkpoints", "show", ids[-1])
    got = cli.json("checkpoints", "download", ids[-1], str(tmp_path / "ck"))
    assert set(shown["files"]) <= set(got["files"])  # type: ignore[index,arg-type]
    assert any(f.endswith(".safetensors") for f in got["files"])  # type: ignore[index]

    # roll out the newest, canary the older one, generate, roll the canary back
    ro = cli.json("rollouts", "set", "default", ids[-1], "--create", "--wait", "--timeout", "180")
    assert ro["current"] == ids[-1]  # type: ignore[index]
    assert ro["status"]["conditions"][0]["status"] == "True"  # type: ignore[index]
    ro = cli.json("rollouts", "canary", "default", ids[0], "--percent", "50", "--wait", "--timeout", "180")
    assert (ro["canary"], ro["canary_percent"]) == (ids[0], 50)  # type: ignore[index]
    out = tmp_path / "video.mp4"
    proc = cli("generate", "--remote", live.stack.grpc_address, "--prompt", "a square slides",
               "--first-frame", str(live.frame), "--frames", "4", "--height", "32", "--width", "32",
               "--steps", "2", "--seed", "3", "--checkpoint", ids[-1], "--out", str(out))  # fmt: skip
    assert f"checkpoint {ids[-1]}" in proc.stdout
    video, _ = read_video(out)
    assert np.asarray(video).shape[:3] == (4, 32, 32)
    ro = cli.json("rollouts", "rollback", "default", "--wait", "--timeout", "180")
    assert (ro["current"], ro["canary"]) == (ids[-1], None)  # type: ignore[index]
    assert "Ready True" in cli("rollouts", "show", "default").stdout

    transcript = "\n".join(cli.transcript)
    if os.environ.get("HUVIDPO_CLI_TRANSCRIPT"):
        Path(os.environ["HUVIDPO_CLI_TRANSCRIPT"]).write_text(transcript)
    print(transcript)


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_errors_are_one_line_with_an_exit_code_by_kind(live: Live) -> None:
    cli = live.cli
    # 401: an unknown token
    line = _one_line(cli("datasets", "list", "--token", "not-the-token", expect=ExitCode.REFUSED))
    assert (
        line.startswith("huvidpo datasets list: error: ") and "HTTP 401" in line and "HUVIDPO_TOKEN" in line
    )
    assert "not-the-token" not in line
    # 404
    line = _one_line(cli("datasets", "show", "nope", expect=ExitCode.NOT_FOUND))
    assert (
        line.startswith("huvidpo datasets show: error: ") and "'nope'" in line and line.endswith("(HTTP 404)")
    )
    # 409: the dataset exists
    cli("datasets", "create", "errs")
    line = _one_line(cli("datasets", "create", "errs", expect=ExitCode.REFUSED))
    assert "errs" in line and "(HTTP 409)" in line
    cli("datasets", "create", "errs", "--exist-ok")
    # 422: a hyperparameter out of its bound, named by its field
    line = _one_line(
        cli(
            "fine-tunes",
            "create",
            "--dataset",
            "errs",
            "--version",
            "0" * 64,
            "--base-model",
            "tiny",
            "--hp",
            "lr=5",
            expect=ExitCode.REFUSED,
        )
    )
    assert "lr must be" in line and "hyperparameters.lr" in line and "(HTTP 422)" in line
    # the control plane unreachable
    dead = f"http://127.0.0.1:{free_port()}"
    line = _one_line(cli("datasets", "list", "--url", dead, "--retries", "1", expect=ExitCode.UNAVAILABLE))
    assert f"cannot reach {dead}" in line
    # gRPC: UNAVAILABLE (nothing listens), INVALID_ARGUMENT, UNAUTHENTICATED
    gen = ["generate", "--prompt", "x", "--frames", "4", "--height", "32", "--width", "32", "--steps", "1"]
    line = _one_line(
        cli(
            *gen,
            "--remote",
            f"127.0.0.1:{free_port()}",
            "--retries",
            "1",
            "--out",
            "/tmp/x.mp4",
            expect=ExitCode.UNAVAILABLE,
        )
    )
    assert line.startswith("huvidpo generate: error: ") and line.endswith("(gRPC UNAVAILABLE)")
    bad = [*gen[:6], "36", *gen[7:]]  # height 36: not a multiple of 8
    line = _one_line(
        cli(
            *bad,
            "--remote",
            live.stack.grpc_address,
            "--quiet",
            "--out",
            "/tmp/x.mp4",
            expect=ExitCode.REFUSED,
        )
    )
    assert "height" in line and line.endswith("(gRPC INVALID_ARGUMENT)")
    line = _one_line(
        cli(
            *gen,
            "--remote",
            live.stack.grpc_address,
            "--token",
            "wrong",
            "--out",
            "/tmp/x.mp4",
            expect=ExitCode.REFUSED,
        )
    )
    assert line.endswith("(gRPC UNAUTHENTICATED)")
    # usage
    assert cli("fine-tunes", expect=ExitCode.USAGE).stdout == ""
    line = _one_line(cli("ratings", "add", "errs", expect=ExitCode.USAGE))
    assert "nothing to add" in line


def test_ctrl_c_detaches_the_watch_or_cancels_with_cancel_on_interrupt(live: Live) -> None:
    cli = live.cli
    cli("datasets", "upload", "ctrlc", str(live.data), "--create")
    long = [a if a != "max_steps=4" else "max_steps=500" for a in SMALL_TRAINING]
    for flags, state in (([], "running"), (["--cancel-on-interrupt"], "cancelled")):
        proc = cli.popen("fine-tunes", "create", "--dataset", "ctrlc", "--version", "latest",
                         "--base-model", "tiny", *long, "--watch", "--interval", "0.3", *flags)  # fmt: skip
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert first.startswith("created fine-tune "), first
        finetune_id = first.split()[-1]
        proc.stderr.readline()  # the first live line: the watch is on
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == ExitCode.INTERRUPTED, err
        assert "Traceback" not in err
        view = cli.json("fine-tunes", "show", finetune_id)
        if state == "running":
            assert f"detached: fine-tune {finetune_id} keeps running" in err
            assert f"huvidpo fine-tunes watch {finetune_id}" in err
            assert view["state"] in ("queued", "running")  # type: ignore[index]
            cli("fine-tunes", "cancel", finetune_id)
        else:
            assert f"cancelled fine-tune {finetune_id}" in err
            assert view["state"] == "cancelled"  # type: ignore[index]
        deadline = time.monotonic() + 60
        while cli.json("fine-tunes", "show", finetune_id)["state"] != "cancelled":  # type: ignore[index]
            assert time.monotonic() < deadline
            time.sleep(0.5)
