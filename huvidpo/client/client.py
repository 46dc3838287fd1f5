"""``Client``: the control plane's REST API and the inference service's gRPC API as typed methods.

Responses are the API's JSON objects as ``dict`` (the shapes of the OpenAPI schema at
``/openapi.json``); listings are iterators that follow ``next_page_token``. Configuration comes from
the arguments, else ``HUVIDPO_URL``, ``HUVIDPO_TOKEN`` and ``HUVIDPO_GRPC_ADDRESS``.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from huvidpo.client._http import Backoff, Http, Multipart, Part, Progress, new_key
from huvidpo.client.errors import (
    Conflict,
    ConnectionFailed,
    GenerationError,
    HuViDPOError,
    RateLimited,
    ServerError,
    UploadInterrupted,
    WaitTimeout,
)

TERMINAL = ("succeeded", "failed", "cancelled")
View = dict[str, Any]


def _files_of(directory: Path) -> list[tuple[str, Path]]:
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"directory not found: {directory}")
    out = [(p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*")) if p.is_file()]
    if not out:
        raise FileNotFoundError(f"directory {directory} holds no file")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def _batches(
    files: list[tuple[str, Path]], max_bytes: int, max_files: int
) -> Iterator[list[tuple[str, Path]]]:
    batch: list[tuple[str, Path]] = []
    size = 0
    for rel, p in files:
        n = p.stat().st_size
        if batch and (size + n > max_bytes or len(batch) >= max_files):
            yield batch
            batch, size = [], 0
        batch.append((rel, p))
        size += n
    if batch:
        yield batch


class _Resource:
    def __init__(self, client: Client) -> None:
        self._c = client
        self._http = client.http


# ------------------------------------------------------------------------------------------- models
class Models(_Resource):
    """Base models: ``models/{id}/`` in the store, what fine-tunes adapt (``POST/GET /v1/models``)."""

    def register(
        self,
        id: str,
        directory: str | Path | None = None,
        *,
        from_prefix: str | None = None,
        description: str = "",
        on_progress: Progress | None = None,
    ) -> View:
        """Register a base model from a local diffusers ``directory`` (streamed multipart, one part
        per file named by its relative path) or from files already in the store (``from_prefix``).
        The same content again answers the existing model; other content under ``id`` is a Conflict."""
        if (directory is None) == (from_prefix is None):
            raise ValueError("give a model directory or a store prefix (from_prefix), not both")
        if from_prefix is not None:
            body = {"id": id, "from_prefix": from_prefix, "description": description}
            return dict(self._http.json("POST", "/v1/models", json=body, idempotency_key=new_key()))
        files = _files_of(Path(directory))  # type: ignore[arg-type]
        total = sum(p.stat().st_size for _, p in files)
        parts = [Part("id", value=id), Part("description", value=description)]
        parts += [Part("files", path=p, filename=rel) for rel, p in files]
        sent = (lambda n: on_progress(n, total)) if on_progress is not None else None
        return dict(
            self._http.json("POST", "/v1/models", body=Multipart(parts, sent), idempotency_key=new_key())
        )

    def list(self, page_size: int | None = None) -> Iterator[View]:
        return self._http.pages("/v1/models", page_size=page_size)

    def get(self, id: str) -> View:
        return dict(self._http.json("GET", f"/v1/models/{id}"))

    def delete(self, id: str) -> None:
        """Delete a base model (``admin``); a ``Conflict`` names the fine-tunes that still hold it."""
        self._http.request("DELETE", f"/v1/models/{id}")


# ----------------------------------------------------------------------------------------- datasets
class Datasets(_Resource):
    """Datasets of rated videos and their immutable, content-addressed versions."""

    def create(self, name: str, description: str = "", *, exist_ok: bool = False) -> View:
        """Create a dataset; with ``exist_ok`` an existing one is answered instead of a Conflict."""
        try:
            body = {"name": name, "description": description}
            return dict(self._http.json("POST", "/v1/datasets", json=body, idempotency_key=new_key()))
        except Conflict:
            if not exist_ok:
                raise
            return self.get(name)

    def list(self, page_size: int | None = None) -> Iterator[View]:
        return self._http.pages("/v1/datasets", page_size=page_size)

    def get(self, name: str) -> View:
        return dict(self._http.json("GET", f"/v1/datasets/{name}"))

    def delete(self, name: str, version: str | None = None) -> None:
        """Delete a dataset, or one version of it (``admin``); a ``Conflict`` names the fine-tunes that
        still hold it (active, or with checkpoints)."""
        path = f"/v1/datasets/{name}" + (f"/versions/{version}" if version else "")
        self._http.request("DELETE", path)

    def versions(self, name: str) -> builtins.list[View]:
        return list(self._http.json("GET", f"/v1/datasets/{name}/versions")["items"])

    def version(self, name: str, version: str) -> View:
        return dict(self._http.json("GET", f"/v1/datasets/{name}/versions/{version}"))

    def upload(
        self,
        name: str,
        directory: str | Path,
        *,
        on_progress: Progress | None = None,
        resume: str | None = None,
        include_ratings: bool = True,
        batch_bytes: int = 256 * 1024 * 1024,
        batch_files: int = 500,
    ) -> View:
        """Upload every file of ``directory`` (a manifest + videos) and commit it as a new version.

        Files go through an upload session, streamed in multipart batches (``batch_bytes`` /
        ``batch_files`` per request); ``on_progress(done_bytes, total_bytes)`` follows the bytes.
        When it stops part way (server or connection lost) it raises :class:`UploadInterrupted`
        whose ``upload_id`` passed as ``resume`` sends only the files the session lacks."""
        files = _files_of(Path(directory))
        total = sum(p.stat().st_size for _, p in files)
        if resume:
            session = self._http.json("GET", f"/v1/datasets/{name}/uploads/{resume}")
            staged = session.get("files") or {}
            todo = []
            for rel, p in files:
                have = staged.get(rel)
                same = (
                    have is not None
                    and have.get("size") == p.stat().st_size
                    and (have.get("sha256") in (None, _sha256(p)))
                )
                if not same:
                    todo.append((rel, p))
        else:
            session = self._http.json("POST", f"/v1/datasets/{name}/uploads", idempotency_key=new_key())
            todo = files
        upload_id = str(session["id"])
        done = total - sum(p.stat().st_size for _, p in todo)
        if on_progress is not None:
            on_progress(done, total)
        try:
            for batch in _batches(todo, batch_bytes, batch_files):
                base = done
                sent = (lambda n, base=base: on_progress(base + n, total)) if on_progress else None
                parts = [Part("files", path=p, filename=rel) for rel, p in batch]
                self._http.request(
                    "POST", f"/v1/datasets/{name}/uploads/{upload_id}/files", body=Multipart(parts, sent)
                )
                done = base + sum(p.stat().st_size for _, p in batch)
            return dict(
                self._http.json(
                    "POST",
                    f"/v1/datasets/{name}/uploads/{upload_id}/commit",
                    json={"include_ratings": include_ratings},
                )
            )
        except (ConnectionFailed, ServerError, RateLimited) as exc:
            raise UploadInterrupted(name, upload_id, exc) from exc
        except KeyboardInterrupt as exc:
            exc.upload_id = upload_id  # type: ignore[attr-defined]  # (the CLI prints how to resume)
            raise

    def compile_pairs(
        self,
        name: str,
        version: str,
        *,
        tie_policy: str = "drop",
        min_margin: float | None = None,
        margin_weighting: bool | None = None,
        seed: int | None = None,
        holdout_fraction: float | None = None,
        holdout_seed: int | None = None,
    ) -> View:
        """Compile the version's preference pairs (what a fine-tune trains on) and report on them."""
        body: dict[str, Any] = {"tie_policy": tie_policy}
        for k, v in (
            ("min_margin", min_margin),
            ("margin_weighting", margin_weighting),
            ("seed", seed),
            ("holdout_fraction", holdout_fraction),
            ("holdout_seed", holdout_seed),
        ):
            if v is not None:
                body[k] = v
        return dict(self._http.json("POST", f"/v1/datasets/{name}/versions/{version}/pairs", json=body))

    def preference(self, name: str, version: str, *, min_raters: int | None = None) -> View:
        """The version's A/B round: progress, and once complete its ``summary`` (win/tie/loss, win
        rate with its Wilson 95% interval per checkpoint pair and per prompt, Bradley-Terry ranking)."""
        return dict(
            self._http.json(
                "GET",
                f"/v1/datasets/{name}/versions/{version}/preference",
                params={"min_raters": min_raters},
            )
        )


class Pairs(_Resource):
    """``client.pairs.compile(dataset, version)``: the same call as ``datasets.compile_pairs``."""

    def compile(self, dataset: str, version: str, **options: Any) -> View:
        return self._c.datasets.compile_pairs(dataset, version, **options)


# ------------------------------------------------------------------------------------------ ratings
class Ratings(_Resource):
    """Judgments of a dataset's videos: ``rating`` (a 0-10 score) and ``choice`` (A over B) records."""

    def add(self, dataset: str, records: Sequence[Mapping[str, Any]]) -> list[str]:
        """Store records (each ``{"type": "rating", "video_id", "rater_id", "score"}`` or
        ``{"type": "choice", "chosen", "rejected", "rater_id"}``); returns their ids."""
        body = {"records": [dict(r) for r in records]}
        out = self._http.json("POST", f"/v1/datasets/{dataset}/ratings", json=body, idempotency_key=new_key())
        return list(out["ids"])

    def list(self, dataset: str, page_size: int | None = None) -> Iterator[View]:
        return self._http.pages(f"/v1/datasets/{dataset}/ratings", page_size=page_size)


# --------------------------------------------------------------------------------------- fine-tunes
class FineTunes(_Resource):
    """DPO (or stage-1) fine-tunes: long-running jobs with a state you poll, events, logs, checkpoints."""

    def create(
        self,
        dataset: str,
        version: str,
        base_model: str,
        hyperparameters: Mapping[str, Any] | None = None,
        *,
        stage: str = "dpo",
        nodes: int | None = None,
        gpus_per_node: int | None = None,
        idempotency_key: str | None = None,
    ) -> View:
        """Start a fine-tune. Every retry carries the same Idempotency-Key (a new uuid4 unless given),
        so a retried create never starts a second job."""
        body: dict[str, Any] = {
            "dataset": dataset,
            "version": version,
            "base_model": base_model,
            "stage": stage,
        }
        body["hyperparameters"] = dict(hyperparameters or {})
        if nodes is not None:
            body["nodes"] = nodes
        if gpus_per_node is not None:
            body["gpus_per_node"] = gpus_per_node
        key = idempotency_key or new_key()
        return dict(self._http.json("POST", "/v1/fine-tunes", json=body, idempotency_key=key))

    def get(self, id: str) -> View:
        return dict(self._http.json("GET", f"/v1/fine-tunes/{id}"))

    def delete(self, id: str) -> None:
        """Delete a finished fine-tune with no checkpoint left (``admin``)."""
        self._http.request("DELETE", f"/v1/fine-tunes/{id}")

    def list(
        self,
        *,
        state: str | None = None,
        dataset: str | None = None,
        base_model: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[View]:
        params = {"state": state, "dataset": dataset, "base_model": base_model}
        return self._http.pages("/v1/fine-tunes", params, page_size)

    def cancel(self, id: str) -> View:
        return dict(self._http.json("POST", f"/v1/fine-tunes/{id}/cancel"))

    def wait(
        self,
        id: str,
        on_progress: Callable[[View], None] | None = None,
        *,
        timeout: float | None = None,
        interval: float = 1.0,
        until: Callable[[View], bool] | None = None,
    ) -> View:
        """Poll until the fine-tune is succeeded, failed or cancelled (or ``until(view)`` holds);
        ``on_progress(view)`` sees each view (``view["progress"]``: step, total_steps, loss,
        reward_accuracy, eta_seconds). Returns the last view; raises :class:`WaitTimeout` after
        ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.get(id)
            if on_progress is not None:
                on_progress(view)
            if view["state"] in TERMINAL or (until is not None and until(view)):
                return view
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"fine-tune {id} still {view['state']} after {timeout:.0f} s")
            time.sleep(interval)

    def events(self, id: str, *, after: int | None = None, limit: int | None = None) -> View:
        """One page of the typed progress events: ``{"items": [{"seq", "event", ...}], "next_after"}``."""
        return dict(
            self._http.json("GET", f"/v1/fine-tunes/{id}/events", params={"after": after, "limit": limit})
        )

    def iter_events(self, id: str, *, after: int = -1, follow: bool = False) -> Iterator[View]:
        """Every event after ``after``; with ``follow``, a stream that ends when the fine-tune has
        ended and all its events are sent (NDJSON)."""
        if follow:
            params = {"follow": True, "after": after}
            resp = self._http.request("GET", f"/v1/fine-tunes/{id}/events", params=params, stream=True)
            try:
                for line in resp.iter_lines():
                    if line.strip():
                        yield json.loads(line)
            finally:
                resp.close()
            return
        cursor: int | None = after
        while True:
            page = self.events(id, after=cursor)
            yield from page.get("items", [])
            if page.get("next_after") is None:
                return
            cursor = int(page["next_after"])

    def metrics(self, id: str) -> View:
        """The step metrics' history: ``{"steps": [...], "metrics": {"loss": [...], ...}}``."""
        return dict(self._http.json("GET", f"/v1/fine-tunes/{id}/metrics"))

    def logs(self, id: str, *, follow: bool = False) -> Iterator[str]:
        """The trainer's output as text chunks; with ``follow`` until the job ends."""
        resp = self._http.request("GET", f"/v1/fine-tunes/{id}/logs", params={"follow": follow}, stream=True)
        try:
            yield from resp.iter_text()
        finally:
            resp.close()

    def checkpoints(self, id: str, page_size: int | None = None) -> Iterator[View]:
        return self._http.pages(f"/v1/fine-tunes/{id}/checkpoints", page_size=page_size)


# -------------------------------------------------------------------------------------- checkpoints
class Checkpoints(_Resource):
    """LoRA checkpoints of fine-tunes, with their lineage, files and sample videos."""

    def list(self, finetune_id: str | None = None, page_size: int | None = None) -> Iterator[View]:
        return self._http.pages("/v1/checkpoints", {"finetune_id": finetune_id}, page_size)

    def get(self, id: str) -> View:
        return dict(self._http.json("GET", f"/v1/checkpoints/{id}"))

    def delete(self, id: str) -> None:
        """Delete a checkpoint no rollout serves and no active fine-tune may resume from (``admin``)."""
        self._http.request("DELETE", f"/v1/checkpoints/{id}")

    def download(self, id: str, directory: str | Path, *, on_progress: Progress | None = None) -> Path:
        """Every file of the checkpoint (and its manifest) into ``directory``, each checked against
        its sha256 in the checkpoint's listing; returns ``directory``."""
        ck = self.get(id)
        urls = self._http.json("GET", f"/v1/checkpoints/{id}/download")["urls"]
        out = Path(directory)
        files = ck.get("files") or {}
        total = sum(int(f.get("size") or 0) for f in files.values())
        done = 0
        for rel, url in sorted(urls.items()):
            rel_path = PurePosixPath(rel)
            if rel_path.is_absolute() or ".." in rel_path.parts:
                raise HuViDPOError(f"checkpoint {id} names a file outside its folder: {rel}")
            target = out.joinpath(*rel_path.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            h = hashlib.sha256()
            resp = self._http.request(
                "GET", url, stream=True, presigned=url.startswith(("http://", "https://"))
            )
            try:
                with open(tmp, "wb") as fh:
                    for chunk in resp.iter_bytes(1024 * 1024):
                        fh.write(chunk)
                        h.update(chunk)
                        if rel in files:
                            done += len(chunk)
                            if on_progress is not None:
                                on_progress(done, total)
            finally:
                resp.close()
            want = (files.get(rel) or {}).get("sha256")
            if want and want != h.hexdigest():
                tmp.unlink(missing_ok=True)
                raise HuViDPOError(f"checkpoint {id}: {rel} does not match its sha256 (download again)")
            os.replace(tmp, target)
        return out

    def preference(self, id: str, *, min_raters: int | None = None) -> View:
        """Human win rates of ``id`` (or ``"base"``) in every A/B round comparing it, from its side:
        ``{"checkpoint", "ties", "rounds": [{..., "complete", "results"}]}``; a round still being
        judged has ``results`` None."""
        return dict(
            self._http.json("GET", f"/v1/checkpoints/{id}/preference", params={"min_raters": min_raters})
        )

    def sample(self, id: str, index: int, path: str | Path) -> Path:
        """Save the checkpoint's sample video ``index`` (``GET /v1/checkpoints/{id}/samples/{index}``)."""
        resp = self._http.request("GET", f"/v1/checkpoints/{id}/samples/{index}", stream=True)
        target = Path(path)
        try:
            with open(target, "wb") as fh:
                for chunk in resp.iter_bytes(1024 * 1024):
                    fh.write(chunk)
        finally:
            resp.close()
        return target


# -------------------------------------------------------------------------------------- evaluations
class Evaluations(_Resource):
    """Evaluations of checkpoints (held-out accuracy, video statistics, motion collapse): Jobs with a
    state you poll, a record once finished and a comparison plot."""

    def create(
        self,
        checkpoint: str,
        *,
        baseline: str | None = "base",
        dataset: str | None = None,
        version: str | None = None,
        pairs: Mapping[str, Any] | None = None,
        prompts: Sequence[str | Mapping[str, Any]] | None = None,
        seeds: Sequence[int] | None = None,
        generation: Mapping[str, Any] | None = None,
        dpo: Mapping[str, Any] | None = None,
        clip_model: str | None = None,
        motion_collapse_ratio: float | None = None,
        idempotency_key: str | None = None,
    ) -> View:
        """Evaluate ``checkpoint`` against ``baseline`` (``"base"``, another checkpoint id, or None).
        Held-out pairs: the fine-tune's by default, else ``dataset``/``version`` compiled with
        ``pairs`` options; ``prompts``: strings or ``{"prompt", "first_frame"}`` (default: the
        held-out prompts). Every retry carries the same Idempotency-Key."""
        body: dict[str, Any] = {"checkpoint": checkpoint, "baseline": baseline}
        optional = {
            "dataset": dataset,
            "version": version,
            "pairs": dict(pairs) if pairs is not None else None,
            "prompts": [{"prompt": p} if isinstance(p, str) else dict(p) for p in prompts]
            if prompts is not None
            else None,
            "seeds": list(seeds) if seeds is not None else None,
            "generation": dict(generation) if generation else None,
            "dpo": dict(dpo) if dpo else None,
            "clip_model": clip_model,
            "motion_collapse_ratio": motion_collapse_ratio,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        key = idempotency_key or new_key()
        return dict(self._http.json("POST", "/v1/evaluations", json=body, idempotency_key=key))

    def get(self, id: str) -> View:
        return dict(self._http.json("GET", f"/v1/evaluations/{id}"))

    def cancel(self, id: str) -> View:
        """Cancel an evaluation that has not finished (its Job is stopped); a ``Conflict`` once it has."""
        return dict(self._http.json("POST", f"/v1/evaluations/{id}/cancel"))

    def list(
        self, *, checkpoint: str | None = None, state: str | None = None, page_size: int | None = None
    ) -> Iterator[View]:
        return self._http.pages("/v1/evaluations", {"checkpoint": checkpoint, "state": state}, page_size)

    def wait(
        self,
        id: str,
        on_progress: Callable[[View], None] | None = None,
        *,
        timeout: float | None = None,
        interval: float = 1.0,
    ) -> View:
        """Poll until the evaluation succeeded or failed; returns the last view (raises
        :class:`WaitTimeout` after ``timeout`` seconds; None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.get(id)
            if on_progress is not None:
                on_progress(view)
            if view["state"] in TERMINAL:
                return view
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"evaluation {id} still {view['state']} after {timeout:.0f} s")
            time.sleep(interval)

    def plot(self, id: str, path: str | Path) -> Path:
        """Save the comparison PNG of a succeeded evaluation (``GET /v1/evaluations/{id}/comparison.png``)."""
        resp = self._http.request("GET", f"/v1/evaluations/{id}/comparison.png", stream=True)
        target = Path(path)
        try:
            with open(target, "wb") as fh:
                for chunk in resp.iter_bytes(1024 * 1024):
                    fh.write(chunk)
        finally:
            resp.close()
        return target


# ----------------------------------------------------------------------------------------- rollouts
def ready_condition(view: View) -> View:
    """The rollout's ``Ready`` condition (False with a message when the view has no status)."""
    for cond in (view.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return dict(cond)
    return {"type": "Ready", "status": "False", "reason": "Unknown", "message": "no status reported"}


class Rollouts(_Resource):
    """Which checkpoint each inference deployment serves: set, canary, promote, roll back, wait."""

    def list(self, page_size: int | None = None) -> Iterator[View]:
        return self._http.pages("/v1/rollouts", page_size=page_size)

    def get(self, deployment: str) -> View:
        """The record with ``status``: desired vs served per replica and the ``Ready`` condition."""
        return dict(self._http.json("GET", f"/v1/rollouts/{deployment}"))

    def set(
        self, deployment: str, checkpoint: str, *, create: bool = False, expected_revision: int | None = None
    ) -> View:
        """Serve ``checkpoint`` (or ``"base"``) to all traffic; ``create`` starts a new deployment."""
        body: dict[str, Any] = {"checkpoint": checkpoint}
        if expected_revision is not None:
            body["expected_revision"] = expected_revision
        params = {"create": True} if create else None
        return dict(self._http.json("PUT", f"/v1/rollouts/{deployment}", json=body, params=params))

    def canary(
        self,
        deployment: str,
        checkpoint: str,
        percent: int,
        *,
        expected_revision: int | None = None,
        policy: Mapping[str, Any] | None = None,
    ) -> View:
        """Send ``percent`` of requests to ``checkpoint``. With a ``policy`` (the fields of the API's
        ``RolloutPolicy``: ``min_heldout_accuracy``, ``require_no_motion_collapse``, ``min_requests``,
        ``max_error_ratio_margin``, ``require_human_win``, ``min_raters``, ``max_wait_seconds``) the
        control plane's rollout gate promotes or rolls the canary back by itself (:meth:`evaluate`)."""
        body: dict[str, Any] = {"checkpoint": checkpoint, "percent": percent}
        if expected_revision is not None:
            body["expected_revision"] = expected_revision
        if policy is not None:
            body["policy"] = dict(policy)
        return dict(self._http.json("POST", f"/v1/rollouts/{deployment}/canary", json=body))

    def evaluate(self, deployment: str) -> View:
        """Check the canary against its policy now: ``{"decision": "promote" | "rollback" | "wait",
        "reasons": [...], "applied", "revision", "rollout"}``; the decision is recorded on the
        rollout's history with its reasons. A deployment without a canary with a policy: Conflict."""
        return dict(self._http.json("POST", f"/v1/rollouts/{deployment}/evaluate"))

    def promote(self, deployment: str, *, expected_revision: int | None = None) -> View:
        body = {"expected_revision": expected_revision} if expected_revision is not None else None
        return dict(self._http.json("POST", f"/v1/rollouts/{deployment}/promote", json=body))

    def rollback(self, deployment: str, *, expected_revision: int | None = None) -> View:
        body = {"expected_revision": expected_revision} if expected_revision is not None else None
        return dict(self._http.json("POST", f"/v1/rollouts/{deployment}/rollback", json=body))

    def history(self, deployment: str) -> builtins.list[View]:
        """Every change, oldest first; the rollout gate's entries carry ``decision`` and ``reasons``."""
        return list(self._http.json("GET", f"/v1/rollouts/{deployment}/history"))

    def wait(
        self,
        deployment: str,
        revision: int | None = None,
        *,
        timeout: float = 300.0,
        interval: float = 0.5,
        on_update: Callable[[View], None] | None = None,
    ) -> View:
        """Wait until every inference replica serves ``revision`` (default: the record's revision now)
        or a later one: the rollout's ``Ready`` condition is True. Raises :class:`WaitTimeout` with
        the condition's message."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.get(deployment)
            if on_update is not None:
                on_update(view)
            if revision is None:
                revision = int(view["revision"])
            cond = ready_condition(view)
            if view["revision"] >= revision and cond["status"] == "True":
                return view
            if time.monotonic() > deadline:
                raise WaitTimeout(
                    f"rollout {deployment} revision {revision} not served after {timeout:.0f} s: "
                    f"{cond.get('message') or cond.get('reason')}"
                )
            time.sleep(interval)


# ------------------------------------------------------------------------------------------- client
class Client:
    """The HuViDPO API. ``url``/``token``/``grpc_address`` default to ``HUVIDPO_URL`` (else
    http://127.0.0.1:8080), ``HUVIDPO_TOKEN`` and ``HUVIDPO_GRPC_ADDRESS`` (else 127.0.0.1:50051).

    ``retries`` is how often a request refused with 429/503 (after its Retry-After), a connection
    that failed, or a Generate refused with UNAVAILABLE before any answer is tried again, with
    exponential backoff and jitter from ``backoff`` seconds. Use as a context manager, or ``close()``."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        grpc_address: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: Any = None,
    ) -> None:
        self.backoff = Backoff(retries, backoff, max_backoff)
        self.http = Http(url, token, timeout=timeout, backoff=self.backoff, transport=transport)
        self.grpc_address = grpc_address or os.environ.get("HUVIDPO_GRPC_ADDRESS") or "127.0.0.1:50051"
        self._channel: Any = None
        self.models = Models(self)
        self.datasets = Datasets(self)
        self.pairs = Pairs(self)
        self.ratings = Ratings(self)
        self.fine_tunes = FineTunes(self)
        self.checkpoints = Checkpoints(self)
        self.evaluations = Evaluations(self)
        self.rollouts = Rollouts(self)

    @property
    def url(self) -> str:
        return self.http.url

    @property
    def token(self) -> str | None:
        return self.http.token

    def call(
        self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None
    ) -> Any:
        """Any route without a method of its own (``/v1/...``), with the same auth, retries and errors;
        returns the decoded JSON body (None when empty)."""
        return self.http.json(method, path, json=json, params=params)

    def whoami(self) -> View:
        """The token's name (the actor on records, the rater id) and scopes."""
        return dict(self.http.json("GET", "/v1/whoami"))

    def close(self) -> None:
        self.http.close()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- gRPC
    def _stub(self) -> Any:
        from huvidpo.client import _grpc

        if self._channel is None:
            self._channel = _grpc.channel(self.grpc_address, self.token, self.backoff.retries + 1)
        return _grpc.stub(self._channel)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` retried on UNAVAILABLE (nothing answered yet) with backoff; errors typed."""
        import grpc

        from huvidpo.client._grpc import as_generation_error

        attempt = 0
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                err = as_generation_error(exc)
                if err.code != grpc.StatusCode.UNAVAILABLE or attempt >= self.backoff.retries:
                    raise err from None
            time.sleep(self.backoff.delay(attempt))
            attempt += 1

    def generate(
        self,
        prompt: str,
        *,
        first_frame: bytes | str | Path | None = None,
        first_frame_uri: str | None = None,
        out: str | Path | None = None,
        frames: int = 0,
        height: int = 0,
        width: int = 0,
        steps: int = 0,
        guidance_scale: float | None = None,
        seed: int | None = None,
        negative_prompt: str = "",
        checkpoint_id: str = "",
        output_format: str = "mp4",
        fps: float = 0.0,
        on_progress: Callable[[Any], None] | None = None,
        timeout: float = 600.0,
    ) -> Any:
        """Generate a video over gRPC from a first frame (image bytes or a file; None: from the prompt
        alone). Zeros take the service's defaults. ``on_progress(p)`` sees each streamed event
        (``p.step``, ``p.total``, ``p.queue_position``). The video is saved to ``out`` when given.
        Returns a :class:`huvidpo.client._grpc.Generation`; raises :class:`GenerationError`."""
        from huvidpo.client._grpc import Generation, run_generate
        from services.inference.gen import inference_pb2 as pb

        fields: dict[str, Any] = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "frames": frames,
            "height": height,
            "width": width,
            "steps": steps,
            "checkpoint_id": checkpoint_id,
            "fps": fps,
            "output_format": {"mp4": pb.OUTPUT_FORMAT_MP4, "gif": pb.OUTPUT_FORMAT_GIF}[output_format],
        }
        if isinstance(first_frame, str | Path):
            fields["first_frame_image"] = Path(first_frame).read_bytes()
        elif first_frame is not None:
            fields["first_frame_image"] = bytes(first_frame)
        elif first_frame_uri:
            fields["first_frame_uri"] = first_frame_uri
        if guidance_scale is not None:
            fields["guidance_scale"] = guidance_scale
        if seed is not None:
            fields["seed"] = seed
        request = pb.GenerateRequest(**fields)
        started = [False]

        def progress(p: Any) -> None:
            started[0] = True
            if on_progress is not None:
                on_progress(p)

        def once() -> Any:
            import grpc

            try:
                return run_generate(self._stub(), request, progress, timeout)
            except grpc.RpcError as exc:
                if started[0]:  # it had begun: a retry would run it twice
                    from huvidpo.client._grpc import as_generation_error

                    raise as_generation_error(exc) from None
                raise

        result = self._call(once)
        if result.WhichOneof("video") == "download_url":
            video = self.http.request("GET", result.download_url, presigned=True).content
        else:
            video = bytes(result.video_bytes)
        path = None
        if out is not None:
            path = Path(out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(video)
        return Generation(path, video, result)

    def served_models(self) -> Any:
        """The inference service's ``ListModels``: the models it holds and the rollout it applied."""
        from services.inference.gen import inference_pb2 as pb

        return self._call(lambda: self._stub().ListModels(pb.ListModelsRequest(), timeout=10))

    def wait_serving(self, checkpoint_id: str, *, timeout: float = 180.0) -> Any:
        """Poll ``ListModels`` until the service serves ``checkpoint_id`` as its current model."""
        from services.inference.gen import inference_pb2 as pb

        deadline = time.monotonic() + timeout
        while True:
            resp = self.served_models()
            if resp.rollout.current == checkpoint_id and any(
                m.id == checkpoint_id and m.role == pb.MODEL_ROLE_CURRENT for m in resp.models
            ):
                return resp
            if time.monotonic() > deadline:
                raise WaitTimeout(
                    f"the inference service did not start serving {checkpoint_id} in {timeout:.0f} s "
                    f"(it serves {resp.rollout.current or 'the base model'})"
                )
            time.sleep(0.5)


__all__ = ["Client", "GenerationError"]
