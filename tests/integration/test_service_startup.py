"""Starting the services as processes (``python -m services.…``) the way an operator does: a port
already taken, or an invalid setting, ends the process at once with one line that says why."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.inference.testing import inference_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def first(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """A first inference server; yields its (gRPC port, metrics port)."""
    tmp = tmp_path_factory.mktemp("first-inference")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference"],
        cwd=REPO,
        env=inference_env(tmp, tiny_model_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        ports = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"listening grpc=\S+:(\d+) metrics=(\d+)", line)
            if m:
                ports = int(m.group(1)), int(m.group(2))
                break
        assert ports, "the first server did not start:\n" + "".join(lines[-30:])
        yield ports
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_second(env: dict[str, str], module: str = "services.inference") -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        # It kept running: it shares the port. Stop it and report what it printed.
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode not in (0, -signal.SIGTERM), (result.returncode, result.stdout, result.stderr)
    assert "listening" not in result.stdout, result.stdout
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_second_inference_server_on_a_taken_grpc_port_exits_with_one_line(
    first: tuple[int, int], tiny_model_dir: Path, tmp_path: Path
) -> None:
    grpc_port, _ = first
    env = inference_env(tmp_path, tiny_model_dir, HUVIDPO_INFERENCE_PORT=str(grpc_port))
    err = assert_one_line_failure(run_second(env), "address already in use", f"127.0.0.1:{grpc_port}")
    assert "HUVIDPO_INFERENCE_PORT" in err


def test_second_inference_server_on_a_taken_metrics_port_exits_with_one_line(
    first: tuple[int, int], tiny_model_dir: Path, tmp_path: Path
) -> None:
    _, metrics_port = first
    env = inference_env(tmp_path, tiny_model_dir, HUVIDPO_INFERENCE_METRICS_PORT=str(metrics_port))
    err = assert_one_line_failure(run_second(env), "address already in use", f"127.0.0.1:{metrics_port}")
    assert "HUVIDPO_INFERENCE_METRICS_PORT" in err


@pytest.mark.parametrize(
    ("module", "variable", "value"),
    [
        ("services.controlplane", "HUVIDPO_CONTROLPLANE_TOKENS", "secret123"),
        ("services.controlplane", "HUVIDPO_CONTROLPLANE_PORT", "secret123"),
        ("services.controlplane", "HUVIDPO_STORE_PART_SIZE", "secret123"),
        ("services.inference", "HUVIDPO_INFERENCE_MAX_BATCH", "secret123"),
        ("services.trainer", "HUVIDPO_TRAINER_METRICS_PORT", "secret123"),
    ],
)
def test_an_invalid_setting_is_one_line_naming_the_variable_never_its_value(
    module: str, variable: str, value: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    env = inference_env(tmp_path, tiny_model_dir, **{variable: value})
    env["HUVIDPO_CONTROLPLANE_WORK_DIR"] = str(tmp_path / "work")
    env["HUVIDPO_CONTROLPLANE_PORT"] = env.get("HUVIDPO_CONTROLPLANE_PORT", "0")
    env["HUVIDPO_TRAINER_WORK_DIR"] = str(tmp_path / "trainer")
    if variable != "HUVIDPO_CONTROLPLANE_PORT":
        env["HUVIDPO_CONTROLPLANE_PORT"] = "0"
    result = run_second(env, module)
    err = assert_one_line_failure(result, variable)
    assert value not in err and value not in result.stdout, (result.stdout, err)
    assert result.returncode == 2, (result.returncode, err)
