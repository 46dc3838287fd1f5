"""deploy/ is secure by default: what the rendered objects allow, checked on the objects themselves.

- Secrets: only overlays/cpu-dev generates them; production overlays reference the Secrets the
  deployer creates, and an admission policy refuses the workloads while one is missing.
- NetworkPolicies: the store's port only from the components and the ingress controller's namespace;
  the control plane's API-server egress limited to private addresses; Prometheus selected by
  namespace and label; no peer that means "every namespace".
- Trainer Jobs: a ValidatingAdmissionPolicy pins what the control plane may create. Its CEL rules are
  evaluated here with cel-python (module ``celpy``) on the Job the control plane really builds and
  on refused variants. cel-python is not the API server's CEL (cel-go plus the Kubernetes
  libraries). Where they differ, for these rules:
    * cel-python has none of the Kubernetes extension libraries (``quantity()``, ``lists``, regex
      ``format``...): the rules avoid them (GPU counts are compared as ``int(string(q))``, which both
      evaluate alike for whole numbers; a fractional quantity is an evaluation error in both, so
      refused);
    * the API server type-checks expressions against the OpenAPI schema before use (a misspelt field
      is a policy error there); cel-python evaluates untyped JSON, so a misspelt field only shows up
      as a ``has()`` that is false or a missing-key error: the refused cases below would catch a
      rule that no longer reads the field it should;
    * the API server bounds cost and runtime; cel-python does not;
    * ``params`` and ``request`` are built here as the API server would pass them (the ConfigMap as
      rendered, ``request.userInfo.username`` and ``request.namespace``).
- ResourceQuota, LimitRange and PriorityClasses, and the control plane's scratch volume.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.settings import ControlPlaneSettings
from tests.deploytools import check

ROOT = Path(__file__).resolve().parents[2]
Obj = dict[str, Any]
CONTROLPLANE_SA = "system:serviceaccount:huvidpo:huvidpo-controlplane"
ENVIRONMENTS = (
    "deploy/overlays/cpu-dev",
    "deploy/overlays/gpu",
    "deploy/overlays/prometheus-operator",
    "deploy/overlays/gateway-example",
)
# The ports clients reach from anywhere: the control plane's REST API and the inference gRPC API.
PUBLIC_PORTS = {"controlplane": {8080}, "inference": {50051}}


@pytest.fixture(scope="module")
def kubectl() -> Path:
    try:
        return Path(check.find_kubectl(fetch=True))
    except check.ToolMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def rendered(kubectl: Path) -> dict[str, list[Obj]]:
    return check.render_all(kubectl)


def by_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
        if expr["operator"] != "In":
            raise AssertionError(f"operator {expr['operator']} not modelled here")
    return True


def pod_templates(objects: list[Obj]) -> list[tuple[str, dict[str, str], Obj]]:
    """(workload, pod labels, pod spec) of every workload and of the trainer Job."""
    out = []
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            t = o["spec"]["template"]
            out.append((f"{o['kind']}/{o['metadata']['name']}", t["metadata"]["labels"], t["spec"]))
    for job in check.trainer_jobs(objects):
        t = job["spec"]["template"]
        out.append(("trainer-job", t["metadata"]["labels"], t["spec"]))
    return out


def component(objects: list[Obj], name: str) -> tuple[dict[str, str], Obj]:
    (found,) = [
        (lab, spec) for _, lab, spec in pod_templates(objects) if lab["app.kubernetes.io/component"] == name
    ]
    return found


def quantity(q: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    assert m, q
    return float(m[1]) * units.get(m[2], 1)


# ------------------------------------------------------------------------------------------ secrets
def test_production_overlays_reference_secrets_they_do_not_generate(rendered: dict[str, list[Obj]]) -> None:
    production = check.production_renders(rendered)
    assert len(production) >= 3
    for env, objs in production.items():
        assert not by_kind(objs, "Secret"), env
        referenced = set()
        for _, _, spec in pod_templates(objs):
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                for var in c.get("env", []):
                    if "secretKeyRef" in var.get("valueFrom", {}):
                        referenced.add(var["valueFrom"]["secretKeyRef"]["name"])
        # Exactly the documented, per-component Secrets (the trainer's through the control plane).
        assert referenced == set(check.EXTERNAL_SECRETS), env
        # Each one has a binding that denies every workload while it is missing.
        bindings = by_kind(objs, "ValidatingAdmissionPolicyBinding")
        required = {
            b["spec"]["paramRef"]["name"]: b
            for b in bindings.values()
            if b["spec"]["policyName"] == "huvidpo-require-secrets"
        }
        assert set(required) == referenced, env
        for name, b in required.items():
            assert b["metadata"]["name"].endswith(name)  # the API server's refusal names the binding
            assert b["spec"]["paramRef"]["parameterNotFoundAction"] == "Deny"
            assert b["spec"]["paramRef"]["namespace"] == "huvidpo"
            assert b["spec"]["validationActions"] == ["Deny"]
        policy = by_kind(objs, "ValidatingAdmissionPolicy")["huvidpo-require-secrets"]["spec"]
        assert policy["paramKind"] == {"apiVersion": "v1", "kind": "Secret"}
        assert policy["failurePolicy"] == "Fail"
        kinds = {r for rule in policy["matchConstraints"]["resourceRules"] for r in rule["resources"]}
        assert kinds == {"deployments", "statefulsets", "jobs"}
        # `kubectl apply -k` sends objects in this order: the policy is in force before workloads.
        order = [o["kind"] for o in objs]
        last_policy = max(i for i, k in enumerate(order) if k.startswith("ValidatingAdmissionPolicy"))
        first_workload = min(i for i, k in enumerate(order) if k in ("Deployment", "StatefulSet", "Job"))
        assert last_policy < first_workload, env
    # The development overlay generates them and carries no such policy (nothing to require).
    dev = rendered["deploy/overlays/cpu-dev"]
    assert "huvidpo-require-secrets" not in by_kind(dev, "ValidatingAdmissionPolicy")


def test_require_secrets_policy_names_a_secret_without_its_keys(rendered: dict[str, list[Obj]]) -> None:
    policy = by_kind(rendered["deploy/overlays/gpu"], "ValidatingAdmissionPolicy")["huvidpo-require-secrets"]
    deployment = by_kind(rendered["deploy/overlays/gpu"], "Deployment")["huvidpo-controlplane"]
    request = {"userInfo": {"username": "admin"}, "namespace": "huvidpo"}
    for name, keys in check.EXTERNAL_SECRETS.items():
        secret = {"metadata": {"name": name}, "data": {k: "eA==" for k in keys}}
        assert evaluate(policy, deployment, secret, request) == [], name
        for key in keys:
            partial = copy.deepcopy(secret)
            del partial["data"][key]
            (message,) = evaluate(policy, deployment, partial, request)
            assert f"Secret {name} lacks its keys" in message and key in message
        assert evaluate(policy, deployment, {"metadata": {"name": name}}, request), name  # no data


# ------------------------------------------------------------------------------------------ network
def _policies_for(objs: list[Obj], labels: dict[str, str]) -> list[Obj]:
    return [p for p in by_kind(objs, "NetworkPolicy").values() if selects(p["spec"]["podSelector"], labels)]


def _peers(objs: list[Obj]) -> list[tuple[str, Obj]]:
    return [
        (p["metadata"]["name"], peer)
        for p in by_kind(objs, "NetworkPolicy").values()
        for rule in [*p["spec"].get("ingress", []), *p["spec"].get("egress", [])]
        for peer in [*rule.get("from", []), *rule.get("to", [])]
    ]


def test_no_policy_opens_a_port_to_every_namespace_except_the_public_apis(
    rendered: dict[str, list[Obj]],
) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        for name, peer in _peers(objs):
            assert peer.get("namespaceSelector") != {}, (env, name, peer)  # {} = every namespace
            if "ipBlock" in peer:
                assert ipaddress.ip_network(peer["ipBlock"]["cidr"]).prefixlen >= 8, (env, name, peer)
        for _, labels, _spec in pod_templates(objs):
            ports_open_to_all = {
                port["port"]
                for pol in _policies_for(objs, labels)
                for rule in pol["spec"].get("ingress", [])
                if not rule.get("from")
                for port in rule["ports"]
            }
            assert ports_open_to_all == PUBLIC_PORTS.get(labels["app.kubernetes.io/component"], set()), (
                env,
                labels,
            )


def test_store_port_only_from_the_components_and_the_ingress_namespace(
    rendered: dict[str, list[Obj]],
) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        minio_labels, minio_spec = component(objs, "minio")
        (port,) = [p["containerPort"] for p in minio_spec["containers"][0]["ports"]]
        users = {
            wid
            for wid, _, spec in pod_templates(objs)
            if any("HUVIDPO_STORE_ENDPOINT" in check.container_env(objs, c) for c in spec["containers"])
            or wid == "Job/huvidpo-bucket-init"
        }
        namespaces = []
        reached = set()
        for pol in _policies_for(objs, minio_labels):
            for rule in pol["spec"].get("ingress", []):
                assert {p["port"] for p in rule["ports"]} == {port}
                assert rule.get("from"), f"{env}: a rule opens the store's port to everyone"
                for peer in rule["from"]:
                    if "namespaceSelector" in peer:
                        # The ingress controller's namespace, by its name label, and nothing else.
                        assert "podSelector" not in peer and "ipBlock" not in peer
                        (key,) = peer["namespaceSelector"]["matchLabels"]
                        assert key == "kubernetes.io/metadata.name"
                        namespaces.append(peer["namespaceSelector"]["matchLabels"][key])
                        continue
                    assert set(peer) == {"podSelector"}, peer
                    selected = {w for w, lab, _ in pod_templates(objs) if selects(peer["podSelector"], lab)}
                    assert selected and selected <= users, (env, peer, selected - users)
                    reached |= selected
        assert reached == users, (env, users - reached)
        expected = "envoy-gateway-system" if env.endswith("gateway-example") else "ingress-nginx"
        assert namespaces == [expected], env


def test_ingress_namespace_setting_is_a_kustomize_patch(kubectl: Path, tmp_path: Path) -> None:
    """The patch deploy/README.md shows ("Network settings") changes the namespace the store admits."""
    readme = (ROOT / "deploy/README.md").read_text()
    block = re.search(r"```yaml\n(# my-overlay/kustomization.yaml\n.*?)```", readme, re.S)
    assert block, "deploy/README.md lost its network settings example"
    overlay = tmp_path / "deploy" / "overlays" / "mine"
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy", ignore=shutil.ignore_patterns("tools", "*.md"))
    overlay.mkdir(parents=True)
    (overlay / "kustomization.yaml").write_text(block[1].replace("../gpu", "../gpu"))
    proc = subprocess.run(
        [str(kubectl), "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    objs = [o for o in yaml.safe_load_all(proc.stdout) if o]
    policies = by_kind(objs, "NetworkPolicy")
    minio_peers = [p for r in policies["huvidpo-minio"]["spec"]["ingress"] for p in r["from"]]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "traefik"}}} in minio_peers
    api = policies["huvidpo-controlplane-apiserver"]["spec"]["egress"]
    assert [t["ipBlock"]["cidr"] for r in api for t in r["to"]] == ["10.0.0.1/32"]
    prom = policies["huvidpo-inference"]["spec"]["ingress"][1]["from"][0]
    assert prom["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "observability"}


def test_control_plane_reaches_only_the_api_server_outside_the_namespace(
    rendered: dict[str, list[Obj]],
) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        for wid, labels, _ in pod_templates(objs):
            blocks = [
                (pol["metadata"]["name"], rule)
                for pol in _policies_for(objs, labels)
                for rule in pol["spec"].get("egress", [])
                if any("ipBlock" in t for t in rule["to"])
            ]
            if labels["app.kubernetes.io/component"] != "controlplane":
                assert not blocks, (env, wid)
                continue
            assert [name for name, _ in blocks] == ["huvidpo-controlplane-apiserver"]
            (_, rule) = blocks[0]
            assert {p["port"] for p in rule["ports"]} == {443, 6443}
            for peer in rule["to"]:
                net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                assert net.is_private and not net.is_loopback, (env, net)  # never the internet


def test_prometheus_is_selected_by_namespace_and_label(rendered: dict[str, list[Obj]]) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        metrics_peers = [
            peer for _, peer in _peers(objs) if "prometheus" in yaml.safe_dump(peer.get("podSelector", {}))
        ]
        assert len(metrics_peers) >= 2, env  # inference :9090 and trainer Jobs :9091
        for peer in metrics_peers:
            # One peer with both selectors: pods so labelled in that namespace (AND, not OR).
            assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
            assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}


# ------------------------------------------------------------------------------------- trainer Jobs
def evaluate(policy: Obj, obj: Obj, params: Obj, request: Obj) -> list[str] | None:
    """The messages of the ValidatingAdmissionPolicy's failed validations for ``obj`` (``None``: its
    matchConditions exclude the request). An evaluation error counts as a failure, as with
    ``failurePolicy: Fail``."""
    import celpy

    spec = policy["spec"]
    env = celpy.Environment()

    def run(expr: str, activation: dict[str, Any]) -> Any:
        return env.program(env.compile(expr)).evaluate(activation)

    # Converted to CEL values once: variables hold CEL values already (converting those again would
    # turn a BoolType, an int subclass, into an IntType).
    base = {k: celpy.json_to_cel(v) for k, v in {"object": obj, "params": params, "request": request}.items()}
    for cond in spec.get("matchConditions", []):
        if not run(cond["expression"], base):
            return None
    variables = celpy.celtypes.MapType()
    for var in spec.get("variables", []):
        variables[celpy.celtypes.StringType(var["name"])] = run(
            var["expression"], {**base, "variables": variables}
        )
    activation = {**base, "variables": variables}
    failed = []
    for rule in spec["validations"]:
        try:
            ok = bool(run(rule["expression"], activation))
        except celpy.CELEvalError:
            ok = False
        if not ok:
            message = rule.get("message") or ""
            if "messageExpression" in rule:
                message = str(run(rule["messageExpression"], activation))
            failed.append(message or rule["expression"])
    return failed


def _job_policy(objs: list[Obj]) -> tuple[Obj, Obj]:
    policy = by_kind(objs, "ValidatingAdmissionPolicy")["huvidpo-trainer-jobs"]
    (binding,) = [
        b
        for b in by_kind(objs, "ValidatingAdmissionPolicyBinding").values()
        if b["spec"]["policyName"] == "huvidpo-trainer-jobs"
    ]
    ref = binding["spec"]["paramRef"]
    assert ref["parameterNotFoundAction"] == "Deny" and ref["namespace"] == "huvidpo"
    params = by_kind(objs, "ConfigMap")[ref["name"]]
    return policy, params


AS_CONTROLPLANE = {"userInfo": {"username": CONTROLPLANE_SA}, "namespace": "huvidpo"}


def test_trainer_job_policy_admits_exactly_the_job_the_control_plane_builds(
    rendered: dict[str, list[Obj]],
) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        policy, params = _job_policy(objs)
        jobs = check.trainer_jobs(objs)
        for job in jobs:  # one per allowed shape
            assert evaluate(policy, job, params, AS_CONTROLPLANE) == [], env
        # The parameters are the control plane's own settings, not a second copy to keep in step.
        cp = check.controlplane_container(objs)
        settings = check.container_env(objs, cp)
        shapes = [ControlPlaneSettings(shapes=settings["HUVIDPO_CONTROLPLANE_SHAPES"]).allowed_shapes()]
        single_node = all(n == 1 for n, _ in shapes[0])
        assert params["data"] == {
            "image": cp["image"],
            "serviceAccount": settings["HUVIDPO_CONTROLPLANE_SERVICE_ACCOUNT"],
            "storeSecret": settings["HUVIDPO_CONTROLPLANE_STORE_SECRET"],
            "priorityClass": settings["HUVIDPO_CONTROLPLANE_PRIORITY_CLASS"],
            "gpuResource": settings["HUVIDPO_CONTROLPLANE_GPU_RESOURCE"],
            "maxGpus": settings["HUVIDPO_CONTROLPLANE_GPU_COUNT"],
            # single-node shapes: one pod, at most GPU_COUNT GPUs
            "maxNodes": "1" if single_node else params["data"]["maxNodes"],
            "maxTotalGpus": settings["HUVIDPO_CONTROLPLANE_GPU_COUNT"]
            if single_node
            else params["data"]["maxTotalGpus"],
        }
        assert params["data"]["priorityClass"] in by_kind(objs, "PriorityClass")
        # Someone else creating a Job (an admin, another controller) is not this policy's business.
        other = {"userInfo": {"username": "kubernetes-admin"}, "namespace": "huvidpo"}
        assert evaluate(policy, {"spec": {}}, params, other) is None
    assert _job_policy(rendered["deploy/overlays/gpu"])[1]["data"]["maxGpus"] == "1"
    assert _job_policy(rendered["deploy/overlays/cpu-dev"])[1]["data"]["maxGpus"] == "0"


def _pod(job: Obj) -> Obj:
    return dict(job["spec"]["template"]["spec"])


def _refused_variants(gpu_limit: int) -> list[tuple[str, Any, str]]:
    """(what, how to change the Job's pod spec, part of the message that refuses it)."""

    def image(p: Obj) -> None:
        p["containers"][0]["image"] = "attacker/miner:latest"

    def account(p: Obj) -> None:
        p["serviceAccountName"] = "huvidpo-controlplane"

    def token(p: Obj) -> None:
        p["automountServiceAccountToken"] = True

    def root_secret(p: Obj) -> None:
        p["containers"][0]["env"].append(
            {"name": "K", "valueFrom": {"secretKeyRef": {"name": "huvidpo-store-root", "key": "secret-key"}}}
        )

    def env_from(p: Obj) -> None:
        p["containers"][0]["envFrom"] = [{"secretRef": {"name": "huvidpo-controlplane-auth"}}]

    def secret_volume(p: Obj) -> None:
        p["volumes"].append({"name": "s", "secret": {"secretName": "huvidpo-store-root"}})

    def host_path(p: Obj) -> None:
        p["volumes"].append({"name": "h", "hostPath": {"path": "/"}})

    def gpus(p: Obj) -> None:
        res = p["containers"][0]["resources"]
        res["limits"]["nvidia.com/gpu"] = str(gpu_limit + 1)
        res["requests"]["nvidia.com/gpu"] = str(gpu_limit + 1)

    def fractional(p: Obj) -> None:
        p["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "500m"

    def sidecar(p: Obj) -> None:
        p["containers"].append(dict(p["containers"][0], name="sidecar"))

    def init(p: Obj) -> None:
        p["initContainers"] = [dict(p["containers"][0], name="init", image="busybox")]

    def priority(p: Obj) -> None:
        p["priorityClassName"] = "huvidpo-serving"

    def no_priority(p: Obj) -> None:
        del p["priorityClassName"]

    return [
        ("another image", image, "trainer image"),
        ("another service account", account, "ServiceAccount huvidpo-trainer"),
        ("a service-account token", token, "without a service-account token"),
        ("the root store key", root_secret, "only the Secret huvidpo-store-trainer"),
        ("a Secret as envFrom", env_from, "only the Secret huvidpo-store-trainer"),
        ("a Secret volume", secret_volume, "only emptyDir"),
        ("a hostPath volume", host_path, "only emptyDir"),
        ("more GPUs than the ceiling", gpus, f"at most {gpu_limit} nvidia.com/gpu"),
        ("a fractional GPU", fractional, "nvidia.com/gpu"),
        ("a second container", sidecar, "exactly one container"),
        ("an init container", init, "exactly one container"),
        ("the serving priority", priority, "PriorityClass huvidpo-training"),
        ("no priority", no_priority, "PriorityClass huvidpo-training"),
    ]


@pytest.mark.parametrize("env", ["deploy/overlays/cpu-dev", "deploy/overlays/gpu"])
def test_trainer_job_policy_refuses_what_the_control_plane_must_not_create(
    rendered: dict[str, list[Obj]], env: str
) -> None:
    objs = rendered[env]
    policy, params = _job_policy(objs)
    job = check.trainer_jobs(objs)[0]
    for what, change, expected in _refused_variants(int(params["data"]["maxGpus"])):
        bad = copy.deepcopy(job)
        pod = bad["spec"]["template"]["spec"]
        pod["containers"][0].setdefault("resources", {}).setdefault("limits", {})
        pod["containers"][0]["resources"].setdefault("requests", {})
        change(pod)
        failed = evaluate(policy, bad, params, AS_CONTROLPLANE)
        assert failed, f"{env}: a Job with {what} was admitted"
        assert any(expected in m for m in failed), (what, failed)


def _multinode_job(objs: list[Obj], nodes: int, gpus: int) -> Obj:
    """The Indexed Job the control plane builds for ``nodes x gpus`` with this rendering's settings
    (GPU_COUNT raised to a node's GPUs, as an overlay allowing that shape would)."""
    from services.common.settings import StoreSettings
    from services.controlplane.domain.ports import JobSpec
    from services.controlplane.executors.kubernetes import build_job

    env = check.container_env(objs, check.controlplane_container(objs))
    with check.environment({**env, "HUVIDPO_CONTROLPLANE_GPU_COUNT": str(gpus)}):
        settings, store = ControlPlaneSettings(), StoreSettings()
    return build_job(JobSpec("ft-multinode0000000000000", nodes=nodes, gpus_per_node=gpus), settings, store)


def test_trainer_job_policy_admits_a_multi_node_indexed_job_within_its_node_and_gpu_ceilings(
    rendered: dict[str, list[Obj]],
) -> None:
    objs = rendered["deploy/overlays/gpu"]
    policy, params = _job_policy(objs)
    # an overlay allowing 4x8 sets: 8 GPUs a pod, 4 pods, 32 GPUs in all
    wide = copy.deepcopy(params)
    wide["data"].update({"maxGpus": "8", "maxNodes": "4", "maxTotalGpus": "32"})
    job = _multinode_job(objs, 4, 8)
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 4
    assert evaluate(policy, job, wide, AS_CONTROLPLANE) == []
    # the rendered parameters (single-node shapes) refuse it
    assert any("at most 1 pods" in m for m in evaluate(policy, job, params, AS_CONTROLPLANE) or [])
    # one node more than allowed
    more = _multinode_job(objs, 5, 8)
    assert any("at most 4 pods" in m for m in evaluate(policy, more, wide, AS_CONTROLPLANE) or [])
    # each pod within the per-pod ceiling, but more GPUs in all than allowed
    tight = copy.deepcopy(wide)
    tight["data"]["maxTotalGpus"] = "24"
    assert any("24 nvidia.com/gpu in all" in m for m in evaluate(policy, job, tight, AS_CONTROLPLANE) or [])
    # a plain Job with a large parallelism is bounded the same way (pods at once)
    plain = copy.deepcopy(check.trainer_jobs(objs)[0])
    plain["spec"]["parallelism"] = 50
    assert any("at most 1 pods" in m for m in evaluate(policy, plain, params, AS_CONTROLPLANE) or [])


def _peer_objects() -> tuple[Obj, Obj]:
    from services.controlplane.domain.ports import JobSpec
    from services.controlplane.executors.kubernetes import build_network_policy, build_service

    spec = JobSpec("ft-multinode0000000000000", nodes=4, gpus_per_node=8)
    settings = ControlPlaneSettings(namespace="huvidpo")
    return build_service(spec, settings), build_network_policy(spec, settings)


def test_peer_services_and_network_policies_are_admitted_only_as_the_control_plane_builds_them(
    rendered: dict[str, list[Obj]],
) -> None:
    for env in ENVIRONMENTS:
        policies = by_kind(rendered[env], "ValidatingAdmissionPolicy")
        bindings = {
            b["spec"]["policyName"]
            for b in by_kind(rendered[env], "ValidatingAdmissionPolicyBinding").values()
        }
        assert {"huvidpo-trainer-services", "huvidpo-trainer-network-policies"} <= bindings, env
    svc_policy = policies["huvidpo-trainer-services"]
    net_policy = policies["huvidpo-trainer-network-policies"]
    service, netpol = _peer_objects()
    assert evaluate(svc_policy, service, {}, AS_CONTROLPLANE) == []
    assert evaluate(net_policy, netpol, {}, AS_CONTROLPLANE) == []

    def svc_variant(change: Any) -> list[str] | None:
        bad = copy.deepcopy(service)
        change(bad["spec"])
        return evaluate(svc_policy, bad, {}, AS_CONTROLPLANE)

    assert svc_variant(lambda s: s.update(type="LoadBalancer"))
    assert svc_variant(lambda s: s.update(clusterIP="10.0.0.9"))
    assert svc_variant(lambda s: s.update(type="NodePort", clusterIP="10.0.0.9"))
    assert svc_variant(lambda s: s.update(selector={"app.kubernetes.io/component": "minio"}))
    assert svc_variant(lambda s: s.update(externalIPs=["1.2.3.4"]))

    def net_variant(change: Any) -> list[str] | None:
        bad = copy.deepcopy(netpol)
        change(bad["spec"])
        return evaluate(net_policy, bad, {}, AS_CONTROLPLANE)

    everyone = {"podSelector": {}}
    assert net_variant(lambda s: s.update(podSelector={}))  # every pod of the namespace
    assert net_variant(
        lambda s: s.update(podSelector={"matchLabels": {"app.kubernetes.io/component": "minio"}})
    )
    assert net_variant(lambda s: s["ingress"][0].update({"from": [everyone]}))
    assert net_variant(lambda s: s["egress"][0].update(to=[{"ipBlock": {"cidr": "0.0.0.0/0"}}]))
    assert net_variant(
        lambda s: s["ingress"][0]["from"][0].update(namespaceSelector={})  # any namespace's such pods
    )
    assert net_variant(lambda s: s["ingress"].append({"ports": [{"port": 9000}]}))  # from anywhere
    # someone else's Services and policies are not these policies' business
    other = {"userInfo": {"username": "kubernetes-admin"}, "namespace": "huvidpo"}
    assert evaluate(svc_policy, {"spec": {"type": "LoadBalancer"}}, {}, other) is None


def test_jobs_and_gpus_are_bounded_and_serving_outranks_training(rendered: dict[str, list[Obj]]) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        (quota,) = by_kind(objs, "ResourceQuota").values()
        hard = quota["spec"]["hard"]
        assert int(hard["count/jobs.batch"]) > 0 and int(hard["pods"]) > 0
        gpus = int(hard["requests.nvidia.com/gpu"])
        # The quota fits what the overlay runs: every inference replica plus a rollout's surge pod,
        # and at least one trainer Job at the policy's GPU ceiling.
        inference = by_kind(objs, "Deployment")["huvidpo-inference"]
        per_pod = int(
            inference["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"].get(
                "nvidia.com/gpu", 0
            )
        )
        surge = inference["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
        trainer = int(_job_policy(objs)[1]["data"]["maxGpus"])
        assert gpus >= per_pod * (inference["spec"]["replicas"] + surge) + trainer, env
        (limits,) = by_kind(objs, "LimitRange").values()
        container = next(lim for lim in limits["spec"]["limits"] if lim["type"] == "Container")
        assert {"cpu", "memory"} <= set(container["defaultRequest"]) and "memory" in container["default"]
        assert "cpu" not in container.get("default", {})  # trainer Jobs run without a CPU limit on purpose
        job = check.trainer_jobs(objs)[0]
        assert quantity(
            job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        ) <= (quantity(container["max"]["memory"]))
        classes = by_kind(objs, "PriorityClass")
        assert classes["huvidpo-serving"]["value"] > classes["huvidpo-training"]["value"]
        assert classes["huvidpo-training"]["preemptionPolicy"] == "Never"
        assert not any(c.get("globalDefault") for c in classes.values())
        assert job["spec"]["template"]["spec"]["priorityClassName"] == "huvidpo-training"
        assert inference["spec"]["template"]["spec"]["priorityClassName"] == "huvidpo-serving"


# -------------------------------------------------------------------------------------------- sizing
def test_control_plane_scratch_holds_its_largest_accepted_upload(rendered: dict[str, list[Obj]]) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        cp = check.controlplane_container(objs)
        limit = int(check.container_env(objs, cp)["HUVIDPO_CONTROLPLANE_MAX_UPLOAD_BYTES"])
        spec = by_kind(objs, "Deployment")["huvidpo-controlplane"]["spec"]["template"]["spec"]
        tmp_volume = next(m["name"] for m in cp["volumeMounts"] if m["mountPath"] == "/tmp")
        (volume,) = [v for v in spec["volumes"] if v["name"] == tmp_volume]
        assert quantity(volume["emptyDir"]["sizeLimit"]) >= limit, env


# ------------------------------------------------------------------------------------------ gateway
def test_gateway_example_terminates_tls_with_cert_manager_and_routes_to_real_services(
    rendered: dict[str, list[Obj]],
) -> None:
    objs = rendered["deploy/overlays/gateway-example"]
    (gateway,) = by_kind(objs, "Gateway").values()
    assert gateway["metadata"]["annotations"]["cert-manager.io/cluster-issuer"]
    listeners = {lst["name"]: lst for lst in gateway["spec"]["listeners"]}
    for lst in listeners.values():
        # cert-manager issues one certificate per HTTPS listener: hostname + Secret name.
        assert lst["protocol"] == "HTTPS" and lst["hostname"] and lst["tls"]["mode"] == "Terminate"
        assert lst["tls"]["certificateRefs"][0]["name"]
    services = by_kind(objs, "Service")
    routed = set()
    for kind in ("HTTPRoute", "GRPCRoute"):
        for route in by_kind(objs, kind).values():
            (parent,) = route["spec"]["parentRefs"]
            assert parent["name"] == gateway["metadata"]["name"] and parent["sectionName"] in listeners
            assert route["spec"]["hostnames"] == [listeners[parent["sectionName"]]["hostname"]]
            for rule in route["spec"]["rules"]:
                for ref in rule["backendRefs"]:
                    assert ref["port"] in {p["port"] for p in services[ref["name"]]["spec"]["ports"]}
                    routed.add((kind, ref["name"]))
    assert routed == {
        ("HTTPRoute", "huvidpo-controlplane"),
        ("GRPCRoute", "huvidpo-inference"),
        ("HTTPRoute", "huvidpo-minio"),
    }
    api = by_kind(objs, "HTTPRoute")["huvidpo-controlplane"]
    paths = {m["path"]["value"] for r in api["spec"]["rules"] for m in r["matches"]}
    assert "/metrics" not in paths and "/v1/" in paths
    grpc_port = services["huvidpo-inference"]["spec"]["ports"][0]
    assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
    store = check.container_env(objs, check.controlplane_container(objs))
    assert store["HUVIDPO_STORE_PUBLIC_ENDPOINT"] == listeners["s3"]["hostname"] + ":443"
