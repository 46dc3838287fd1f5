"""deploy/ hangs together: what the manifests say matches what the services read and each other.

Every kustomization is rendered with the pinned kubectl (deploy/tools/check.py) and the objects are
cross-checked: one image, commands that name real service modules, env names that are fields of the
settings classes (and values they accept), ports, Service/PDB/NetworkPolicy selectors, Secret keys,
ServiceAccounts, RBAC, pod security, the trainer Job template, the GPU overlay, and the monitoring
files against the metric names the services register.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices

from tests.deploytools import check

ROOT = Path(__file__).resolve().parents[2]
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    try:
        kubectl = check.find_kubectl(fetch=True)
    except check.ToolMissing as exc:
        pytest.skip(str(exc))
    return check.render_all(kubectl)


ENVIRONMENTS = (
    "deploy",
    "deploy/overlays/cpu-dev",
    "deploy/overlays/gpu",
    "deploy/overlays/prometheus-operator",
)


# Cluster-scoped kinds the manifests hold (kustomize puts a namespace on the admission policies, which
# it does not know to be cluster-scoped; the API server ignores it).
CLUSTER_SCOPED = {
    "Namespace",
    "PriorityClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


# ------------------------------------------------------------------------------------------ helpers
def by_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = by_kind(objects, kind)
    assert name in found, f"{kind}/{name} missing (have {sorted(found)})"
    return found[name]


def configmap(objects: list[Obj], name: str) -> Obj:
    """The ConfigMap generated as ``name`` (kustomize appends a content hash to the name)."""
    found = [
        o for n, o in by_kind(objects, "ConfigMap").items() if re.fullmatch(rf"{name}(-[a-z0-9]{{10}})?", n)
    ]
    assert len(found) == 1, f"ConfigMap {name}: {len(found)} found"
    return found[0]


def pods(objects: list[Obj]) -> Iterator[tuple[str, dict[str, str], Obj, Obj]]:
    """(workload id, pod labels, pod metadata, pod spec) of every workload, including the trainer Job
    the control plane builds from the settings these manifests give it."""
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            t = o["spec"]["template"]
            yield (
                f"{o['kind']}/{o['metadata']['name']}",
                t["metadata"].get("labels", {}),
                t["metadata"],
                t["spec"],
            )
    for job in check.trainer_jobs(objects):
        t = job["spec"]["template"]
        yield "trainer-job", t["metadata"]["labels"], t["metadata"], t["spec"]


def containers(spec: Obj) -> list[Obj]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def component_pod(objects: list[Obj], component: str) -> tuple[dict[str, str], Obj, Obj]:
    matches = [
        (lab, meta, spec)
        for _, lab, meta, spec in pods(objects)
        if lab.get("app.kubernetes.io/component") == component
    ]
    assert len(matches) == 1, f"expected one {component} pod template, found {len(matches)}"
    return matches[0]


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions, or a plain map)."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values):
            return False
        if (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def container_env(objects: list[Obj], container: Obj) -> dict[str, str]:
    return dict(check.container_env(objects, container))


def settings_classes() -> dict[str, Any]:
    from services.common import settings

    return {
        "HUVIDPO_STORE_": settings.StoreSettings,
        "HUVIDPO_CONTROLPLANE_": settings.ControlPlaneSettings,
        "HUVIDPO_INFERENCE_": settings.InferenceSettings,
        "HUVIDPO_TRAINER_": settings.TrainerSettings,
    }


def load_settings(env: dict[str, str], prefix: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The settings object the service would build from ``env`` (pydantic validates every value)."""
    with monkeypatch.context() as m:
        for key in list(os.environ):
            if key.startswith("HUVIDPO_"):
                m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        return settings_classes()[prefix]()


def huvidpo_containers(objects: list[Obj]) -> list[tuple[str, Obj]]:
    return [
        (wid, c)
        for wid, _, _, spec in pods(objects)
        for c in containers(spec)
        if c["image"].split("/")[-1].startswith("huvidpo")
    ]


# -------------------------------------------------------------------------------------- the system
def test_every_environment_renders_the_whole_system(rendered: dict[str, list[Obj]]) -> None:
    assert set(ENVIRONMENTS) <= set(rendered)
    for env in ENVIRONMENTS:
        objs = rendered[env]
        assert {o["metadata"].get("namespace") for o in objs if o["kind"] not in CLUSTER_SCOPED} == {
            "huvidpo"
        }
        one(objs, "Namespace", "huvidpo")
        minio = one(objs, "StatefulSet", "huvidpo-minio")
        assert minio["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
        one(objs, "Service", "huvidpo-minio")
        one(objs, "Job", "huvidpo-bucket-init")
        for name in ("huvidpo-controlplane", "huvidpo-inference"):
            one(objs, "Deployment", name)
            one(objs, "Service", name)
            one(objs, "ServiceAccount", name)
            one(objs, "PodDisruptionBudget", name)
        one(objs, "Role", "huvidpo-controlplane")
        one(objs, "RoleBinding", "huvidpo-controlplane")
        assert len(check.trainer_jobs(objs)) == 1
        assert len(by_kind(objs, "NetworkPolicy")) >= 5
    # `kubectl apply -k deploy/` is the cpu-dev environment, object for object.
    assert rendered["deploy"] == rendered["deploy/overlays/cpu-dev"]


def test_huvidpo_containers_share_one_image_that_trainer_jobs_also_get(
    rendered: dict[str, list[Obj]],
) -> None:
    tags = {"deploy/overlays/cpu-dev": "-cpu", "deploy/overlays/gpu": "-cuda", "deploy": "-cpu"}
    for env in ENVIRONMENTS:
        objs = rendered[env]
        deployed = {c["image"] for wid, c in huvidpo_containers(objs) if wid != "trainer-job"}
        assert len(deployed) == 1, f"{env}: several huvidpo images {deployed}"
        (image,) = deployed
        assert image.endswith(tags.get(env, "-cuda")), (env, image)
        # Trainer Jobs get the inference image (a kustomize replacement keeps them equal; see
        # test_deploy_check.py for an overlay whose control plane runs another image).
        cp_config = configmap(objs, "huvidpo-controlplane")
        assert cp_config["data"]["HUVIDPO_CONTROLPLANE_TRAINER_IMAGE"] == image
        (job,) = check.trainer_jobs(objs)
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == image
        # Laptop clusters load the image locally; production pulls every time (the node checks the
        # namespace's right to a private image instead of reusing its cache).
        policy = "IfNotPresent" if env in check.DEV_RENDERS else "Always"
        for _, c in huvidpo_containers(objs):
            assert c.get("imagePullPolicy") == policy


def test_third_party_images_are_pinned_releases(rendered: dict[str, list[Obj]]) -> None:
    for env in ENVIRONMENTS:
        for wid, _, _, spec in pods(rendered[env]):
            for c in containers(spec):
                if c["image"].split("/")[-1].startswith("huvidpo"):
                    continue
                name, _, tag = c["image"].rpartition(":")
                assert name and re.fullmatch(r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", tag), (
                    wid,
                    c["image"],
                )


def test_commands_run_the_service_modules(rendered: dict[str, list[Obj]]) -> None:
    expected = {
        "controlplane": "services.controlplane",
        "inference": "services.inference",
        "trainer": "services.trainer",
    }
    for env in ENVIRONMENTS:
        for component, module in expected.items():
            _, _, spec = component_pod(rendered[env], component)
            (container,) = spec["containers"]
            assert container["name"] == component
            assert container["command"] == ["python", "-m", module]
            assert importlib.util.find_spec(module + ".__main__") is not None, f"{module} has no __main__"


# ---------------------------------------------------------------------------------------- settings
def test_env_names_are_fields_of_the_settings_classes(rendered: dict[str, list[Obj]]) -> None:
    classes = settings_classes()
    # settings both services read under one name, whatever their prefix (HUVIDPO_TOKENS, _DEV_MODE)
    aliases = {
        choice
        for cls in classes.values()
        for f in cls.model_fields.values()
        if isinstance(f.validation_alias, AliasChoices)
        for choice in f.validation_alias.choices
        if isinstance(choice, str) and choice.startswith("HUVIDPO_")
    }
    seen = set()
    for env in ENVIRONMENTS:
        objs = rendered[env]
        for wid, c in huvidpo_containers(objs):
            for name in container_env(objs, c):
                if not name.startswith("HUVIDPO_"):
                    continue
                if name in aliases:
                    seen.add(name)
                    continue
                prefix = next((p for p in classes if name.startswith(p)), None)
                assert prefix is not None, f"{wid}: {name} has no settings class"
                field = name[len(prefix) :].lower()
                assert field in classes[prefix].model_fields, (
                    f"{wid}: {name} is not a field of {classes[prefix].__name__}"
                )
                seen.add(name)
    # The manifests do configure each service (not just pass the check vacuously).
    for must in (
        "HUVIDPO_STORE_ENDPOINT",
        "HUVIDPO_STORE_SECRET_KEY",
        "HUVIDPO_CONTROLPLANE_EXECUTOR",
        "HUVIDPO_INFERENCE_BASE_MODEL",
        "HUVIDPO_TRAINER_FINETUNE_ID",
    ):
        assert must in seen


def test_settings_accept_the_values_each_container_gets(
    rendered: dict[str, list[Obj]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        for component in ("controlplane", "inference", "trainer"):
            _, _, spec = component_pod(objs, component)
            values = container_env(objs, spec["containers"][0])
            store = load_settings(values, "HUVIDPO_STORE_", monkeypatch)
            assert store.backend == "s3"
            assert store.access_key.get_secret_value() and store.secret_key.get_secret_value()
            own = load_settings(values, f"HUVIDPO_{component.upper()}_", monkeypatch)
            if component == "controlplane":
                assert own.executor == "kubernetes" and own.namespace == "huvidpo" and own.tokens
                assert own.host == "0.0.0.0"
            if component == "inference":
                assert own.host == "0.0.0.0"
                assert own.base_model.startswith("models/")
            if component == "trainer":
                assert str(own.work_dir) in {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
            if component == "inference":
                assert str(own.cache_dir) in {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    gpu = rendered["deploy/overlays/gpu"]
    _, _, spec = component_pod(gpu, "inference")
    assert (
        load_settings(container_env(gpu, spec["containers"][0]), "HUVIDPO_INFERENCE_", monkeypatch).device
        == "cuda"
    )


def test_container_ports_are_the_ports_the_services_listen_on(
    rendered: dict[str, list[Obj]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        _, meta, spec = component_pod(objs, "controlplane")
        c = spec["containers"][0]
        cp = load_settings(container_env(objs, c), "HUVIDPO_CONTROLPLANE_", monkeypatch)
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": cp.port}
        assert meta["annotations"]["prometheus.io/port"] == str(cp.port)
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["port"] == "http"
        assert (c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]) == (
            "/readyz",
            "/healthz",
        )

        _, meta, spec = component_pod(objs, "inference")
        c = spec["containers"][0]
        inf = load_settings(container_env(objs, c), "HUVIDPO_INFERENCE_", monkeypatch)
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
            "grpc": inf.port,
            "metrics": inf.metrics_port,
        }
        assert meta["annotations"]["prometheus.io/port"] == str(inf.metrics_port)
        # Ready = the gRPC health service says SERVING, which it does once the model is loaded.
        assert c["readinessProbe"]["grpc"]["port"] == inf.port
        assert spec["terminationGracePeriodSeconds"] > inf.grace_seconds


def test_store_endpoint_is_the_minio_service(rendered: dict[str, list[Obj]]) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        endpoint = configmap(objs, "huvidpo-store")["data"]["HUVIDPO_STORE_ENDPOINT"]
        host, port = endpoint.split(":")
        svc = one(objs, "Service", host)
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
        minio = one(objs, "StatefulSet", "huvidpo-minio")["spec"]["template"]["spec"]["containers"][0]
        assert int(port) in {p["containerPort"] for p in minio["ports"]}
        assert (
            "--address" in minio["args"] and minio["args"][minio["args"].index("--address") + 1] == f":{port}"
        )


# -------------------------------------------------------------------------------------- references
def test_every_reference_resolves(rendered: dict[str, list[Obj]]) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        cms, secrets, sas = (
            by_kind(objs, "ConfigMap"),
            by_kind(objs, "Secret"),
            by_kind(objs, "ServiceAccount"),
        )
        # Production overlays reference the Secrets the deployer creates (deploy/README.md).
        external = check.EXTERNAL_SECRETS if env in check.production_renders(rendered) else {}
        claims = {
            f"StatefulSet/{name}": {t["metadata"]["name"] for t in o["spec"].get("volumeClaimTemplates", [])}
            for name, o in by_kind(objs, "StatefulSet").items()
        }
        for wid, _, _, spec in pods(objs):
            sa = spec.get("serviceAccountName")
            assert sa is None or sa in sas, f"{wid}: ServiceAccount {sa} missing"
            for vol in spec.get("volumes", []):
                if "configMap" in vol:
                    assert vol["configMap"]["name"] in cms, (wid, vol)
                if "secret" in vol:
                    assert vol["secret"]["secretName"] in secrets | external, (wid, vol)
            mounts_ok = {v["name"] for v in spec.get("volumes", [])} | claims.get(wid, set())
            for c in containers(spec):
                assert {m["name"] for m in c.get("volumeMounts", [])} <= mounts_ok, wid
                for src in c.get("envFrom", []):
                    assert src["configMapRef"]["name"] in cms, (wid, src)
                for var in c.get("env", []):
                    ref = var.get("valueFrom", {})
                    if "secretKeyRef" in ref:
                        r = ref["secretKeyRef"]
                        keys = secrets[r["name"]]["data"] if r["name"] in secrets else external.get(r["name"])
                        assert keys is not None, (wid, r)
                        assert r["key"] in keys, f"{wid}: Secret {r['name']} has no key {r['key']}"
        binding = one(objs, "RoleBinding", "huvidpo-controlplane")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "huvidpo-controlplane",
        }
        assert binding["roleRef"]["name"] in by_kind(objs, "Role")
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["name"] in sas
            assert (
                subject["namespace"] == one(objs, "ServiceAccount", subject["name"])["metadata"]["namespace"]
            )
        _, _, cp_spec = component_pod(objs, "controlplane")
        assert {s["name"] for s in binding["subjects"]} == {cp_spec["serviceAccountName"]}


def test_only_cpu_dev_generates_secrets_from_committed_dev_env_files(rendered: dict[str, list[Obj]]) -> None:
    base = yaml.safe_load((ROOT / "deploy/base/kustomization.yaml").read_text())
    assert "secretGenerator" not in base
    dev = yaml.safe_load((ROOT / "deploy/overlays/cpu-dev/kustomization.yaml").read_text())
    generated = {g["name"]: g for g in dev["secretGenerator"]}
    stores = {f"huvidpo-store-{c}" for c in ("root", "controlplane", "trainer", "inference")}
    assert set(generated) == set(check.EXTERNAL_SECRETS) == {*stores, "huvidpo-controlplane-auth"}
    for g in generated.values():
        assert "literals" not in g and all(f.endswith(".dev.env") for f in g["envs"])
    for env in ("deploy", "deploy/overlays/cpu-dev"):
        secret_names = set(by_kind(rendered[env], "Secret"))
        assert {
            n.rsplit("-", 1)[0] if n.startswith("huvidpo-controlplane-auth") else n for n in secret_names
        } == set(generated)
    production = check.production_renders(rendered)
    assert set(production) == {
        "deploy/overlays/gpu",
        "deploy/overlays/prometheus-operator",
        "deploy/overlays/gateway-example",
        "deploy/overlays/gpu-keda",
        "deploy/overlays/gpu-hpa",
    }
    for env, objs in production.items():
        assert not by_kind(objs, "Secret"), env


def test_cpu_dev_gives_each_store_user_its_own_key(rendered: dict[str, list[Obj]]) -> None:
    """Distinct dev keys per component (the bucket-init Job makes each its own MinIO user), none the root's."""
    for env in ("deploy", "deploy/overlays/cpu-dev"):
        secrets = by_kind(rendered[env], "Secret")
        for name, stand_in in check.EXTERNAL_SECRETS.items():  # the keys require-secrets demands
            if name.startswith("huvidpo-store-"):
                assert set(secrets[name]["data"]) == set(stand_in), name
        keys = {
            c: base64.b64decode(secrets[f"huvidpo-store-{c}"]["data"]["access-key"]).decode()
            for c in ("root", "controlplane", "trainer", "inference")
        }
        assert len(set(keys.values())) == 4, keys
        job = one(rendered[env], "Job", "huvidpo-bucket-init")
        refs = {
            v["valueFrom"]["secretKeyRef"]["name"]
            for v in job["spec"]["template"]["spec"]["containers"][0]["env"]
            if "secretKeyRef" in v.get("valueFrom", {})
        }
        assert refs == {f"huvidpo-store-{c}" for c in keys}


def test_services_and_budgets_select_their_pods(rendered: dict[str, list[Obj]]) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        for svc in by_kind(objs, "Service").values():
            targets = [
                (wid, spec) for wid, labels, _, spec in pods(objs) if selects(svc["spec"]["selector"], labels)
            ]
            assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {[t[0] for t in targets]}"
            ports = {p.get("name") for c in targets[0][1]["containers"] for p in c.get("ports", [])}
            ports |= {p["containerPort"] for c in targets[0][1]["containers"] for p in c.get("ports", [])}
            for p in svc["spec"]["ports"]:
                assert p["targetPort"] in ports, (svc["metadata"]["name"], p)
        for kind in ("Deployment", "StatefulSet"):
            for o in by_kind(objs, kind).values():
                assert selects(o["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"])
        for pdb in by_kind(objs, "PodDisruptionBudget").values():
            workloads = [
                o
                for o in by_kind(objs, "Deployment").values()
                if selects(pdb["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"])
            ]
            assert len(workloads) == 1
            assert pdb["spec"]["minAvailable"] >= 1


# ------------------------------------------------------------------------------ network and RBAC
def _policies_for(objs: list[Obj], labels: dict[str, str]) -> list[Obj]:
    return [p for p in by_kind(objs, "NetworkPolicy").values() if selects(p["spec"]["podSelector"], labels)]


def _ingress_ports(objs: list[Obj], labels: dict[str, str]) -> dict[int, list[list[Obj]]]:
    """Allowed ingress port -> the ``from`` lists that allow it ([] = from anywhere)."""
    out: dict[int, list[list[Obj]]] = {}
    for pol in _policies_for(objs, labels):
        for rule in pol["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                out.setdefault(port["port"], []).append(rule.get("from", []))
    return out


def _egress(objs: list[Obj], labels: dict[str, str]) -> list[Obj]:
    return [rule for pol in _policies_for(objs, labels) for rule in pol["spec"].get("egress", [])]


def test_network_policies_allow_only_the_designed_traffic(rendered: dict[str, list[Obj]]) -> None:
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    for env in ENVIRONMENTS:
        objs = rendered[env]
        policies = by_kind(objs, "NetworkPolicy")
        deny = policies["default-deny-all"]["spec"]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
        dns = policies["allow-dns-egress"]["spec"]
        assert dns["podSelector"] == {} and {p["port"] for p in dns["egress"][0]["ports"]} == {53}

        minio_labels, _, minio_spec = component_pod(objs, "minio")
        minio_port = minio_spec["containers"][0]["ports"][0]["containerPort"]
        minio_from = _ingress_ports(objs, minio_labels)
        assert set(minio_from) == {minio_port}
        for wid, labels, _, spec in pods(objs):
            own_ports = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
            ingress = _ingress_ports(objs, labels)
            # Every port a policy opens exists on the pod, and every port the pod serves is opened.
            assert set(ingress) == own_ports, f"{wid}: policies open {set(ingress)}, pod serves {own_ports}"
            uses_store = any("HUVIDPO_STORE_ENDPOINT" in container_env(objs, c) for c in containers(spec))
            to_minio = [
                r
                for r in _egress(objs, labels)
                if any(
                    selects(t.get("podSelector", {"matchLabels": {"x": "none"}}), minio_labels)
                    for t in r.get("to", [])
                )
            ]
            if uses_store:
                assert to_minio and {p["port"] for r in to_minio for p in r["ports"]} == {minio_port}, wid
                assert any(
                    "namespaceSelector" not in f and selects(f["podSelector"], labels)
                    for froms in minio_from[minio_port]
                    for f in froms
                ), f"{wid} may not reach MinIO"
            else:
                assert not to_minio, wid
            ip_egress = [r for r in _egress(objs, labels) if any("ipBlock" in t for t in r.get("to", []))]
            if labels["app.kubernetes.io/component"] == "controlplane":
                assert {p["port"] for r in ip_egress for p in r["ports"]} == {443, 6443}  # the Kubernetes API
            else:
                assert not ip_egress, f"{wid} has egress outside the cluster"
            # Prometheus reaches every metrics port it is told to scrape.
            annotations = next(m for w, _, m, _ in pods(objs) if w == wid).get("annotations", {})
            if annotations.get("prometheus.io/scrape") == "true":
                froms = ingress[int(annotations["prometheus.io/port"])]
                assert any(
                    f == [] or any(selects(x.get("podSelector", {}), prometheus) for x in f) for f in froms
                ), wid
        # Clients reach the APIs from anywhere; only Prometheus reaches the inference metrics port.
        inf_labels, _, inf_spec = component_pod(objs, "inference")
        inf_ports = {p["name"]: p["containerPort"] for p in inf_spec["containers"][0]["ports"]}
        assert _ingress_ports(objs, inf_labels)[inf_ports["grpc"]] == [[]]
        assert [] not in _ingress_ports(objs, inf_labels)[inf_ports["metrics"]]


_CLIENT_VERBS = {
    "create": "create",
    "read": "get",
    "list": "list",
    "delete": "delete",
    "patch": "patch",
    "replace": "update",
}
# What follows ``_namespaced_`` in a client method's name: (api group, resource[/subresource]).
# The executors' only custom objects are Kubeflow Trainer TrainJobs (executors/trainjob.py).
_CLIENT_RESOURCES = {
    "job": ("batch", "jobs"),
    "job_status": ("batch", "jobs/status"),
    "pod": ("", "pods"),
    "pod_log": ("", "pods/log"),
    "service": ("", "services"),
    "network_policy": ("networking.k8s.io", "networkpolicies"),
    "custom_object": ("trainer.kubeflow.org", "trainjobs"),
}


def _api_calls_of_the_control_plane() -> set[tuple[str, str, str]]:
    """(api group, resource, verb) of every Kubernetes API call in the control plane's executors.

    Calls look like ``self.batch.read_namespaced_job_status``: verb, ``namespaced``, resource and an
    optional subresource; a ``watch.Watch().stream(list_...)`` also needs ``watch``.
    """
    needed = set()
    for path in (ROOT / "services/controlplane/executors").glob("*.py"):
        text = path.read_text()
        for verb, resource in re.findall(
            r"\.(create|read|list|delete|patch|replace)_namespaced_([a-z_]+)\b", text
        ):
            group, plural = _CLIENT_RESOURCES[resource]
            needed.add((group, plural, _CLIENT_VERBS[verb]))
        for resource in re.findall(r"stream\(\s*self\.\w+\.list_namespaced_([a-z_]+)", text):
            group, plural = _CLIENT_RESOURCES[resource]
            needed.add((group, plural, "watch"))
    return needed


def test_control_plane_role_grants_what_its_code_calls_and_nothing_more(
    rendered: dict[str, list[Obj]],
) -> None:
    needed = _api_calls_of_the_control_plane()
    assert ("batch", "jobs", "create") in needed and ("batch", "jobs", "watch") in needed
    for env in ENVIRONMENTS:
        objs = rendered[env]
        assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
        (role,) = by_kind(objs, "Role").values()
        granted = {
            (group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
        assert "*" not in {x for g in granted for x in g}
        assert needed <= granted, f"the control plane calls {sorted(needed - granted)} without permission"
        assert granted - needed == set(), f"granted but never used: {sorted(granted - needed)}"
        for wid, labels, _, spec in pods(objs):
            mounts_token = spec.get("automountServiceAccountToken", True)
            assert mounts_token == (labels["app.kubernetes.io/component"] == "controlplane"), wid


# -------------------------------------------------------------------------------------- security
def test_every_pod_is_locked_down(rendered: dict[str, list[Obj]]) -> None:
    for env in ENVIRONMENTS:
        for wid, _, _, spec in pods(rendered[env]):
            sc = spec["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] >= 1000, wid
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, wid
            tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
            for c in containers(spec):
                csc = c["securityContext"]
                assert csc["allowPrivilegeEscalation"] is False, (wid, c["name"])
                assert csc["readOnlyRootFilesystem"] is True, (wid, c["name"])
                assert csc["capabilities"] == {"drop": ["ALL"]}, (wid, c["name"])
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]), (wid, c["name"])
                # The control plane sets no CPU limit on trainer Jobs (training may use every idle
                # core); every other container is capped in both.
                capped = {"memory"} if wid == "trainer-job" else {"cpu", "memory"}
                assert capped <= set(c["resources"]["limits"]), (wid, c["name"])
                # With a read-only root, /tmp must be a writable volume.
                tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp and tmp[0]["name"] in tmp_volumes, (wid, c["name"])
    ns = one(rendered["deploy"], "Namespace", "huvidpo")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_inference_rollouts_never_drop_serving_capacity(rendered: dict[str, list[Obj]]) -> None:
    # On GPUs inference replaces pods one at a time instead (maxSurge 0, no spare GPU needed; the
    # PodDisruptionBudget and two replicas keep one serving): tests/unit/test_deploy_autoscaling.py.
    gpu = {"deploy/overlays/gpu", "deploy/overlays/prometheus-operator"}
    for env in ENVIRONMENTS:
        objs = rendered[env]
        for name in (
            ("huvidpo-controlplane",) if env in gpu else ("huvidpo-inference", "huvidpo-controlplane")
        ):
            strategy = one(objs, "Deployment", name)["spec"]["strategy"]
            assert strategy["type"] == "RollingUpdate"
            assert (
                strategy["rollingUpdate"]["maxUnavailable"] == 0
                and strategy["rollingUpdate"]["maxSurge"] >= 1
            )


# ---------------------------------------------------------------------------------------- trainer
def test_trainer_jobs_map_the_exit_codes_and_run_as_the_trainer(rendered: dict[str, list[Obj]]) -> None:
    from services.common.records.exit_codes import ExitCode

    for env in ENVIRONMENTS:
        (job,) = check.trainer_jobs(rendered[env])
        spec = job["spec"]
        assert job["metadata"]["namespace"] == "huvidpo"
        assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
        assert spec["backoffLimit"] >= 1
        rules = spec["podFailurePolicy"]["rules"]
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert [r["onExitCodes"] for r in fail] == [
            {"containerName": "trainer", "operator": "In", "values": [ExitCode.BAD_INPUT]}
        ]
        assert any(
            r["action"] == "Count" and r["onExitCodes"]["values"] == [ExitCode.TRANSIENT] for r in rules
        )
        assert any(
            r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules
        )
        pod = spec["template"]["spec"]
        assert pod["serviceAccountName"] == "huvidpo-trainer"
        assert pod["containers"][0]["resources"]["limits"]["memory"]


def test_gpu_overlay_puts_inference_and_training_on_gpus(rendered: dict[str, list[Obj]]) -> None:
    gpu, cpu = rendered["deploy/overlays/gpu"], rendered["deploy/overlays/cpu-dev"]
    (gpu_job,) = check.trainer_jobs(gpu)
    for spec in (component_pod(gpu, "inference")[2], gpu_job["spec"]["template"]["spec"]):
        res = spec["containers"][0]["resources"]
        assert str(res["limits"]["nvidia.com/gpu"]) == "1" and str(res["requests"]["nvidia.com/gpu"]) == "1"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    env = {e["name"]: e.get("value") for e in gpu_job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HUVIDPO_TRAINER_DEVICE"] == "cuda"
    for _, _, _, spec in pods(cpu):
        assert "nodeSelector" not in spec and "tolerations" not in spec
        assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(spec))


def test_cpu_dev_seeds_the_base_model_the_inference_server_loads(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["deploy/overlays/cpu-dev"]
    seed = one(objs, "Job", "huvidpo-seed-tiny-model")["spec"]["template"]["spec"]
    (init,) = seed["initContainers"]
    assert init["command"][:2] == ["huvidpo", "init-tiny"]
    (publish,) = seed["containers"]
    model_dir, prefix = publish["command"][-2:]
    assert init["command"][2] == model_dir
    base_model = configmap(objs, "huvidpo-inference")
    assert base_model["data"]["HUVIDPO_INFERENCE_BASE_MODEL"] == prefix


def test_seed_script_publishes_a_model_that_fetches_and_loads(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from huvidpo.models import directory_digest, load_components
    from services.common.publish import fetch_published
    from services.common.settings import StoreSettings
    from services.common.store import make_store

    script = ROOT / "deploy/overlays/cpu-dev/publish_model.py"
    spec = importlib.util.spec_from_file_location("huvidpo_publish_model", script)
    assert spec is not None and spec.loader is not None
    publish_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publish_model)
    monkeypatch.setenv("HUVIDPO_STORE_BACKEND", "local")
    monkeypatch.setenv("HUVIDPO_STORE_ROOT", str(tmp_path / "store"))

    assert publish_model.main([str(tiny_model_dir), "models/tiny"]) == 0
    assert publish_model.main([str(tiny_model_dir), "models/tiny"]) == 0  # a re-run Job is harmless
    assert "already published" in capsys.readouterr().out
    store = make_store(StoreSettings(backend="local", root=tmp_path / "store"))
    manifest = fetch_published(store, "models/tiny", tmp_path / "fetched")
    assert manifest["digest"] == directory_digest(tiny_model_dir)
    assert directory_digest(tmp_path / "fetched") == directory_digest(tiny_model_dir)
    assert load_components(tmp_path / "fetched", "cpu").unet is not None
    # Not a model directory: bad input, exit 2 (as the script runs in the Job), so it is not retried.
    bad = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store"), "models/x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2, bad.stderr


# ------------------------------------------------------------------------------------- monitoring
def _registered_metric_names() -> set[str]:
    """Every ``huvidpo_*`` metric name a service registers (string literals in services/)."""
    names: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        if "gen" in path.parts:
            continue
        names |= set(re.findall(r"[\"'](huvidpo_[a-z0-9_]+)[\"']", path.read_text()))
    return names


def _queried_metric_names(text: str) -> set[str]:
    found = set(re.findall(r"\b(huvidpo_[a-z0-9_]+)", text))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in found if not n.endswith("_")}


def test_alerts_and_dashboard_query_metrics_the_services_export() -> None:
    registered = _registered_metric_names()
    assert registered, "no huvidpo_ metrics found in services/"
    alerts = (ROOT / "deploy/monitoring/alerts.yml").read_text()
    dashboard = (ROOT / "deploy/monitoring/grafana-dashboard.json").read_text()
    exprs = [t["expr"] for p in json.loads(dashboard)["panels"] for t in p.get("targets", [])]
    for source, text in (("alerts.yml", alerts), ("grafana-dashboard.json", "\n".join(exprs))):
        missing = _queried_metric_names(text) - registered
        assert not missing, f"{source} queries metrics no service registers: {sorted(missing)}"
    names = {r["alert"] for g in yaml.safe_load(alerts)["groups"] for r in g["rules"]}
    assert names == {
        "HuViDPOFineTuneFailed",
        "HuViDPORolloutAutoRollback",
        "HuViDPOInferenceErrorRatioHigh",
        "HuViDPOGenerationLatencyHigh",
        "HuViDPORolloutRefused",
        "HuViDPONoModelLoaded",
    }


def test_prometheus_rule_is_generated_from_alerts_file() -> None:
    assert check.PROMETHEUS_RULE.read_text() == check.prometheus_rule_text()


def test_scrape_configs_cover_every_component_that_serves_metrics(rendered: dict[str, list[Obj]]) -> None:
    config = yaml.safe_load((ROOT / "deploy/monitoring/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    objs = rendered["deploy/overlays/prometheus-operator"]
    serving = {
        labels["app.kubernetes.io/component"]
        for _, labels, meta, _ in pods(objs)
        if meta.get("annotations", {}).get("prometheus.io/scrape") == "true"
    }
    assert serving == {"controlplane", "inference", "trainer"}
    assert set(jobs) == {f"huvidpo-{c}" for c in serving}
    for component in serving:
        (sd,) = jobs[f"huvidpo-{component}"]["kubernetes_sd_configs"]
        assert sd["namespaces"]["names"] == ["huvidpo"]
        wanted = dict(kv.split("=") for kv in sd["selectors"][0]["label"].split(","))
        labels, _, _ = component_pod(objs, component)
        assert selects(wanted, labels)
    # Prometheus Operator: each monitor selects real pods/services and names ports they have.
    services = by_kind(objs, "Service")
    monitored = set()
    for sm in by_kind(objs, "ServiceMonitor").values():
        (svc,) = [s for s in services.values() if selects(sm["spec"]["selector"], s["metadata"]["labels"])]
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
        monitored.add(svc["metadata"]["labels"]["app.kubernetes.io/component"])
    for pm in by_kind(objs, "PodMonitor").values():
        targets = [(lab, spec) for _, lab, _, spec in pods(objs) if selects(pm["spec"]["selector"], lab)]
        assert len(targets) == 1, pm["metadata"]["name"]
        ports = {p["name"] for c in targets[0][1]["containers"] for p in c.get("ports", [])}
        assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports, pm["metadata"]["name"]
        monitored.add(targets[0][0]["app.kubernetes.io/component"])
    assert monitored == serving
    # Operator job names equal the plain-Prometheus job names, so alerts and dashboard fit both.
    operator_jobs = {
        r["replacement"]
        for m in [*by_kind(objs, "ServiceMonitor").values(), *by_kind(objs, "PodMonitor").values()]
        for e in m["spec"].get("endpoints", m["spec"].get("podMetricsEndpoints", []))
        for r in e["relabelings"]
        if r.get("targetLabel") == "job"
    }
    assert operator_jobs == set(jobs)
