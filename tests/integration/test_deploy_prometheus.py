"""A real Prometheus loads deploy/monitoring/alerts.yml and evaluates it on the inference server's real
metrics registry: the rules parse, evaluate without errors, and "no model loaded" follows the gauge."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _rules(base: str) -> dict[str, dict[str, Any]]:
    groups = _get(f"{base}/api/v1/rules")["data"]["groups"]
    return {r["name"]: r for g in groups for r in g["rules"]}


def _wait(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out; last value {last!r}")


def test_alert_rules_evaluate_on_the_inference_servers_metrics(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    from services.inference.metrics import InferenceMetrics

    metrics = InferenceMetrics()
    metrics_port = metrics.serve("127.0.0.1", 0)
    metrics.ready.set(0)
    metrics.count_request("OK", "base")
    metrics.generation_seconds.labels("base").observe(1.5)
    port = _free_port()
    shutil.copy(ROOT / "deploy/monitoring/alerts.yml", tmp_path / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {"job_name": "huvidpo-inference", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        rules = _wait(lambda: _rules(base) if len(_rules(base)) == 6 else None)
        assert set(rules) == {
            "HuViDPOFineTuneFailed",
            "HuViDPORolloutAutoRollback",
            "HuViDPOInferenceErrorRatioHigh",
            "HuViDPOGenerationLatencyHigh",
            "HuViDPORolloutRefused",
            "HuViDPONoModelLoaded",
        }
        # The pod reports no model: the alert goes pending (it fires only after 10 minutes).
        _wait(lambda: _rules(base)["HuViDPONoModelLoaded"]["state"] == "pending")
        # Every rule evaluates without error once each group has run ("unknown" before that).
        _wait(lambda: {r["health"] for r in _rules(base).values()} == {"ok"})
        # The model loads: the alert clears at the next scrape and evaluation.
        metrics.ready.set(1)
        _wait(lambda: _rules(base)["HuViDPONoModelLoaded"]["state"] == "inactive")
        # The error-ratio expression sees the real counter's labels (code="OK": no server errors).
        query = urllib.parse.quote('sum(rate(huvidpo_inference_requests_total{code="OK"}[1m]))')
        _wait(lambda: _get(f"{base}/api/v1/query?query={query}")["data"]["result"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        metrics.close()
