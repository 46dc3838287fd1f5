"""``TrainJobExecutor``: one Kubeflow Trainer v2 ``TrainJob`` (trainer.kubeflow.org/v1alpha1) per attempt.

For clusters that run Kubeflow Trainer: the TrainJob names a torch runtime (``runtimeRef``, a
ClusterTrainingRuntime, ``torch-distributed`` by default) and sets ``trainer.numNodes``,
``numProcPerNode`` and ``resourcesPerNode``; the runtime's JobSet runs one pod per node and injects
torchrun's settings as ``PET_NNODES``/``PET_NPROC_PER_NODE``/``PET_NODE_RANK``/``PET_MASTER_ADDR``/
``PET_MASTER_PORT``, which the trainer reads (services/trainer/ranks.py): the command is the plain
Job's, ``python -m services.trainer``, which starts the node's workers through torchrun's launcher
and exits with their own code. The pod-level settings (volumes, security context, labels) go
into a ``runtimePatches`` entry owned by the control plane.

The object is built with the typed models of ``kubeflow-trainer-api`` (``build_trainjob``), so a
misspelt field is a type error, and ``validate_trainjob`` checks a plain dict against them.

The trap: a failed TrainJob's retries are not a reliable budget. The runtime's JobSet
``failurePolicy.maxRestarts`` restarts the whole group without the TrainJob's status saying how
often, is set by whoever owns the runtime, and starts over when the TrainJob is recreated. So
the runtime should not restart (``maxRestarts: 0``), a failed TrainJob is one failed attempt, and
the attempt count lives in the fine-tune's own status (``FineTuneStatus.attempt``): the control
plane starts the next attempt as a new TrainJob ``<name>-a<N>``, up to
``HUVIDPO_CONTROLPLANE_MAX_ATTEMPTS``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from services.common.settings import ControlPlaneSettings, StoreSettings
from services.controlplane.domain.ports import ExecStatus, JobSpec
from services.controlplane.executors.kubernetes import (
    LABEL_FINETUNE,
    LABEL_QUEUE,
    MANAGED_BY,
    SELECTOR,
    KubernetesExecutor,
    _attempt_of,
    _unavailable,
    job_name,
    pod_annotations,
    trainer_annotations,
    trainer_env,
    trainer_labels,
    trainer_resources,
    trainer_volumes,
)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
# The torch runtimes' replicated job and container (ClusterTrainingRuntime torch-distributed).
NODE = "node"
PATCH_MANAGER = "huvidpo.dev/controlplane"
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"


def trainjob_command(settings: ControlPlaneSettings, spec: JobSpec | None = None) -> list[str]:
    """The trainer itself: it reads its topology from the runtime's ``PET_*`` env and starts this
    node's workers through torchrun's launcher, restarting nothing (services/trainer/ranks.py), and
    exits with the workers' own code (2 bad input, 75 transient) where ``torchrun`` would exit 1.
    An evaluation's TrainJob (one node, one process) runs the evaluator instead."""
    if spec is not None and spec.role == "evaluator":
        return list(settings.evaluator_command)
    return list(settings.trainer_command)


def build_trainjob(spec: JobSpec, settings: ControlPlaneSettings, store: StoreSettings) -> dict[str, Any]:
    """The TrainJob of one attempt of ``spec`` (pure; built with the Trainer's typed models)."""
    from kubeflow_trainer_api import models as m

    name = job_name(spec.finetune_id, spec.attempt)
    labels = trainer_labels(spec)
    meta_labels = dict(labels)
    if settings.queue_name:
        meta_labels[LABEL_QUEUE] = settings.queue_name
    annotations = trainer_annotations(spec)
    volumes, mounts = trainer_volumes(settings)
    annotations_of_pod = pod_annotations(spec, annotations)
    pod_spec = m.TrainerV1alpha1PodSpecPatch(
        containers=[
            m.TrainerV1alpha1ContainerPatch(
                name=NODE,
                volumeMounts=[m.IoK8sApiCoreV1VolumeMount.from_dict(v) for v in mounts],
                securityContext=m.IoK8sApiCoreV1SecurityContext(
                    allowPrivilegeEscalation=False,
                    readOnlyRootFilesystem=True,
                    capabilities=m.IoK8sApiCoreV1Capabilities(drop=["ALL"]),
                ),
            )
        ],
        volumes=[m.IoK8sApiCoreV1Volume.from_dict(v) for v in volumes],
        securityContext=m.IoK8sApiCoreV1PodSecurityContext(
            runAsNonRoot=True,
            runAsUser=10001,
            runAsGroup=10001,
            fsGroup=10001,
            seccompProfile=m.IoK8sApiCoreV1SeccompProfile(type="RuntimeDefault"),
        ),
        terminationGracePeriodSeconds=120,
        nodeSelector=dict(settings.node_selector) or None,
        tolerations=[m.IoK8sApiCoreV1Toleration.from_dict(dict(t)) for t in settings.tolerations] or None,
        serviceAccountName=settings.service_account or None,
    )
    patch = m.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        trainingRuntimeSpec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=m.TrainerV1alpha1JobSetTemplatePatch(
                spec=m.TrainerV1alpha1JobSetSpecPatch(
                    replicatedJobs=[
                        m.TrainerV1alpha1ReplicatedJobPatch(
                            name=NODE,
                            template=m.TrainerV1alpha1JobTemplatePatch(
                                spec=m.TrainerV1alpha1JobSpecPatch(
                                    template=m.TrainerV1alpha1PodTemplatePatch(
                                        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
                                            labels=dict(labels), annotations=annotations_of_pod
                                        ),
                                        spec=pod_spec,
                                    )
                                )
                            ),
                        )
                    ]
                )
            )
        ),
    )
    trainjob = m.TrainerV1alpha1TrainJob(
        apiVersion=f"{GROUP}/{VERSION}",
        kind="TrainJob",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, namespace=settings.namespace, labels=meta_labels, annotations=annotations
        ),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtimeRef=m.TrainerV1alpha1RuntimeRef(
                apiGroup=GROUP, kind="ClusterTrainingRuntime", name=settings.trainjob_runtime
            ),
            # Kueue admits the whole gang, then unsuspends it.
            suspend=True if settings.queue_name else None,
            activeDeadlineSeconds=settings.job_active_deadline_seconds,
            trainer=m.TrainerV1alpha1Trainer(
                image=settings.trainer_image,
                command=trainjob_command(settings, spec),
                env=[m.IoK8sApiCoreV1EnvVar.from_dict(e) for e in trainer_env(spec, settings, store)],
                numNodes=spec.nodes,
                numProcPerNode=spec.gpus_per_node,
                resourcesPerNode=m.IoK8sApiCoreV1ResourceRequirements.from_dict(
                    trainer_resources(spec, settings)
                ),
            ),
            runtimePatches=[patch],
        ),
    )
    body: dict[str, Any] = trainjob.to_dict()
    return body


def validate_trainjob(obj: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``obj`` is a TrainJob the Trainer's models read whole.

    The generated models drop fields they do not know; a round trip that loses anything is a
    field the API does not have (a typo), and one that fails is a wrong type."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    plain = _plain(obj)
    model = TrainerV1alpha1TrainJob.from_dict(plain)
    if model is None or model.to_dict() != plain:
        raise ValueError(
            f"not a valid TrainJob: {_first_difference(plain, model.to_dict() if model else {})}"
        )
    if plain.get("apiVersion") != f"{GROUP}/{VERSION}" or plain.get("kind") != "TrainJob":
        raise ValueError("apiVersion/kind must be trainer.kubeflow.org/v1alpha1 TrainJob")


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k not in b:
                return f"{path}.{k} is not a field the API knows"
            d = _first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return ""
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return "" if len(a) == len(b) else f"{path} differs in length"
    return "" if a == b else f"{path}: {a!r} became {b!r}"


def trainjob_status(obj: Mapping[str, Any] | None) -> ExecStatus:
    """Map a TrainJob to the executor's status: its Complete/Failed conditions, else its child
    Jobs (``jobsStatus``) running or not. A failed TrainJob is always one failed attempt whose
    restart is the control plane's (``retryable``), unless its deadline ran out."""
    if obj is None:
        return ExecStatus("missing")
    meta = obj.get("metadata") or {}
    ref = {"kind": "trainjob", "name": str(meta.get("name", "")), "namespace": str(meta.get("namespace", ""))}
    attempt = _attempt_of(obj)
    status = obj.get("status") or {}
    for cond in status.get("conditions") or []:
        if str(cond.get("status")) != "True":
            continue
        if cond.get("type") == "Complete":
            return ExecStatus("succeeded", job=ref, attempt=attempt)
        if cond.get("type") == "Failed":
            reason = str(cond.get("reason") or "TrainJobFailed")
            return ExecStatus(
                "failed",
                reason,
                cond.get("message"),
                job=ref,
                attempt=attempt,
                retryable=reason != "DeadlineExceeded",
            )
    jobs = status.get("jobsStatus") or []
    if any((j.get("active") or 0) > 0 for j in jobs):
        return ExecStatus("running", job=ref, attempt=attempt)
    return ExecStatus("pending", job=ref, attempt=attempt)


class TrainJobExecutor(KubernetesExecutor):
    """The executor port over TrainJobs; logs come from the JobSet's pods like the Job's (container ``node``)."""

    kind = "trainjob"
    container = NODE

    def __init__(
        self, api_client: Any, settings: ControlPlaneSettings, store: StoreSettings | None = None
    ) -> None:
        from kubernetes import client

        super().__init__(api_client, settings, store)
        self.custom = client.CustomObjectsApi(api_client)

    def submit(self, spec: JobSpec) -> dict[str, str]:
        from kubernetes.client.exceptions import ApiException

        body = build_trainjob(spec, self.settings, self.store_settings)
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
        except ApiException as exc:
            if exc.status != 409:  # a retried submit
                raise _unavailable(exc) from exc
        return {"kind": self.kind, "name": body["metadata"]["name"], "namespace": self.namespace}

    def _jobs_of(self, finetune_id: str) -> list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        try:
            found: Any = self.custom.list_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                label_selector=f"{LABEL_FINETUNE}={finetune_id}",
                _request_timeout=30,
            )
        except ApiException as exc:
            raise _unavailable(exc) from exc
        items = [_plain(i) for i in (found or {}).get("items") or []]
        mine = [
            i
            for i in items
            if ((i.get("metadata") or {}).get("labels") or {}).get(LABEL_FINETUNE) == finetune_id
        ]
        return sorted(mine, key=_attempt_of)

    def status(self, finetune_id: str) -> ExecStatus:
        jobs = self._jobs_of(finetune_id)
        return trainjob_status(jobs[-1]) if jobs else ExecStatus("missing")

    def cancel(self, finetune_id: str) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        options = client.V1DeleteOptions(propagation_policy=self.settings.delete_propagation)
        names = [str(j["metadata"]["name"]) for j in self._jobs_of(finetune_id)] or [job_name(finetune_id)]
        for name in names:
            try:
                self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name, body=options
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise _unavailable(exc) from exc

    def ready(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, limit=1, _request_timeout=5
            )
            return True
        except (ApiException, OSError):
            return False

    def _pod_owner_label(self) -> str:
        return JOBSET_LABEL

    # ------------------------------------------------------------------------------------- watch
    def _deliver_trainjob(self, obj: Mapping[str, Any], on_event: Callable[[str, ExecStatus], None]) -> None:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if labels.get("app.kubernetes.io/managed-by") != MANAGED_BY or not labels.get(LABEL_FINETUNE):
            return
        try:
            on_event(str(labels[LABEL_FINETUNE]), trainjob_status(obj))
        except Exception:
            import logging

            logging.getLogger(__name__).exception(
                "reconciling fine-tune %s failed", labels.get(LABEL_FINETUNE)
            )

    def resync(self, on_event: Callable[[str, ExecStatus], None]) -> int:
        found: Any = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, label_selector=SELECTOR, _request_timeout=30
        )
        items = (found or {}).get("items") or []
        for item in items:
            self._deliver_trainjob(_plain(item), on_event)
        return len(items)

    def watch_once(self, on_event: Callable[[str, ExecStatus], None], stop: threading.Event) -> None:
        from kubernetes import watch

        w = watch.Watch()
        try:
            for event in w.stream(
                self.custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                label_selector=SELECTOR,
                _request_timeout=self.settings.watch_timeout_seconds,
            ):
                if stop.is_set():
                    break
                obj = event.get("object")
                if event.get("type") in ("ADDED", "MODIFIED") and obj is not None:
                    self._deliver_trainjob(_plain(obj), on_event)
        finally:
            w.stop()
