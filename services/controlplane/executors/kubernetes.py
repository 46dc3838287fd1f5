"""``KubernetesExecutor``: one batch/v1 Job per fine-tune, through the official ``kubernetes`` client.

Following kopf's habit, the Job is built by one pure function (``build_job``: settings and a spec
in, a plain dict out; unit-tested and schema-validated) and the API is talked to elsewhere. The
Job name is derived from the fine-tune id, so a repeated submit meets ``409 AlreadyExists`` and
starts nothing: with the deterministic ids of ``Idempotency-Key`` creates, a retry makes one Job.

Shapes (``JobSpec.nodes`` x ``gpus_per_node``): world size 1 is one plain Job running the trainer
command as always. One node with several processes is the same Job running ``torchrun --standalone``.
Several nodes are an Indexed Job (one pod per node, ``--node_rank=$JOB_COMPLETION_INDEX``) with a
headless Service for stable peer DNS (rank 0 is ``<job>-0.<job>``) and a NetworkPolicy that lets
the pods of that attempt, and only them, reach each other. A group is restarted whole: one failed
index fails the Job (``backoffLimitPerIndex: 0``, ``maxFailedIndexes: 0``, so torchrun's static
rendezvous is never joined by a lone replacement pod), and the control plane starts the next
attempt as a new Job ``<job>-a<N>`` (``FineTuneStatus.attempt``; domain/finetunes.py).

Status: ``status()`` reads the fine-tune's newest Job; ``start_watch`` runs a watch (with a client-side request
timeout, re-opened in a loop) plus a periodic full resync, and reports every change to the domain.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeGuard

from services.common.records.exit_codes import ExitCode
from services.common.settings import ControlPlaneSettings, StoreSettings
from services.controlplane.domain.ports import ExecStatus, JobSpec

log = logging.getLogger(__name__)

CONTAINER = "trainer"
MANAGED_BY = "huvidpo-controlplane"
LABEL_FINETUNE = "huvidpo.dev/finetune-id"
LABEL_ATTEMPT = "huvidpo.dev/attempt"
# "evaluator" on an evaluation's Job (its LABEL_FINETUNE holds the evaluation id); absent on a fine-tune's.
LABEL_ROLE = "huvidpo.dev/role"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
WORK_DIR = "/work"
# The trainer serves /metrics here while it trains; the pod annotations tell Prometheus (deploy/).
TRAINER_METRICS_PORT = 9091
# The trainer keeps serving /metrics this long after its last step so that Prometheus scrapes a short
# run's final values: two scrape intervals of the shipped configs (15 s, deploy/monitoring).
TRAINER_METRICS_LINGER_SECONDS = 30


def job_name(finetune_id: str, attempt: int = 1) -> str:
    """The Job of one attempt: ``huvidpo-<id>`` for the first, ``huvidpo-<id>-a<N>`` after it.

    Short enough (fine-tune ids are at most 23 characters) that an Indexed Job's pod hostnames
    ``<job>-<index>`` stay within a 63-character DNS label."""
    suffix = "" if attempt <= 1 else f"-a{attempt}"
    return f"huvidpo-{finetune_id}"[: 63 - len(suffix) - 6].rstrip("-") + suffix


def trainer_command(spec: JobSpec, settings: ControlPlaneSettings, master: str | None) -> list[str]:
    """The container command: the trainer itself, for every shape. With several processes the trainer
    starts this node's workers through torchrun's launcher from the ``PET_*`` variables of
    ``shape_env`` (services/trainer/ranks.py) and exits with the workers' own code (2 bad input, 75
    transient), which ``podFailurePolicy`` acts on; a ``torchrun`` command would exit 1 for both.
    An evaluation's Job runs the evaluator (same image, same exit codes) instead."""
    if spec.role == "evaluator":
        return list(settings.evaluator_command)
    return list(settings.trainer_command)


def shape_env(spec: JobSpec, settings: ControlPlaneSettings, master: str | None) -> list[dict[str, Any]]:
    """The ``PET_*`` variables of the fine-tune's shape (the names Kubeflow Trainer injects); the node
    rank of a multi-node Indexed Job is its ``JOB_COMPLETION_INDEX``. Empty for one process. torchrun
    restarts nothing: a failed group is one failed attempt, and the next attempt is the control plane's.
    ``master``: node 0's address for several nodes (static rendezvous), None for one node (loopback)."""
    if spec.world_size == 1:
        return []
    env = [
        {"name": "PET_NNODES", "value": str(spec.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(spec.gpus_per_node)},
        {"name": "PET_MASTER_ADDR", "value": master or "127.0.0.1"},
        {"name": "PET_MASTER_PORT", "value": str(settings.rendezvous_port)},
    ]
    return env


def store_env(store: StoreSettings, secret: str) -> list[dict[str, Any]]:
    """The trainer's store settings: plain values, and the keys from a Secret (never in the Job spec)."""
    env: list[dict[str, Any]] = [
        {"name": "HUVIDPO_STORE_BACKEND", "value": store.backend},
        {"name": "HUVIDPO_STORE_ENDPOINT", "value": store.endpoint},
        {"name": "HUVIDPO_STORE_BUCKET", "value": store.bucket},
        {"name": "HUVIDPO_STORE_SECURE", "value": "true" if store.secure else "false"},
        {"name": "HUVIDPO_STORE_REGION", "value": store.region},
        {"name": "HUVIDPO_STORE_CREATE_BUCKET", "value": "false"},
    ]
    if store.backend == "local":
        env.append({"name": "HUVIDPO_STORE_ROOT", "value": str(store.root)})
    for var, key in (("HUVIDPO_STORE_ACCESS_KEY", "access-key"), ("HUVIDPO_STORE_SECRET_KEY", "secret-key")):
        env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return env


def _label_value(value: str) -> str:
    """A valid label value (<= 63 chars of [A-Za-z0-9._-], alphanumeric ends) or ``""``."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in value)[:63]
    return cleaned.strip("._-")


def trainer_labels(spec: JobSpec) -> dict[str, str]:
    """Labels of every object of one attempt (the pods' too): lineage, fine-tune and attempt."""
    labels = {
        "app.kubernetes.io/name": "huvidpo-trainer",
        # The evaluator too: it is the trainer image with the trainer's store user, so the
        # admission and network policies of deploy/ that select trainer pods apply to it as well.
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_FINETUNE: spec.finetune_id,
        LABEL_ATTEMPT: str(spec.attempt),
    }
    if spec.role != "trainer":
        labels[LABEL_ROLE] = spec.role
    for key in ("dataset", "base_model"):
        if spec.lineage.get(key):
            labels[f"huvidpo.dev/{key.replace('_', '-')}"] = _label_value(spec.lineage[key])
    return labels


def trainer_annotations(spec: JobSpec) -> dict[str, str]:
    # Digests are 64+ characters: too long for labels, so lineage goes into annotations.
    annotations = {f"huvidpo.dev/{k.replace('_', '-')}": str(v) for k, v in sorted(spec.lineage.items())}
    annotations["huvidpo.dev/stage"] = str(spec.config.get("stage", "dpo"))
    annotations["huvidpo.dev/shape"] = f"{spec.nodes}x{spec.gpus_per_node}"
    return annotations


def pod_gpus(spec: JobSpec, settings: ControlPlaneSettings) -> int:
    """GPUs of one trainer pod: none on a CPU cluster (``gpu_count`` 0); ``gpu_count`` for world
    size 1 (as before shapes existed); one per process (``gpus_per_node``) for larger shapes."""
    if settings.gpu_count <= 0:
        return 0
    return settings.gpu_count if spec.world_size == 1 else spec.gpus_per_node


def trainer_resources(spec: JobSpec, settings: ControlPlaneSettings) -> dict[str, dict[str, str]]:
    requests: dict[str, str] = {
        "cpu": settings.cpu_request,
        "memory": settings.memory_request,
        # the work dir (inputs, checkpoints) is an emptyDir on the node's disk
        "ephemeral-storage": settings.work_dir_size,
    }
    limits: dict[str, str] = {"memory": settings.memory_limit}
    gpus = pod_gpus(spec, settings)
    if gpus > 0:
        requests[settings.gpu_resource] = str(gpus)
        limits[settings.gpu_resource] = str(gpus)
    return {"requests": requests, "limits": limits}


def trainer_env(spec: JobSpec, settings: ControlPlaneSettings, store: StoreSettings) -> list[dict[str, Any]]:
    if spec.role == "evaluator":
        return [
            {"name": "HUVIDPO_EVALUATOR_EVALUATION_ID", "value": spec.finetune_id},
            {"name": "HUVIDPO_EVALUATOR_WORK_DIR", "value": WORK_DIR},
            {"name": "HUVIDPO_EVALUATOR_DEVICE", "value": "cuda" if settings.gpu_count > 0 else "cpu"},
            *store_env(store, settings.store_secret),
        ]
    return [
        {"name": "HUVIDPO_TRAINER_FINETUNE_ID", "value": spec.finetune_id},
        {"name": "HUVIDPO_TRAINER_WORK_DIR", "value": WORK_DIR},
        {"name": "HUVIDPO_TRAINER_DEVICE", "value": "cuda" if settings.gpu_count > 0 else "cpu"},
        {"name": "HUVIDPO_TRAINER_METRICS_HOST", "value": "0.0.0.0"},
        {"name": "HUVIDPO_TRAINER_METRICS_PORT", "value": str(TRAINER_METRICS_PORT)},
        {"name": "HUVIDPO_TRAINER_METRICS_LINGER_SECONDS", "value": str(TRAINER_METRICS_LINGER_SECONDS)},
        *store_env(store, settings.store_secret),
    ]


def trainer_volumes(settings: ControlPlaneSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts): the work dir, /tmp and /dev/shm, all emptyDirs.

    /dev/shm is a memory emptyDir (the runtime's default is 64 MiB, too small for NCCL and
    DataLoader workers); what it holds counts against the container's memory limit."""
    volumes: list[dict[str, Any]] = [
        {"name": "work", "emptyDir": {"sizeLimit": settings.work_dir_size}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
    ]
    mounts = [
        {"name": "work", "mountPath": WORK_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


def build_job(spec: JobSpec, settings: ControlPlaneSettings, store: StoreSettings) -> dict[str, Any]:
    """The batch/v1 Job that runs the trainer for ``spec`` (pure; no API call): a plain Job for one
    node, an Indexed Job (one pod per node, peers found through ``build_service``) for several."""
    name = job_name(spec.finetune_id, spec.attempt)
    multinode = spec.nodes > 1
    labels = trainer_labels(spec)
    annotations = trainer_annotations(spec)
    volumes, mounts = trainer_volumes(settings)
    env = trainer_env(spec, settings, store)
    master = f"{name}-0.{name}" if multinode else None
    env += shape_env(spec, settings, master)
    if multinode:
        # The node rank (services/trainer/ranks.py reads it when PET_NODE_RANK is absent); set here
        # from the pod's annotation, as the Job controller does, so it does not depend on the version.
        env.insert(
            0,
            {
                "name": "JOB_COMPLETION_INDEX",
                "valueFrom": {
                    "fieldRef": {
                        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                    }
                },
            },
        )
    job_labels = dict(labels)
    if settings.queue_name:
        job_labels[LABEL_QUEUE] = settings.queue_name
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; retries are new pods
        "terminationGracePeriodSeconds": 120,  # SIGTERM: the trainer checkpoints, then exits 75
        "containers": [
            {
                "name": CONTAINER,
                "image": settings.trainer_image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": trainer_command(spec, settings, master),
                "env": env,
                "ports": [{"name": "metrics", "containerPort": TRAINER_METRICS_PORT, "protocol": "TCP"}],
                "resources": trainer_resources(spec, settings),
                "volumeMounts": mounts,
                # Pod Security "restricted" (enforced on the namespace by deploy/): the root
                # filesystem stays read-only, /tmp (HOME and caches in the image) is an emptyDir.
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": volumes,
        "automountServiceAccountToken": False,  # the trainer never talks to the Kubernetes API
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,  # the image's user (Dockerfile)
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in settings.tolerations]
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if settings.priority_class:
        pod_spec["priorityClassName"] = settings.priority_class
    if multinode:
        pod_spec["subdomain"] = name  # <job>-<index>.<job>: the headless Service of build_service
    job_spec: dict[str, Any] = {}
    if multinode:
        job_spec = {
            "completionMode": "Indexed",
            "completions": spec.nodes,
            "parallelism": spec.nodes,
            # One failed node fails the whole group at once: the attempt is over, the control plane
            # starts the next one (a lone replacement pod could never rejoin torchrun's rendezvous).
            "backoffLimitPerIndex": 0,
            "maxFailedIndexes": 0,
        }
    else:
        job_spec = {"backoffLimit": settings.job_backoff_limit}
    if settings.queue_name:
        job_spec["suspend"] = True  # Kueue admits (unsuspends) the whole Job once its quota fits
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": job_labels,
            "annotations": annotations,
        },
        "spec": {
            **job_spec,
            "activeDeadlineSeconds": settings.job_active_deadline_seconds,
            "ttlSecondsAfterFinished": settings.job_ttl_seconds,
            "podFailurePolicy": {
                "rules": [
                    # Bad data or config: retrying cannot help, fail the Job at once.
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": [int(ExitCode.BAD_INPUT)],
                        },
                    },
                    # Node drain, preemption: not the trainer's fault, do not spend the backoff budget.
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    # Transient failures (store unreachable...): retry, counted against backoffLimit.
                    {
                        "action": "Count",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": [int(ExitCode.TRANSIENT)],
                        },
                    },
                ]
            },
            "template": {
                "metadata": {"labels": dict(labels), "annotations": pod_annotations(spec, annotations)},
                "spec": pod_spec,
            },
        },
    }


def pod_annotations(spec: JobSpec, annotations: dict[str, str]) -> dict[str, str]:
    """The pod's annotations: the trainer's tell Prometheus to scrape it; the evaluator serves no
    metrics (the control plane exports its record's)."""
    if spec.role == "evaluator":
        return dict(annotations)
    return {
        **annotations,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(TRAINER_METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }


def build_service(spec: JobSpec, settings: ControlPlaneSettings) -> dict[str, Any]:
    """The headless Service of a multi-node attempt: DNS names ``<job>-<index>.<job>`` for its pods,
    published before they are ready (rank 0 must be found while every rank is still starting)."""
    name = job_name(spec.finetune_id, spec.attempt)
    labels = trainer_labels(spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                LABEL_FINETUNE: spec.finetune_id,
                LABEL_ATTEMPT: str(spec.attempt),
            },
            "ports": [
                {"name": "rendezvous", "port": settings.rendezvous_port, "protocol": "TCP"},
            ],
        },
    }


def build_network_policy(spec: JobSpec, settings: ControlPlaneSettings) -> dict[str, Any]:
    """Trainer <-> trainer traffic within one attempt of one fine-tune, and nothing more.

    Added to the namespace's default deny and the static ``huvidpo-trainer`` policy (deploy/): it
    selects this attempt's pods by label and lets them reach each other on every TCP port, since
    NCCL and gloo listen on ephemeral ports beside torchrun's rendezvous port and have no setting
    that pins them to a range. Pods of other fine-tunes (or other attempts) are not selected."""
    name = job_name(spec.finetune_id, spec.attempt)
    peers = {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                LABEL_FINETUNE: spec.finetune_id,
                LABEL_ATTEMPT: str(spec.attempt),
            }
        }
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": trainer_labels(spec)},
        "spec": {
            "podSelector": peers["podSelector"],
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [peers], "ports": [{"protocol": "TCP", "port": 1, "endPort": 65535}]}],
            "egress": [{"to": [peers], "ports": [{"protocol": "TCP", "port": 1, "endPort": 65535}]}],
        },
    }


def build_objects(
    spec: JobSpec, settings: ControlPlaneSettings, store: StoreSettings
) -> list[dict[str, Any]]:
    """Every object one attempt needs, in creation order (the Job last: its pods find the rest)."""
    objects: list[dict[str, Any]] = []
    if spec.nodes > 1:
        objects += [build_service(spec, settings), build_network_policy(spec, settings)]
    return [*objects, build_job(spec, settings, store)]


def _attempt_of(obj: Mapping[str, Any]) -> int:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    try:
        return int(labels.get(LABEL_ATTEMPT) or 1)
    except ValueError:
        return 1


def job_status(job: Mapping[str, Any] | None) -> ExecStatus:
    """Map a Job (as a plain dict, camelCase as the API serves it) to the executor's status."""
    if job is None:
        return ExecStatus("missing")
    meta = job.get("metadata") or {}
    ref = {
        "kind": "kubernetes",
        "name": str(meta.get("name", "")),
        "namespace": str(meta.get("namespace", "")),
    }
    status = job.get("status") or {}
    attempt = _attempt_of(job)
    # An Indexed Job is a group whose restart is the control plane's (backoffLimitPerIndex 0); a
    # plain Job has spent its own backoffLimit already. Bad input (podFailurePolicy FailJob on exit
    # 2) is never retried; the domain also reads the trainer's end record (torchrun exits 1 for any
    # failed rank, whatever the rank's own exit code).
    indexed = (job.get("spec") or {}).get("completionMode") == "Indexed"
    for cond in status.get("conditions") or []:
        if str(cond.get("status")) != "True":
            continue
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return ExecStatus("succeeded", job=ref, attempt=attempt)
        if cond.get("type") in ("Failed", "FailureTarget"):
            reason = cond.get("reason") or "JobFailed"
            retryable = indexed and reason not in ("PodFailurePolicy", "DeadlineExceeded")
            return ExecStatus(
                "failed", reason, cond.get("message"), job=ref, attempt=attempt, retryable=retryable
            )
    completions = int((job.get("spec") or {}).get("completions") or 1)
    if (status.get("succeeded") or 0) >= completions and not (status.get("active") or 0):
        return ExecStatus("succeeded", job=ref, attempt=attempt)
    if (status.get("active") or 0) > 0:
        return ExecStatus("running", job=ref, attempt=attempt)
    return ExecStatus("pending", job=ref, attempt=attempt)


def load_api_client(context: str | None = None) -> Any:
    """In-cluster config when running in a pod, else the kubeconfig (optionally a named context)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(context=context)
    return client.ApiClient()


class KubernetesExecutor:
    kind = "kubernetes"
    container = CONTAINER  # whose log ``logs`` reads

    def __init__(
        self, api_client: Any, settings: ControlPlaneSettings, store: StoreSettings | None = None
    ) -> None:
        from kubernetes import client

        self.api = api_client
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.settings = settings
        self.store_settings = store or StoreSettings()
        self.namespace = settings.namespace

    def _to_dict(self, job: Any) -> dict[str, Any]:
        data: dict[str, Any] = self.api.sanitize_for_serialization(job)
        return data

    def submit(self, spec: JobSpec) -> dict[str, str]:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        net = client.NetworkingV1Api(self.api)
        objects = build_objects(spec, self.settings, self.store_settings)
        for body in objects:
            try:
                if body["kind"] == "Service":
                    self.core.create_namespaced_service(self.namespace, body)  # type: ignore[arg-type]
                elif body["kind"] == "NetworkPolicy":
                    net.create_namespaced_network_policy(self.namespace, body)  # type: ignore[arg-type]
                else:  # a dict body is accepted
                    self.batch.create_namespaced_job(self.namespace, body)  # type: ignore[arg-type]
            except ApiException as exc:
                if exc.status != 409:  # 409: it exists already (a retried submit): nothing to do
                    raise _unavailable(exc) from exc
        return {"kind": self.kind, "name": objects[-1]["metadata"]["name"], "namespace": self.namespace}

    def _jobs_of(self, finetune_id: str) -> list[dict[str, Any]]:
        """The fine-tune's Jobs (one per attempt), oldest attempt first."""
        from kubernetes.client.exceptions import ApiException

        try:
            jobs: Any = self.batch.list_namespaced_job(
                self.namespace, label_selector=f"{LABEL_FINETUNE}={finetune_id}", _request_timeout=30
            )
        except ApiException as exc:
            raise _unavailable(exc) from exc
        items = [self._to_dict(j) for j in jobs.items or []]
        # Filter here too: the label selector is advisory for some API servers (and for test doubles).
        mine = [
            j
            for j in items
            if ((j.get("metadata") or {}).get("labels") or {}).get(LABEL_FINETUNE) == finetune_id
        ]
        return sorted(mine, key=_attempt_of)

    def status(self, finetune_id: str) -> ExecStatus:
        jobs = self._jobs_of(finetune_id)
        return job_status(jobs[-1]) if jobs else ExecStatus("missing")

    def cancel(self, finetune_id: str) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        net = client.NetworkingV1Api(self.api)
        options = client.V1DeleteOptions(propagation_policy=self.settings.delete_propagation)
        for job in self._jobs_of(finetune_id) or [{"metadata": {"name": job_name(finetune_id)}}]:
            name = str(job["metadata"]["name"])
            multinode = (job.get("spec") or {}).get("completionMode") == "Indexed"
            deletes: list[tuple[Callable[..., Any], dict[str, Any]]] = [
                (self.batch.delete_namespaced_job, {"body": options})
            ]
            if multinode:
                deletes += [
                    (self.core.delete_namespaced_service, {}),
                    (net.delete_namespaced_network_policy, {}),
                ]
            for delete, kwargs in deletes:
                try:
                    delete(name, self.namespace, **kwargs)
                except ApiException as exc:
                    if exc.status != 404:
                        raise _unavailable(exc) from exc

    def ready(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.list_namespaced_job(self.namespace, limit=1, _request_timeout=5)
            return True
        except (ApiException, OSError):
            return False

    # -------------------------------------------------------------------------------------- logs
    # How often ``logs(follow=True)`` looks again for the Job's pod while none has started.
    log_poll_seconds = 1.0

    def _job_pods(self, name: str) -> list[dict[str, Any]]:
        """The Job's pods, oldest first (as plain camelCase dicts)."""
        from kubernetes.client.exceptions import ApiException

        try:
            pods: Any = self.core.list_namespaced_pod(
                self.namespace, label_selector=f"{self._pod_owner_label()}={name}", _request_timeout=30
            )
        except ApiException as exc:
            raise _unavailable(exc) from exc
        items = [self.api.sanitize_for_serialization(p) for p in pods.items or []]
        # Filter here too: the label selector is advisory for some API servers (and for test doubles).
        mine = [p for p in items if _pod_job(p, self._pod_owner_label()) == name]
        return sorted(mine, key=_pod_age_key)

    def _pod_owner_label(self) -> str:
        """The pod label naming the object (Job, JobSet) a pod belongs to."""
        return "job-name"

    def _open_log(self, pod: str, follow: bool) -> Any | None:
        """The pod's log as an unread HTTP response, or ``None`` when there is none (yet, or any more)."""
        from kubernetes.client.exceptions import ApiException

        # (connect, read) in seconds; none when following: a quiet trainer is not a dead stream (and
        # the client rejects a read timeout of None)
        timeout = None if follow else (10, 60)
        try:
            return self.core.read_namespaced_pod_log(
                pod,
                self.namespace,
                container=self.container,
                follow=follow,
                _preload_content=False,
                _request_timeout=timeout,
            )
        except ApiException as exc:
            # 400: the container is waiting to start (ContainerCreating, image pull...);
            # 404: the pod is gone (a retry replaced it, or the TTL collected the Job).
            if exc.status in (400, 404):
                return None
            raise _unavailable(exc) from exc

    def logs(self, finetune_id: str, follow: bool = False) -> Iterator[bytes]:
        """The trainer's output from the Job's newest pod (a retry's pod, not its failed predecessor).

        Without ``follow``: what the pod has written so far; nothing when no pod has started yet.
        With ``follow``: streams until the container exits; while the Job has no pod or a Pending
        one, waits (yielding empty heartbeats), and ends at once if the Job finishes without a pod
        that ran. The pod list and the log request are made before this returns, so a failing
        API raises ``Unavailable`` here, before any byte (a REST client gets a 503, not a cut 200).
        """
        jobs = self._jobs_of(finetune_id)
        name = str(jobs[-1]["metadata"]["name"]) if jobs else job_name(finetune_id)
        resp = self._open_newest_log(name, follow)
        if resp is not None:
            return _chunks(resp)
        return self._wait_and_follow(finetune_id, name) if follow else iter(())

    def _open_newest_log(self, name: str, follow: bool) -> Any | None:
        """The unread log response of Job ``name``'s newest pod; None while it has no started pod."""
        pods = self._job_pods(name)
        pod = pods[-1] if pods else None
        return self._open_log(str(pod["metadata"]["name"]), follow) if _started(pod) else None

    def _wait_and_follow(self, finetune_id: str, name: str) -> Iterator[bytes]:
        while True:
            if self.status(finetune_id).phase in ("succeeded", "failed", "missing"):
                # Finished before we saw its pod run: show whatever the newest pod left, then end.
                resp = self._open_newest_log(name, False)
                if resp is not None:
                    yield from _chunks(resp)
                return
            yield b""  # a heartbeat: lets a consumer that went away stop us between polls
            time.sleep(self.log_poll_seconds)
            resp = self._open_newest_log(name, True)
            if resp is not None:
                yield from _chunks(resp)
                return

    # ------------------------------------------------------------------------------------- watch
    def _deliver(self, job: Mapping[str, Any], on_event: Callable[[str, ExecStatus], None]) -> None:
        labels = (job.get("metadata") or {}).get("labels") or {}
        # Filter here too: the label selector is advisory for some API servers (and for test doubles).
        if labels.get("app.kubernetes.io/managed-by") != MANAGED_BY or not labels.get(LABEL_FINETUNE):
            return
        try:
            on_event(str(labels[LABEL_FINETUNE]), job_status(job))
        except Exception:
            log.exception("reconciling fine-tune %s failed", labels.get(LABEL_FINETUNE))

    def resync(self, on_event: Callable[[str, ExecStatus], None]) -> int:
        jobs = self.batch.list_namespaced_job(self.namespace, label_selector=SELECTOR, _request_timeout=30)
        n = 0
        for job in jobs.items or []:
            self._deliver(self._to_dict(job), on_event)
            n += 1
        return n

    def watch_once(self, on_event: Callable[[str, ExecStatus], None], stop: threading.Event) -> None:
        """One watch stream, ended by the request timeout (the server may never end it) or ``stop``."""
        from kubernetes import watch

        w = watch.Watch()
        try:
            for event in w.stream(
                self.batch.list_namespaced_job,
                self.namespace,
                label_selector=SELECTOR,
                _request_timeout=self.settings.watch_timeout_seconds,
            ):
                if stop.is_set():
                    break
                obj = event.get("object")
                if event.get("type") in ("ADDED", "MODIFIED") and obj is not None:
                    self._deliver(self._to_dict(obj), on_event)
        finally:
            w.stop()

    def start_watch(
        self, on_event: Callable[[str, ExecStatus], None], stop: threading.Event
    ) -> threading.Thread:
        def loop() -> None:
            last_resync = 0.0
            backoff = 1.0
            while not stop.is_set():
                try:
                    if time.monotonic() - last_resync >= self.settings.resync_seconds:
                        self.resync(on_event)
                        last_resync = time.monotonic()
                    self.watch_once(on_event, stop)
                    backoff = 1.0
                except Exception as exc:  # timeouts end every stream; API errors are retried
                    if not _is_timeout(exc):
                        log.warning("job watch failed (%s); retrying in %.0fs", exc, backoff)
                        stop.wait(backoff)
                        backoff = min(backoff * 2, 30.0)

        thread = threading.Thread(target=loop, name="huvidpo-job-watch", daemon=True)
        thread.start()
        return thread


def _pod_job(pod: Mapping[str, Any], label: str = "job-name") -> str | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    value = labels.get(label) or (labels.get("batch.kubernetes.io/job-name") if label == "job-name" else None)
    return str(value) if value else None


def _pod_age_key(pod: Mapping[str, Any]) -> tuple[str, int, str]:
    meta = pod.get("metadata") or {}
    ended = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
    # creationTimestamp has a one-second resolution: within one second, the pod still live is the
    # retry of the one that ended.
    return (str(meta.get("creationTimestamp") or ""), 0 if ended else 1, str(meta.get("name", "")))


def _started(pod: Mapping[str, Any] | None) -> TypeGuard[Mapping[str, Any]]:
    """Whether the pod's container has started, so it has a log (a Pending pod has none yet)."""
    return pod is not None and (pod.get("status") or {}).get("phase") not in (None, "", "Pending")


def _chunks(resp: Any) -> Iterator[bytes]:
    """The body of an unread log response as it arrives; the connection is closed when done or dropped."""
    try:
        yield from resp.stream(64 * 1024)
    finally:
        resp.close()
        resp.release_conn()


def _is_timeout(exc: BaseException) -> bool:
    name = type(exc).__name__
    return "Timeout" in name or "timed out" in str(exc)


def _unavailable(exc: Exception) -> Exception:
    from services.controlplane.domain.errors import Unavailable

    return Unavailable(
        f"the Kubernetes API failed: {getattr(exc, 'status', '')} {getattr(exc, 'reason', exc)}"
    )
