"""``KubernetesExecutor``: one batch/v1 Job per fine-tune, through the official ``kubernetes`` client.

Following kopf's habit, the Job is built by one pure function (``build_job``: settings and a spec
in, a plain dict out; unit-tested and schema-validated) and the API is talked to elsewhere. The
Job name is derived from the fine-tune id, so a repeated submit meets ``409 AlreadyExists`` and
starts nothing: with the deterministic ids of ``Idempotency-Key`` creates, a retry makes one Job.

Status: ``status()`` reads the Job; ``start_watch`` runs a watch (with a client-side request
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
SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
WORK_DIR = "/work"
# The trainer serves /metrics here while it trains; the pod annotations tell Prometheus (deploy/).
TRAINER_METRICS_PORT = 9091
# The trainer keeps serving /metrics this long after its last step so that Prometheus scrapes a short
# run's final values: two scrape intervals of the shipped configs (15 s, deploy/monitoring).
TRAINER_METRICS_LINGER_SECONDS = 30


def job_name(finetune_id: str) -> str:
    return f"huvidpo-{finetune_id}"[:63].rstrip("-")


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


def build_job(spec: JobSpec, settings: ControlPlaneSettings, store: StoreSettings) -> dict[str, Any]:
    """The batch/v1 Job that runs the trainer for ``spec`` (pure; no API call)."""
    name = job_name(spec.finetune_id)
    labels = {
        "app.kubernetes.io/name": "huvidpo-trainer",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_FINETUNE: spec.finetune_id,
    }
    for key in ("dataset", "base_model"):
        if spec.lineage.get(key):
            labels[f"huvidpo.dev/{key.replace('_', '-')}"] = _label_value(spec.lineage[key])
    # Digests are 64+ characters: too long for labels, so lineage goes into annotations.
    annotations = {f"huvidpo.dev/{k.replace('_', '-')}": str(v) for k, v in sorted(spec.lineage.items())}
    annotations["huvidpo.dev/stage"] = str(spec.config.get("stage", "dpo"))
    requests: dict[str, str] = {"cpu": settings.cpu_request, "memory": settings.memory_request}
    limits: dict[str, str] = {"memory": settings.memory_limit}
    if settings.gpu_count > 0:
        requests[settings.gpu_resource] = str(settings.gpu_count)
        limits[settings.gpu_resource] = str(settings.gpu_count)
    env = [
        {"name": "HUVIDPO_TRAINER_FINETUNE_ID", "value": spec.finetune_id},
        {"name": "HUVIDPO_TRAINER_WORK_DIR", "value": WORK_DIR},
        {"name": "HUVIDPO_TRAINER_DEVICE", "value": "cuda" if settings.gpu_count > 0 else "cpu"},
        {"name": "HUVIDPO_TRAINER_METRICS_HOST", "value": "0.0.0.0"},
        {"name": "HUVIDPO_TRAINER_METRICS_PORT", "value": str(TRAINER_METRICS_PORT)},
        {"name": "HUVIDPO_TRAINER_METRICS_LINGER_SECONDS", "value": str(TRAINER_METRICS_LINGER_SECONDS)},
        *store_env(store, settings.store_secret),
    ]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; retries are new pods
        "terminationGracePeriodSeconds": 120,  # SIGTERM: the trainer checkpoints, then exits 75
        "containers": [
            {
                "name": CONTAINER,
                "image": settings.trainer_image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": list(settings.trainer_command),
                "env": env,
                "ports": [{"name": "metrics", "containerPort": TRAINER_METRICS_PORT, "protocol": "TCP"}],
                "resources": {"requests": requests, "limits": limits},
                "volumeMounts": [
                    {"name": "work", "mountPath": WORK_DIR},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
                # Pod Security "restricted" (enforced on the namespace by deploy/): the root
                # filesystem stays read-only, /tmp (HOME and caches in the image) is an emptyDir.
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": [{"name": "work", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
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
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "backoffLimit": settings.job_backoff_limit,
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
                "metadata": {
                    "labels": dict(labels),
                    "annotations": {
                        **annotations,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(TRAINER_METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


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
    for cond in status.get("conditions") or []:
        if str(cond.get("status")) != "True":
            continue
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return ExecStatus("succeeded", job=ref)
        if cond.get("type") in ("Failed", "FailureTarget"):
            return ExecStatus("failed", cond.get("reason") or "JobFailed", cond.get("message"), job=ref)
    if (status.get("succeeded") or 0) > 0 and not (status.get("active") or 0):
        return ExecStatus("succeeded", job=ref)
    if (status.get("active") or 0) > 0:
        return ExecStatus("running", job=ref)
    return ExecStatus("pending", job=ref)


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
        from kubernetes.client.exceptions import ApiException

        body = build_job(spec, self.settings, self.store_settings)
        try:
            self.batch.create_namespaced_job(self.namespace, body)  # type: ignore[arg-type]  # a dict body is accepted
        except ApiException as exc:
            if exc.status != 409:  # 409: the Job exists already (a retried submit): nothing to do
                raise _unavailable(exc) from exc
        return {"kind": self.kind, "name": body["metadata"]["name"], "namespace": self.namespace}

    def status(self, finetune_id: str) -> ExecStatus:
        from kubernetes.client.exceptions import ApiException

        try:
            job = self.batch.read_namespaced_job_status(job_name(finetune_id), self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return ExecStatus("missing")
            raise _unavailable(exc) from exc
        return job_status(self._to_dict(job))

    def cancel(self, finetune_id: str) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(
                job_name(finetune_id),
                self.namespace,
                body=client.V1DeleteOptions(propagation_policy=self.settings.delete_propagation),
            )
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
                self.namespace, label_selector=f"job-name={name}", _request_timeout=30
            )
        except ApiException as exc:
            raise _unavailable(exc) from exc
        items = [self.api.sanitize_for_serialization(p) for p in pods.items or []]
        # Filter here too: the label selector is advisory for some API servers (and for test doubles).
        mine = [p for p in items if _pod_job(p) == name]
        return sorted(mine, key=_pod_age_key)

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
                container=CONTAINER,
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
        name = job_name(finetune_id)
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


def _pod_job(pod: Mapping[str, Any]) -> str | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    value = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
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
