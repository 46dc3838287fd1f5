"""A light library and a light control plane.

``pip install huvidpo`` gives the library and its CLI without the services' dependencies (they are the
``server`` extra), so importing the library never needs them; the control plane never needs torch or
diffusers, so its first fine-tune create does not spend seconds importing them. Each check runs in a
fresh interpreter: ``sys.modules`` of the test process already holds everything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SERVICE_MODULES = ("fastapi", "uvicorn", "grpc", "kubernetes", "minio")
HEAVY_MODULES = ("torch", "diffusers")

# Distributions only the services use: none may be a base dependency, all are in the `server` extra.
SERVER_ONLY = (
    "fastapi",
    "uvicorn",
    "httptools",
    "uvloop",
    "python-multipart",
    "kubernetes",
    "prometheus-client",
    "psutil",
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "protobuf",
    "pydantic",
    "pydantic-settings",
    "minio",
    "urllib3",
    "certifi",
)


def _run(code: str, timeout: float = 300) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter at the repo root; it prints one JSON object last."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _loaded(module: str, names: tuple[str, ...]) -> list[str]:
    out = _run(
        f"""
        import json, sys
        import {module}
        print(json.dumps({{"loaded": sorted(n for n in {names!r} if n in sys.modules)}}))
        """
    )
    return list(out["loaded"])  # type: ignore[call-overload]


@pytest.mark.parametrize("module", ["huvidpo", "huvidpo.cli", "huvidpo.training.config", "huvidpo.data"])
def test_importing_the_library_loads_no_service_dependency(module: str) -> None:
    assert _loaded(module, SERVICE_MODULES) == []


def test_training_config_loads_neither_torch_nor_diffusers() -> None:
    assert _loaded("huvidpo.training.config", HEAVY_MODULES) == []


def test_library_exports_still_resolve_lazily() -> None:
    out = _run(
        """
        import json
        from huvidpo.training import DPOConfig, run_dpo
        from huvidpo.data import LatentCache, load_dataset
        from huvidpo.models import DEFAULT_STAGE1_PATTERNS, VideoUNet
        import huvidpo.training as t
        print(json.dumps({"names": [run_dpo.__name__, LatentCache.__name__, VideoUNet.__name__],
                          "all": sorted(set(t.__all__) - set(dir(t)))}))
        """
    )
    assert out == {"names": ["run_dpo", "LatentCache", "VideoUNet"], "all": []}


def test_control_plane_creates_a_finetune_without_torch(tmp_path: Path, tiny_model_dir: Path) -> None:
    from huvidpo.data import make_synthetic_dataset
    from services.common.publish import publish_dir
    from services.common.store import LocalStore

    store_dir = tmp_path / "store"
    publish_dir(LocalStore(store_dir), tiny_model_dir, "models/tiny/", {"id": "tiny"})
    data = make_synthetic_dataset(tmp_path / "d", n_prompts=1, videos_per_prompt=2, num_frames=4, size=32)
    out = _run(
        f"""
        import hashlib, json, sys, time
        from pathlib import Path

        heavy = {HEAVY_MODULES!r}
        loaded = lambda: sorted(n for n in heavy if n in sys.modules)
        from fastapi.testclient import TestClient
        from services.common.settings import ControlPlaneSettings
        from services.common.store import LocalStore
        from services.controlplane.app import create_app
        from services.controlplane.domain.ports import ExecStatus

        class Executor:
            kind = "fake"
            def submit(self, spec): return {{"kind": "fake", "name": "job-" + spec.finetune_id}}
            def status(self, finetune_id): return ExecStatus("pending")
            def cancel(self, finetune_id): pass
            def logs(self, finetune_id, follow=False): return iter([])
            def ready(self): return True

        settings = ControlPlaneSettings(
            tokens=[hashlib.sha256(b"t").hexdigest()], work_dir=Path({str(tmp_path / "work")!r})
        )
        app = create_app(settings, LocalStore(Path({str(store_dir)!r})), Executor(), background=False)
        client = TestClient(app)
        after_app = loaded()
        auth = {{"Authorization": "Bearer t"}}
        data = Path({str(data)!r})
        files = [("files", (p.relative_to(data).as_posix(), p.read_bytes(), "application/octet-stream"))
                 for p in sorted(data.rglob("*")) if p.is_file()]
        assert client.post("/v1/datasets", json={{"name": "cats"}}, headers=auth).status_code == 201
        v = client.post("/v1/datasets/cats/versions", files=files, headers=auth)
        assert v.status_code == 201, v.text
        after_commit = loaded()
        body = {{"dataset": "cats", "version": v.json()["id"], "base_model": "tiny",
                "hyperparameters": {{"max_steps": 3, "num_frames": 4, "height": 32, "width": 32}}}}
        t0 = time.perf_counter()
        r = client.post("/v1/fine-tunes", json=body, headers=auth)
        seconds = time.perf_counter() - t0
        print(json.dumps({{"status": r.status_code, "seconds": seconds, "after_app": after_app,
                           "after_commit": after_commit, "after_create": loaded()}}))
        """
    )
    print(f"first fine-tune create: {out['seconds']:.3f} s")
    assert out["status"] == 201
    assert out["after_app"] == out["after_commit"] == out["after_create"] == []


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_server_dependencies_are_an_extra_not_base_requirements() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(r) for r in project["dependencies"]}
    server = {_name(r) for r in project["optional-dependencies"]["server"]}
    assert sorted(base & set(SERVER_ONLY)) == []
    assert sorted(set(SERVER_ONLY) - server) == []
    assert {"torch", "diffusers", "av"} <= base  # the library itself stays installable alone
