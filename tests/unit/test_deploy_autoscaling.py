"""Inference scale-out in deploy/: autoscaling (KEDA ScaledObject, or an HPA through the Prometheus
adapter), the headless Service for client-side round_robin, and the drain arithmetic of the pods.

Rendered with the pinned kubectl like tests/unit/test_deploy_manifests.py; the ScaledObject's shape
is checked by deploy/tools/check.py's hand-written schema (proved here to catch a typo), and the HPA
KEDA would make of it by kubernetes-validate."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploytools import check

ROOT = Path(__file__).resolve().parents[2]
Obj = dict[str, Any]
KEDA, HPA = "deploy/overlays/gpu-keda", "deploy/overlays/gpu-hpa"
ENVIRONMENTS = ("deploy", "deploy/overlays/gpu", KEDA, HPA)
# Seconds a drained replica needs after its drain deadline: the last results stream out
# (services.inference.drain.FLUSH_SECONDS) and the model thread and servers stop.
SHUTDOWN_MARGIN = 10


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    try:
        kubectl = check.find_kubectl(fetch=True)
    except check.ToolMissing as exc:
        pytest.skip(str(exc))
    return {env: check.render(kubectl, ROOT / env) for env in ENVIRONMENTS}


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def inference_env(objects: list[Obj]) -> dict[str, str]:
    dep = one(objects, "Deployment", "huvidpo-inference")
    return dict(check.container_env(objects, dep["spec"]["template"]["spec"]["containers"][0]))


def test_keda_scales_the_inference_deployment_on_queue_depth_per_replica(
    rendered: dict[str, list[Obj]],
) -> None:
    from services.inference.metrics import InferenceMetrics

    objs = rendered[KEDA]
    so = one(objs, "ScaledObject", "huvidpo-inference")
    dep = one(objs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
    assert "replicas" not in dep["spec"], "the autoscaler owns the replica count"
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert re.fullmatch(r'sum\(huvidpo_inference_requests_queued\{namespace="huvidpo"\}\)', query)
    assert "huvidpo_inference_requests_queued" in {m.name for m in InferenceMetrics().registry.collect()}
    env = inference_env(objs)
    # One full batch waiting per replica is the point to add one.
    assert float(trigger["metadata"]["threshold"]) == int(env["HUVIDPO_INFERENCE_MAX_BATCH"])
    pdb = one(objs, "PodDisruptionBudget", "huvidpo-inference")
    assert so["spec"]["minReplicaCount"] > pdb["spec"]["minAvailable"]
    assert so["spec"]["maxReplicaCount"] > so["spec"]["minReplicaCount"]
    down = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert down["stabilizationWindowSeconds"] >= grace


def test_the_hpa_alternative_matches_keda_and_the_adapter_serves_its_metric(
    rendered: dict[str, list[Obj]],
) -> None:
    so = one(rendered[KEDA], "ScaledObject", "huvidpo-inference")
    objs = rendered[HPA]
    hpa = one(objs, "HorizontalPodAutoscaler", "huvidpo-inference")
    assert "replicas" not in one(objs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])["spec"]
    assert not [o for o in objs if o["kind"] == "ScaledObject"], "two autoscalers would fight"
    assert not [o for o in rendered[KEDA] if o["kind"] == "HorizontalPodAutoscaler"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"] == {
        "type": "AverageValue",
        "averageValue": so["spec"]["triggers"][0]["metadata"]["threshold"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        so["spec"]["minReplicaCount"],
        so["spec"]["maxReplicaCount"],
    )
    assert hpa["spec"]["behavior"] == so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    values = yaml.safe_load(
        (ROOT / "deploy/components/autoscaling-hpa/prometheus-adapter-values.yaml").read_text()
    )
    (rule,) = values["rules"]["custom"]
    name = metric["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith(name + "{") and re.fullmatch(rule["name"]["matches"], name)
    assert rule["name"]["as"] == name
    # The series must map to pods for a Pods metric; both scrape setups label them so.
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    relabel = yaml.safe_load((ROOT / "deploy/monitoring/prometheus.yml").read_text())["scrape_configs"]
    job = next(j for j in relabel if j["job_name"] == "huvidpo-inference")
    assert {"pod", "namespace"} <= {r.get("target_label") for r in job["relabel_configs"]}


def test_schema_check_catches_a_mistyped_scaled_object(rendered: dict[str, list[Obj]]) -> None:
    assert not check.check_crd_shapes({KEDA: rendered[KEDA]}).errors
    so = one(rendered[KEDA], "ScaledObject", "huvidpo-inference")
    typo = copy.deepcopy(so)
    typo["spec"]["minReplicaCont"] = typo["spec"].pop("minReplicaCount")
    bad_type = copy.deepcopy(so)
    bad_type["spec"]["triggers"][0]["metricType"] = "Average"
    no_query = copy.deepcopy(so)
    del no_query["spec"]["triggers"][0]["metadata"]["query"]
    for broken, needle in ((typo, "minReplicaCont"), (bad_type, "Average"), (no_query, "query")):
        report = check.check_crd_shapes({"x": [broken]})
        assert report.errors and needle in report.errors[0], report.errors


def test_the_hpa_keda_would_create_validates_and_a_bad_behavior_does_not(
    rendered: dict[str, list[Obj]],
) -> None:
    import kubernetes_validate

    so = one(rendered[KEDA], "ScaledObject", "huvidpo-inference")
    (hpa,) = check.keda_hpas([so])
    assert hpa["spec"]["scaleTargetRef"]["name"] == "huvidpo-inference"
    kubernetes_validate.validate(hpa, check.KUBERNETES_VERSIONS[0], strict=True)
    broken = copy.deepcopy(so)
    broken["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilisationWindowSeconds"
    ] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(check.keda_hpas([broken])[0], check.KUBERNETES_VERSIONS[0], strict=True)


def test_a_headless_service_lists_every_inference_pod(rendered: dict[str, list[Obj]]) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        svc = one(objs, "Service", "huvidpo-inference-headless")
        assert svc["spec"]["clusterIP"] == "None"
        pod_labels = one(objs, "Deployment", "huvidpo-inference")["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(50051, "grpc")]
        # Not-ready (loading or draining) pods stay out of DNS.
        assert not svc["spec"].get("publishNotReadyAddresses", False)


def test_grace_period_covers_prestop_and_a_drain_of_a_full_queue(rendered: dict[str, list[Obj]]) -> None:
    for env in ENVIRONMENTS:
        objs = rendered[env]
        dep = one(objs, "Deployment", "huvidpo-inference")
        pod = dep["spec"]["template"]["spec"]
        settings = inference_env(objs)
        grace = float(settings["HUVIDPO_INFERENCE_GRACE_SECONDS"])
        pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop >= 5, env
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + SHUTDOWN_MARGIN, env
        batch_seconds = float(dep["metadata"]["annotations"]["huvidpo.dev/full-batch-seconds"])
        batches = 1 + math.ceil(
            int(settings["HUVIDPO_INFERENCE_MAX_QUEUE"]) / int(settings["HUVIDPO_INFERENCE_MAX_BATCH"])
        )
        assert grace >= batches * batch_seconds, (env, grace, batches, batch_seconds)


def test_gpu_rollouts_replace_pods_without_an_extra_gpu(rendered: dict[str, list[Obj]]) -> None:
    for env in ("deploy/overlays/gpu", KEDA, HPA):
        strategy = one(rendered[env], "Deployment", "huvidpo-inference")["spec"]["strategy"]
        assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}, env
