"""The remote verbs of ``huvidpo``, built on :class:`huvidpo.client.Client`: ``models``, ``datasets``,
``ratings``, ``fine-tunes``, ``checkpoints``, ``evaluations``, ``rollouts`` (and ``pairs compile --dataset``, ``generate
--remote``).

Results go to stdout (``--output json`` for scripts), progress and errors to stderr; an error is one
line (the problem's detail and field) and the exit code says its kind (:class:`ExitCode`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from huvidpo.client.client import TERMINAL, Client, ready_condition
from huvidpo.client.errors import (
    ApiError,
    ExitCode,
    HuViDPOError,
    Unauthorized,
    UploadInterrupted,
    exit_code,
)

Command = Callable[[Client, argparse.Namespace], int]


# ------------------------------------------------------------------------------------------ plumbing
def _common() -> argparse.ArgumentParser:
    """Options every remote verb takes (after the verb, so they read naturally)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--url", default=None, help="control plane URL (default: $HUVIDPO_URL, else http://127.0.0.1:8080)"
    )
    g.add_argument("--token", default=None, help="bearer token (default: $HUVIDPO_TOKEN)")
    g.add_argument(
        "--grpc-address",
        default=None,
        help="inference service (default: $HUVIDPO_GRPC_ADDRESS, else 127.0.0.1:50051)",
    )
    g.add_argument(
        "--retries", type=int, default=4, help="retries of 429/503/unreachable, with backoff (default 4)"
    )
    p.add_argument("--output", "-o", choices=("text", "json"), default="text", help="json: for scripts")
    return p


def _resume_hint(dataset: str, directory: Any, upload_id: str) -> str:
    return f"resume with: huvidpo datasets upload {dataset} {directory or 'DIR'} --resume {upload_id}"


def _message(exc: BaseException, args: argparse.Namespace | None = None) -> str:
    if isinstance(exc, Unauthorized):
        return f"{exc.message} (HTTP 401: pass --token or set HUVIDPO_TOKEN)"
    if isinstance(exc, UploadInterrupted):
        return (
            f"{_message(exc.cause)}; {_resume_hint(exc.dataset, getattr(args, 'dir', None), exc.upload_id)}"
        )
    if isinstance(exc, ApiError):
        return f"{exc.message} (HTTP {exc.status})"
    return str(exc)


def _usage_message(exc: Exception) -> str:
    """A missing local file as the path the user gave, not Python's ``[Errno 2] ...``."""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"no such file or directory: {exc.filename}"
    return str(exc)


def _run(fn: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        verb = " ".join(x for x in (args.command, getattr(args, "verb", None)) if x)
        try:
            with Client(args.url, args.token, args.grpc_address, retries=max(0, args.retries)) as c:
                return fn(c, args)
        except HuViDPOError as exc:
            print(f"huvidpo {verb}: error: {_message(exc, args)}", file=sys.stderr)
            return int(exit_code(exc))
        except (FileNotFoundError, ValueError) as exc:
            print(f"huvidpo {verb}: error: {_usage_message(exc)}", file=sys.stderr)
            return int(ExitCode.USAGE)
        except KeyboardInterrupt as exc:
            upload = getattr(exc, "upload_id", None)
            hint = "; " + _resume_hint(args.name, args.dir, upload) if upload else ""
            print(f"\nhuvidpo {verb}: interrupted{hint}", file=sys.stderr)
            return int(ExitCode.INTERRUPTED)

    return run


def _json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _fmt(v: Any) -> str:
    """A cell: floats to 4 significant digits, None empty."""
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> None:
    rows = [[_fmt(v) for v in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    for r in [list(header), *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _show(args: argparse.Namespace, view: Any, text: Callable[[Any], None]) -> int:
    if args.output == "json":
        _json(view)
    else:
        text(view)
    return 0


def _kv(view: dict[str, Any], keys: Sequence[str]) -> None:
    for k in keys:
        v = view.get(k)
        if isinstance(v, dict | list):
            v = json.dumps(v)
        print(f"{k:<16} {'' if v is None else v}")


def _byte_unit(total: int) -> tuple[int, str]:
    """The unit a byte count of ``total`` reads best in: 0.1 MiB of 0.1 MiB says nothing; 106.6 KiB does."""
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if total >= scale:
            return scale, unit
    return 1, "B"


class _Bar:
    """A one-line byte counter on stderr (rewritten in place on a terminal, every 10% otherwise)."""

    def __init__(self, what: str, quiet: bool = False) -> None:
        self.what, self.quiet, self.tty = what, quiet, sys.stderr.isatty()
        self.last = -1

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        pct = int(100 * done / total) if total else 100
        if not self.tty and pct // 10 == self.last // 10 and pct != 100:
            return
        if pct == self.last:
            return
        self.last = pct
        scale, unit = _byte_unit(total)
        line = f"{self.what}: {done / scale:.1f}/{total / scale:.1f} {unit} ({pct}%)"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and not self.quiet and self.last >= 0:
            print(file=sys.stderr)


# -------------------------------------------------------------------------------------------- models
def _model_text(m: dict[str, Any]) -> None:
    _kv(
        m,
        ("id", "prefix", "digest", "unet", "files", "size_bytes", "created_at", "created_by", "description"),
    )


def _models_register(c: Client, a: argparse.Namespace) -> int:
    bar = _Bar(f"uploading {a.dir}", quiet=a.output == "json" or a.dir is None)
    try:
        view = c.models.register(
            a.name, a.dir, from_prefix=a.from_prefix, description=a.description, on_progress=bar
        )
    finally:
        bar.close()
    return _show(a, view, _model_text)


def _models_list(c: Client, a: argparse.Namespace) -> int:
    items = list(c.models.list())
    return _show(
        a,
        items,
        lambda xs: _table(
            [
                (m["id"], m.get("unet"), m.get("files"), m.get("size_bytes"), m.get("digest", "")[:19])
                for m in xs
            ],
            ("ID", "UNET", "FILES", "BYTES", "DIGEST"),
        ),
    )


def _models_show(c: Client, a: argparse.Namespace) -> int:
    return _show(a, c.models.get(a.id), _model_text)


# ------------------------------------------------------------------------------------------ datasets
def _version_text(v: dict[str, Any]) -> None:
    _kv(v, ("id", "dataset", "digest", "videos", "prompts", "raters", "rating_records", "size", "created_at"))
    for s in v.get("skipped_ratings") or []:
        print(f"skipped rating {s['id']}: {s['reason']}")


def _datasets_create(c: Client, a: argparse.Namespace) -> int:
    view = c.datasets.create(a.name, a.description, exist_ok=a.exist_ok)
    return _show(a, view, lambda d: _kv(d, ("name", "description", "created_at")))


def _datasets_upload(c: Client, a: argparse.Namespace) -> int:
    if a.create:
        c.datasets.create(a.name, exist_ok=True)
    bar = _Bar(f"uploading {a.dir}", quiet=a.output == "json")
    try:
        version = c.datasets.upload(
            a.name, a.dir, on_progress=bar, resume=a.resume, include_ratings=not a.no_ratings
        )
    finally:
        bar.close()
    return _show(a, version, _version_text)


def _datasets_list(c: Client, a: argparse.Namespace) -> int:
    items = list(c.datasets.list())
    return _show(
        a,
        items,
        lambda xs: _table(
            [
                (
                    d["name"],
                    len(d.get("versions") or []),
                    (d.get("versions") or [""])[-1][:16],
                    d.get("created_at"),
                )
                for d in xs
            ],
            ("NAME", "VERSIONS", "LATEST", "CREATED"),
        ),
    )


def _datasets_show(c: Client, a: argparse.Namespace) -> int:
    d = c.datasets.get(a.name)
    d["versions"] = c.datasets.versions(a.name)

    def text(d: dict[str, Any]) -> None:
        _kv(d, ("name", "description", "created_at"))
        _table(
            [
                (v["id"], v.get("videos"), v.get("prompts"), v.get("raters"), v.get("created_at"))
                for v in d["versions"]
            ],
            ("VERSION", "VIDEOS", "PROMPTS", "RATERS", "CREATED"),
        )

    return _show(a, d, text)


def _resolve_version(c: Client, dataset: str, version: str) -> str:
    """``latest`` is the dataset's newest version."""
    if version != "latest":
        return version
    versions = c.datasets.get(dataset).get("versions") or []
    if not versions:
        raise ValueError(f"dataset {dataset!r} has no version yet (upload one: huvidpo datasets upload)")
    return str(versions[-1])


def _pairs_compile(c: Client, a: argparse.Namespace) -> int:
    version = _resolve_version(c, a.dataset, a.version)
    report = c.datasets.compile_pairs(
        a.dataset,
        version,
        tie_policy=a.tie_policy,
        min_margin=a.min_margin,
        margin_weighting=a.margin_weighting or None,
        seed=a.seed,
        holdout_fraction=a.holdout_fraction,
        holdout_seed=a.holdout_seed,
    )
    return _show(a, report, lambda r: print(r.get("text") or f"{r['pairs']} pairs"))


# ------------------------------------------------------------------------------------------- ratings
def _ratings_add(c: Client, a: argparse.Namespace) -> int:
    records: list[dict[str, Any]] = []
    if a.file is not None:
        for n, line in enumerate(Path(a.file).read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{a.file}:{n}: not a JSON object ({exc})") from None
    rater = a.rater
    if (a.video or a.choice) and rater is None:
        rater = c.whoami()["name"]
    if a.video is not None:
        if a.score is None:
            raise ValueError("--video needs --score (0..10)")
        records.append({"type": "rating", "video_id": a.video, "rater_id": rater, "score": a.score})
    if a.choice is not None:
        records.append({"type": "choice", "chosen": a.choice[0], "rejected": a.choice[1], "rater_id": rater})
    if not records:
        raise ValueError("nothing to add: give --video V --score S, --choice CHOSEN REJECTED or --file F")
    ids = c.ratings.add(a.dataset, records)
    return _show(a, {"ids": ids}, lambda r: print(f"added {len(r['ids'])} rating record(s)"))


def _ratings_list(c: Client, a: argparse.Namespace) -> int:
    items = list(c.ratings.list(a.dataset))
    return _show(
        a, items, lambda xs: _table([(r["id"], json.dumps(r["record"])) for r in xs], ("ID", "RECORD"))
    )


# ---------------------------------------------------------------------------------------- fine-tunes
def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _hyperparameters(a: argparse.Namespace) -> dict[str, Any]:
    hp: dict[str, Any] = {}
    if a.hyperparameters_file is not None:
        hp.update(json.loads(Path(a.hyperparameters_file).read_text()))
    for item in a.hp or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--hp takes KEY=VALUE, got {item!r}")
        hp[key.strip()] = _value(value.strip())
    return hp


def describe(view: dict[str, Any]) -> str:
    """One line: state, step, loss, reward accuracy, ETA (the live line of ``--watch``)."""
    p = view.get("progress") or {}
    parts = [f"{view['id']}  {view['state']:<9}", f"step {p.get('step', 0)}/{p.get('total_steps') or '?'}"]
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("reward_accuracy") is not None:
        parts.append(f"reward acc {p['reward_accuracy']:.2f}")
    if p.get("eta_seconds") is not None and view["state"] == "running":
        parts.append(f"ETA {p['eta_seconds']:.0f} s")
    if view["state"] in ("failed", "cancelled") and (view.get("reason") or view.get("message")):
        parts.append(f"({view.get('reason') or ''}: {view.get('message') or ''})")
    return "  ".join(parts)


def _watch(c: Client, a: argparse.Namespace, finetune_id: str) -> int:
    """Follow a fine-tune to its end on one live line; Ctrl-C detaches (or cancels)."""
    tty = sys.stderr.isatty()
    last = [""]

    def show(view: dict[str, Any]) -> None:
        line = describe(view)
        if line == last[0]:
            return
        if tty:
            print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
        last[0] = line

    try:
        view = c.fine_tunes.wait(finetune_id, show, timeout=a.timeout, interval=a.interval)
    except KeyboardInterrupt:
        if tty:
            print(file=sys.stderr)
        if getattr(a, "cancel_on_interrupt", False):
            view = c.fine_tunes.cancel(finetune_id)
            print(f"cancelled fine-tune {finetune_id} ({view['state']})", file=sys.stderr)
        else:
            print(
                f"detached: fine-tune {finetune_id} keeps running. Reattach: huvidpo fine-tunes watch "
                f"{finetune_id}; cancel: huvidpo fine-tunes cancel {finetune_id}",
                file=sys.stderr,
            )
        return int(ExitCode.INTERRUPTED)
    if tty:
        print(file=sys.stderr)
    _show(a, view, lambda v: print(describe(v)))
    if view["state"] != "succeeded":
        return int(ExitCode.FAILED)
    return 0


def _finetune_text(v: dict[str, Any]) -> None:
    print(describe(v))
    _kv(v, ("dataset", "version", "base_model", "stage", "created_at", "finished_at", "hyperparameters"))
    for ck in v.get("checkpoints") or []:
        print(f"checkpoint       {ck}")


def _ft_create(c: Client, a: argparse.Namespace) -> int:
    version = _resolve_version(c, a.dataset, a.version)
    view = c.fine_tunes.create(
        a.dataset,
        version,
        a.base_model,
        _hyperparameters(a),
        stage=a.stage,
        nodes=a.nodes,
        gpus_per_node=a.gpus_per_node,
        idempotency_key=a.idempotency_key,
    )
    print(f"created fine-tune {view['id']}", file=sys.stderr, flush=True)
    if a.watch:
        return _watch(c, a, view["id"])
    return _show(a, view, _finetune_text)


def _ft_watch(c: Client, a: argparse.Namespace) -> int:
    return _watch(c, a, a.id)


def _ft_list(c: Client, a: argparse.Namespace) -> int:
    items = list(c.fine_tunes.list(state=a.state, dataset=a.dataset))
    return _show(
        a,
        items,
        lambda xs: _table(
            [
                (
                    v["id"],
                    v["state"],
                    v["dataset"],
                    v["base_model"],
                    f"{(v.get('progress') or {}).get('step', 0)}/{(v.get('progress') or {}).get('total_steps') or '?'}",
                    v["created_at"],
                )
                for v in xs
            ],
            ("ID", "STATE", "DATASET", "BASE", "STEP", "CREATED"),
        ),
    )


def _ft_show(c: Client, a: argparse.Namespace) -> int:
    return _show(a, c.fine_tunes.get(a.id), _finetune_text)


def _ft_cancel(c: Client, a: argparse.Namespace) -> int:
    return _show(a, c.fine_tunes.cancel(a.id), lambda v: print(describe(v)))


def _event_text(ev: dict[str, Any]) -> str:
    rest = {k: v for k, v in ev.items() if k not in ("seq", "event") and v is not None}
    return f"{ev.get('seq', ''):>5}  {ev.get('event', ''):<10}  " + " ".join(
        f"{k}={_fmt(v)}" for k, v in rest.items()
    )


def _ft_events(c: Client, a: argparse.Namespace) -> int:
    events = c.fine_tunes.iter_events(a.id, after=a.after, follow=a.follow)
    if a.output == "json" and not a.follow:
        _json(list(events))
        return 0
    for ev in events:  # one JSON object a line when following with --output json (NDJSON)
        print(json.dumps(ev) if a.output == "json" else _event_text(ev), flush=True)
    return 0


def _ft_metrics(c: Client, a: argparse.Namespace) -> int:
    m = c.fine_tunes.metrics(a.id)

    def text(m: dict[str, Any]) -> None:
        names = sorted(m.get("metrics") or {})
        rows = [
            [step, *(m["metrics"][n][i] if i < len(m["metrics"][n]) else None for n in names)]
            for i, step in enumerate(m.get("steps") or [])
        ]
        _table(rows, ["STEP", *(n.upper() for n in names)])

    return _show(a, m, text)


def _ft_logs(c: Client, a: argparse.Namespace) -> int:
    for chunk in c.fine_tunes.logs(a.id, follow=a.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------------------- checkpoints
def _ck_list(c: Client, a: argparse.Namespace) -> int:
    items = list(c.checkpoints.list(a.fine_tune))
    return _show(
        a,
        items,
        lambda xs: _table(
            [
                (k["id"], k["finetune_id"], k["step"], len(k.get("files") or {}), k.get("created_at"))
                for k in xs
            ],
            ("ID", "FINE-TUNE", "STEP", "FILES", "CREATED"),
        ),
    )


def _ck_show(c: Client, a: argparse.Namespace) -> int:
    def text(k: dict[str, Any]) -> None:
        _kv(k, ("id", "finetune_id", "step", "created_at", "lineage"))
        for rel, f in sorted((k.get("files") or {}).items()):
            print(f"file             {rel}  {f.get('size')} bytes")
        for s in k.get("samples") or []:
            print(f"sample {s['index']:<9} {s.get('prompt')!r} seed {s.get('seed')}  {c.url}{s.get('url')}")
        if k.get("evaluation"):
            _summary_text(k["evaluation"], c.url)
        else:
            print("evaluation       none yet (huvidpo evaluations create " + str(k["id"]) + ")")

    return _show(a, c.checkpoints.get(a.id), text)


def _ck_download(c: Client, a: argparse.Namespace) -> int:
    bar = _Bar(f"downloading {a.id}", quiet=a.output == "json")
    try:
        out = c.checkpoints.download(a.id, a.dir, on_progress=bar)
    finally:
        bar.close()
    files = sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file())
    return _show(
        a,
        {"id": a.id, "dir": str(out), "files": files},
        lambda r: print(f"wrote {len(files)} files to {out}"),
    )


def _interval(t: dict[str, Any]) -> str:
    if t.get("wilson_low") is None:
        return ""
    return f"[{t['wilson_low']:.3f}, {t['wilson_high']:.3f}]"


def _rate_row(t: dict[str, Any], prompt: str) -> list[Any]:
    rate = t.get("win_rate")
    return [
        t["opponent"] if t["opponent"] != "*" else "(all)",
        prompt,
        t["wins"],
        t["ties"],
        t["losses"],
        t["n"],
        "" if rate is None else f"{rate:.3f}",
        _interval(t),
    ]


RATE_HEADER = ("OPPONENT", "PROMPT", "WINS", "TIES", "LOSSES", "N", "WIN RATE", "WILSON 95%")


def _round_head(r: dict[str, Any]) -> None:
    prog = r.get("progress") or {}
    state = (
        "complete" if r.get("complete") else "in progress (no results until every rater judged every pair)"
    )
    print(
        f"round {r['dataset']}@{r['version'][:12]}  checkpoints {', '.join(r['checkpoints'])}  "
        f"raters {len(r.get('raters') or [])}  judged {prog.get('done', 0)}/{prog.get('total', 0)}  {state}"
    )


def _ranking(ranking: list[dict[str, Any]] | None) -> None:
    if ranking:
        print(
            "Bradley-Terry ranking: "
            + "  ".join(f"{x['rank']}. {x['checkpoint']} ({x['strength']:.3f})" for x in ranking)
        )


def _checkpoint_preference_text(v: dict[str, Any]) -> None:
    rounds = v.get("rounds") or []
    print(
        f"checkpoint {v['checkpoint']}: {len(rounds)} A/B round(s); win rate = (wins + ties/2) / n, "
        "Wilson 95% interval"
    )
    for r in rounds:
        print()
        _round_head(r)
        res = r.get("results")
        if res is None:
            continue
        rows = [_rate_row(res["overall"], "(all)")]
        rows += [_rate_row(t, "(all)") for t in res.get("opponents") or []]
        rows += [_rate_row(t, t["prompt"]) for t in res.get("per_prompt") or []]
        _table(rows, RATE_HEADER)
        _ranking(res.get("ranking"))


def _ck_preference(c: Client, a: argparse.Namespace) -> int:
    return _show(a, c.checkpoints.preference(a.id, min_raters=a.min_raters), _checkpoint_preference_text)


def _round_text(r: dict[str, Any]) -> None:
    _round_head(r)
    summary = r.get("summary")
    if summary is None:
        return
    rows = [[t["checkpoint"], *_rate_row(t, "(all)")] for t in summary.get("comparisons") or []]
    rows += [[t["checkpoint"], *_rate_row(t, t["prompt"])] for t in summary.get("per_prompt") or []]
    _table(rows, ("CHECKPOINT", *RATE_HEADER))
    _ranking(summary.get("ranking"))


def _datasets_preference(c: Client, a: argparse.Namespace) -> int:
    version = _resolve_version(c, a.name, a.version)
    return _show(a, c.datasets.preference(a.name, version, min_raters=a.min_raters), _round_text)


# ------------------------------------------------------------------------------------------ rollouts
def _rollout_text(v: dict[str, Any]) -> None:
    canary = f"{v['canary']} ({v['canary_percent']}%)" if v.get("canary") else "-"
    print(f"{v['deployment']}  revision {v['revision']}  current {v.get('current') or '-'}  canary {canary}")
    if v.get("status"):
        cond = ready_condition(v)
        print(f"Ready {cond['status']}: {cond.get('reason')} {cond.get('message') or ''}".rstrip())
        for r in v["status"].get("replicas") or []:
            print(
                f"  replica {r['replica']}  {r['state']}  revision {r['revision']}  up to date {r['up_to_date']}"
            )


def _rollout_change(change: Callable[[Client, argparse.Namespace], dict[str, Any]]) -> Command:
    def cmd(c: Client, a: argparse.Namespace) -> int:
        view = change(c, a)
        asked = int(view["revision"])
        if a.wait:
            print(f"waiting until every replica serves revision {asked}...", file=sys.stderr, flush=True)
            view = c.rollouts.wait(a.deployment, asked, timeout=a.timeout)
        # What changed the rollout after this command's revision (the gate may roll a canary back while
        # the replicas load it): said on stderr, so -o json stays the view; a rolled-back canary fails.
        later = [e for e in view["history"] if int(e["revision"]) > asked]
        for e in later:
            decision = f" (gate: {e['decision']})" if e.get("decision") else ""
            print(
                f"meanwhile revision {e['revision']}: {e['action']} by {e.get('actor') or '-'}{decision}",
                file=sys.stderr,
            )
            for r in e.get("reasons") or []:
                print(f"  - {r}", file=sys.stderr)
        _show(a, view, _rollout_text)
        rolled_back = any(e.get("decision") == "rollback" for e in later)
        return int(ExitCode.FAILED) if rolled_back else 0

    return cmd


def _policy(a: argparse.Namespace) -> dict[str, Any] | None:
    """The canary's policy: ``--policy FILE.json``, then each ``--policy-*`` option over it (None:
    neither given, a manual canary)."""
    policy: dict[str, Any] = {}
    if a.policy is not None:
        try:
            loaded = json.loads(Path(a.policy).read_text())
        except ValueError as exc:
            raise ValueError(f"--policy {a.policy}: not a JSON object ({exc})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--policy {a.policy}: not a JSON object")
        policy.update(loaded)
    for key, value in (
        ("min_heldout_accuracy", a.policy_min_accuracy),
        ("min_requests", a.policy_min_requests),
        ("max_error_ratio_margin", a.policy_max_error_margin),
        ("min_raters", a.policy_min_raters),
        ("max_wait_seconds", a.policy_max_wait),
    ):
        if value is not None:
            policy[key] = value
    if a.policy_allow_motion_collapse:
        policy["require_no_motion_collapse"] = False
    if a.policy_ignore_human_rounds:
        policy["require_human_win"] = False
    return policy or None


def _ro_canary(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.rollouts.canary(a.deployment, a.checkpoint, a.percent, policy=_policy(a))


def _decision_text(d: dict[str, Any]) -> None:
    done = {"promote": "promoted", "rollback": "rolled back", "wait": "recorded"}[d["decision"]]
    if not d.get("applied"):
        done = (
            "the same wait is already recorded"
            if d["decision"] == "wait"
            else "not applied: the rollout changed meanwhile"
        )
    print(f"{d['deployment']} revision {d['revision']}: {d['decision']} ({done})")
    for r in d.get("reasons") or []:
        print(f"  - {r}")
    _rollout_text(d["rollout"])


def _ro_evaluate(c: Client, a: argparse.Namespace) -> int:
    d = c.rollouts.evaluate(a.deployment)
    if a.wait and d.get("applied") and d["decision"] != "wait":
        print(
            f"waiting until every replica serves revision {d['rollout']['revision']}...",
            file=sys.stderr,
            flush=True,
        )
        d["rollout"] = c.rollouts.wait(a.deployment, d["rollout"]["revision"], timeout=a.timeout)
    _show(a, d, _decision_text)
    # A canary the gate rolled back is a change that failed, as a watched fine-tune that failed.
    return int(ExitCode.FAILED) if d["decision"] == "rollback" else 0


def _history_text(entries: list[dict[str, Any]]) -> None:
    for e in entries:
        canary = f"{e['canary']} ({e['canary_percent']}%)" if e.get("canary") else "-"
        decision = f"  gate: {e['decision']}" if e.get("decision") else ""
        print(
            f"revision {e['revision']:<3} {e['updated_at']}  {e['action']:<11} current "
            f"{e.get('current') or '-'}  canary {canary}  by {e.get('actor') or '-'}{decision}"
        )
        if e.get("reason"):
            print(f"    reason: {e['reason']}")
        for r in e.get("reasons") or []:
            print(f"    - {r}")


def _ro_history(c: Client, a: argparse.Namespace) -> int:
    return _show(a, c.rollouts.history(a.deployment), _history_text)


def _ro_show(c: Client, a: argparse.Namespace) -> int:
    return _show(a, c.rollouts.get(a.deployment), _rollout_text)


def _ro_list(c: Client, a: argparse.Namespace) -> int:
    items = list(c.rollouts.list())
    return _show(
        a,
        items,
        lambda xs: _table(
            [
                (v["deployment"], v["revision"], v.get("current"), v.get("canary"), v.get("canary_percent"))
                for v in xs
            ],
            ("DEPLOYMENT", "REVISION", "CURRENT", "CANARY", "PERCENT"),
        ),
    )


# ------------------------------------------------------------------------------------------ generate
REMOTE_UNSUPPORTED = {
    "lora": None,
    "eta": 0.0,
    "shared_noise_ratio": 0.2,
    "no_adain": False,
    "no_hist_match": False,
    "device": None,
}


def remote_generate(args: argparse.Namespace) -> int:
    """``huvidpo generate --remote ADDRESS``: the same options, run by the inference service."""
    for name, default in REMOTE_UNSUPPORTED.items():
        if getattr(args, name, default) != default:
            flag = "--" + name.replace("_", "-")
            print(f"huvidpo generate: error: {flag} is not available with --remote", file=sys.stderr)
            return int(ExitCode.USAGE)
    tty = sys.stderr.isatty() and not args.quiet

    def progress(p: Any) -> None:
        if args.quiet:
            return
        line = (
            f"queued (position {p.queue_position})" if p.queue_position else f"denoising {p.step}/{p.total}"
        )
        print(("\r\033[K" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    if args.first_frame is not None and not Path(args.first_frame).is_file():
        print(f"huvidpo generate: error: --first-frame {args.first_frame}: no such file", file=sys.stderr)
        return int(ExitCode.USAGE)
    out = Path(args.out)
    try:
        with Client(None, args.token, args.remote, retries=max(0, args.retries)) as c:
            g = c.generate(
                args.prompt,
                first_frame=args.first_frame,
                out=out,
                frames=args.frames,
                height=args.height,
                width=args.width,
                steps=args.steps,
                guidance_scale=args.guidance,
                seed=args.seed,
                negative_prompt=args.negative_prompt,
                checkpoint_id=args.checkpoint or "",
                output_format="gif" if out.suffix.lower() == ".gif" else "mp4",
                fps=args.fps,
                on_progress=progress,
            )
    except HuViDPOError as exc:
        if tty:
            print(file=sys.stderr)
        print(f"huvidpo generate: error: {_message(exc)}", file=sys.stderr)
        return int(exit_code(exc))
    if tty:
        print(file=sys.stderr)
    r = g.result
    print(
        f"wrote {out} ({r.frames} frames, {r.width}x{r.height}, seed {r.seed}, checkpoint "
        f"{r.checkpoint_id or 'base'}, request {r.request_id}, {r.timings.total_seconds:.2f} s)"
    )
    return 0


# -------------------------------------------------------------------------------------- evaluations
def _summary_text(e: dict[str, Any], url: str) -> None:
    """The checkpoint's evaluation in brief: held-out accuracy and margin, motion, per prompt."""
    acc, margin = e.get("heldout_implicit_acc"), e.get("heldout_reward_margin")
    held = (
        "no held-out pairs"
        if acc is None
        else f"acc {acc:.3f}  margin {_fmt(margin)}  ({e.get('heldout_pairs')} pairs)"
    )
    print(f"evaluation       {e['evaluation_id']}  {e.get('created_at')}  vs {e.get('baseline')}")
    print(f"  held-out       {held}")
    collapse = {True: "MOTION COLLAPSE", False: "no collapse", None: "not checked"}[e.get("motion_collapse")]
    print(f"  motion         {_fmt(e.get('motion'))} px/frame (base {_fmt(e.get('base_motion'))}, "
          f"ratio {_fmt(e.get('motion_ratio'))}): {collapse}")  # fmt: skip
    if e.get("warp_error") is not None:
        print(f"  consistency    warp error {_fmt(e['warp_error'])} (base {_fmt(e.get('base_warp_error'))}), "
              f"flicker {_fmt(e.get('flicker'))} (base {_fmt(e.get('base_flicker'))}); lower is steadier")  # fmt: skip
    if e.get("first_frame_psnr") is not None:
        print(
            f"  first frame    PSNR {e['first_frame_psnr']:.1f} dB (base {_fmt(e.get('base_first_frame_psnr'))} dB)"
        )
    elif "first_frame_psnr" in e:
        print("  first frame    not measured: no prompt had a first frame")
    if e.get("clip_score") is not None:
        print(f"  CLIP score     {e['clip_score']:.4f}")
    elif e.get("clip_skipped"):
        print(f"  CLIP           skipped: {e['clip_skipped']}")
    for prompt, p in sorted((e.get("per_prompt") or {}).items()):
        h = p.get("heldout") or {}
        parts = [f"acc {h['implicit_acc']:.3f} ({h.get('pairs')} pairs)"] if h else []
        if p.get("motion") is not None:
            parts.append(f"motion {p['motion']:.4g}")
        print(f"  prompt         {prompt!r}: {', '.join(parts)}")
    if e.get("plot_url"):
        print(f"  plot           {url}{e['plot_url']}")


def _evaluation_text(v: dict[str, Any], url: str) -> None:
    print(f"{v['id']}  {v['state']:<9}  {v['checkpoint_id']} vs {v.get('baseline')}")
    _kv(v, ("created_at", "created_by"))
    if v.get("error"):
        label = "reason" if v["state"] == "cancelled" else "error"
        print(f"{label:<16} {v['error']}")
    if v.get("summary"):
        _summary_text(v["summary"], url)


def _ev_create(c: Client, a: argparse.Namespace) -> int:
    prompts: list[Any] | None = None
    if a.prompts_file is not None:
        data = json.loads(Path(a.prompts_file).read_text())
        prompts = list(data.get("prompts", []) if isinstance(data, dict) else data)
    if a.prompt:
        prompts = [*(prompts or []), *a.prompt]
    version = _resolve_version(c, a.dataset, a.version) if a.dataset and a.version else a.version
    pairs = {"holdout_fraction": a.holdout_fraction} if a.holdout_fraction is not None else None
    generation = {k: v for k, v in (("steps", a.steps), ("num_frames", a.num_frames)) if v is not None}
    view = c.evaluations.create(
        a.checkpoint,
        baseline=None if a.baseline == "none" else a.baseline,
        dataset=a.dataset,
        version=version,
        pairs=pairs,
        prompts=prompts,
        seeds=a.seed,
        generation=generation or None,
        clip_model=a.clip_model,
        idempotency_key=a.idempotency_key,
    )
    print(f"created evaluation {view['id']}", file=sys.stderr, flush=True)
    if a.wait:
        return _ev_wait_for(c, a, view["id"])
    return _show(a, view, lambda v: _evaluation_text(v, c.url))


def _ev_wait_for(c: Client, a: argparse.Namespace, evaluation_id: str) -> int:
    try:
        view = c.evaluations.wait(evaluation_id, timeout=a.timeout, interval=a.interval)
    except KeyboardInterrupt:
        print(f"\ndetached: evaluation {evaluation_id} keeps running", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    _show(a, view, lambda v: _evaluation_text(v, c.url))
    return 0 if view["state"] == "succeeded" else int(ExitCode.FAILED)


def _ev_cancel(c: Client, a: argparse.Namespace) -> int:
    return _show(a, c.evaluations.cancel(a.id), lambda v: _evaluation_text(v, c.url))


def _ev_wait(c: Client, a: argparse.Namespace) -> int:
    return _ev_wait_for(c, a, a.id)


def _ev_show(c: Client, a: argparse.Namespace) -> int:
    view = c.evaluations.get(a.id)
    if a.plot is not None:
        c.evaluations.plot(a.id, a.plot)
        print(f"saved the comparison plot to {a.plot}", file=sys.stderr)
    return _show(a, view, lambda v: _evaluation_text(v, c.url))


def _ev_list(c: Client, a: argparse.Namespace) -> int:
    items = list(c.evaluations.list(checkpoint=a.checkpoint, state=a.state))

    def row(v: dict[str, Any]) -> tuple[Any, ...]:
        s = v.get("summary") or {}
        return (v["id"], v["state"], v["checkpoint_id"], s.get("heldout_implicit_acc"),
                s.get("motion_collapse"), v["created_at"])  # fmt: skip

    return _show(
        a,
        items,
        lambda xs: _table(
            [row(v) for v in xs], ("ID", "STATE", "CHECKPOINT", "HELDOUT-ACC", "COLLAPSE", "CREATED")
        ),
    )


# ------------------------------------------------------------------------------------------- delete
DELETE_HELP = {
    "model": "delete a base model (admin; refused while a fine-tune of it is active or has checkpoints)",
    "dataset": "delete a dataset or, with --version, one version (admin; refused while a fine-tune holds it)",
    "fine-tune": "delete a finished fine-tune with no checkpoint left (admin)",
    "checkpoint": "delete a checkpoint (admin; refused while a rollout serves it or its fine-tune runs)",
}


def _deleter(what: str, delete: Callable[[Client, argparse.Namespace], None]) -> Command:
    """A ``delete`` verb: one line on success; a refusal (409) names what holds it, exit 4."""

    def cmd(c: Client, a: argparse.Namespace) -> int:
        delete(c, a)
        name = getattr(a, "id", None) or a.name
        version = getattr(a, "version", None)
        print(f"deleted {what} {name}" + (f" version {version}" if version else ""))
        return 0

    return cmd


# ------------------------------------------------------------------------------------------ register
def _leaf(
    group: Any, name: str, fn: Command, help: str, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    p = group.add_parser(name, help=help, description=help, parents=[common])
    p.set_defaults(func=_run(fn))
    return p


def _group(sub: Any, name: str, help: str) -> Any:
    p = sub.add_parser(name, help=help, description=help)
    return p.add_subparsers(dest="verb", required=True, metavar="VERB")


def _wait_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--wait", action="store_true", help=f"wait until every inference replica serves {what}")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")


def register(sub: Any) -> None:
    """Add the remote verbs to ``huvidpo``'s subparsers."""
    common = _common()

    g = _group(sub, "models", "base models in the store (what fine-tunes adapt)")
    p = _leaf(
        g,
        "register",
        _models_register,
        "register a base model from a diffusers directory or a store prefix",
        common,
    )
    p.add_argument(
        "dir",
        type=Path,
        nargs="?",
        default=None,
        help="local model directory (diffusers layout, safetensors)",
    )
    p.add_argument("--name", required=True, help="the model id (base_model of a fine-tune)")
    p.add_argument(
        "--from-prefix", default=None, help="register files already in the object store under this prefix"
    )
    p.add_argument("--description", default="")
    _leaf(g, "list", _models_list, "list the registered base models", common)
    p = _leaf(g, "show", _models_show, "show one base model", common)
    p.add_argument("id")
    p = _leaf(
        g, "delete", _deleter("model", lambda c, a: c.models.delete(a.id)), DELETE_HELP["model"], common
    )
    p.add_argument("id")

    g = _group(sub, "datasets", "datasets of rated videos and their versions")
    p = _leaf(g, "create", _datasets_create, "create a dataset", common)
    p.add_argument("name")
    p.add_argument("--description", default="")
    p.add_argument("--exist-ok", action="store_true", help="an existing dataset is not an error")
    p = _leaf(
        g, "upload", _datasets_upload, "upload a directory (manifest + videos) as a new version", common
    )
    p.add_argument("name")
    p.add_argument("dir", type=Path)
    p.add_argument("--create", action="store_true", help="create the dataset first if it does not exist")
    p.add_argument("--resume", default=None, metavar="UPLOAD_ID", help="continue an interrupted upload")
    p.add_argument("--no-ratings", action="store_true", help="leave the dataset's stored rating records out")
    _leaf(g, "list", _datasets_list, "list datasets", common)
    p = _leaf(g, "show", _datasets_show, "show a dataset and its versions", common)
    p.add_argument("name")
    p = _leaf(
        g, "delete", _deleter("dataset", lambda c, a: c.datasets.delete(a.name, a.version)),
        DELETE_HELP["dataset"], common,
    )  # fmt: skip
    p.add_argument("name")
    p.add_argument("--version", default=None, help="delete only this version (id or digest)")
    p = _leaf(
        g, "pairs", _pairs_compile, "compile a version's preference pairs (same as pairs compile)", common
    )
    p.add_argument("dataset")
    _pairs_options(p)
    p = _leaf(
        g, "preference", _datasets_preference, "a version's A/B round: progress and its summary", common
    )
    p.add_argument("name")
    p.add_argument("--version", required=True, help="dataset version id or digest, or 'latest'")
    p.add_argument("--min-raters", type=int, default=None, help="raters the round needs to count as complete")

    g = _group(sub, "ratings", "rating records of a dataset's videos")
    p = _leaf(g, "add", _ratings_add, "add ratings (a score, a choice, or a JSONL file of records)", common)
    p.add_argument("dataset")
    p.add_argument("--video", default=None, help="video id to score")
    p.add_argument("--score", type=float, default=None, help="0..10")
    p.add_argument("--choice", nargs=2, metavar=("CHOSEN", "REJECTED"), default=None, help="a preference")
    p.add_argument("--rater", default=None, help="rater id (default: the token's name)")
    p.add_argument("--file", type=Path, default=None, help="JSONL of rating/choice records")
    p = _leaf(g, "list", _ratings_list, "list a dataset's stored rating records", common)
    p.add_argument("dataset")

    g = _group(sub, "fine-tunes", "DPO fine-tunes: create, watch, events, logs, cancel")
    p = _leaf(g, "create", _ft_create, "start a fine-tune", common)
    p.add_argument("--dataset", required=True)
    p.add_argument("--version", required=True, help="dataset version id or digest, or 'latest'")
    p.add_argument("--base-model", required=True, help="a registered base model id")
    p.add_argument("--stage", choices=("dpo", "stage1"), default="dpo")
    p.add_argument(
        "--hp", action="append", metavar="KEY=VALUE", help="a hyperparameter (repeat); see train dpo --help"
    )
    p.add_argument("--hyperparameters-file", type=Path, default=None, help="JSON object of hyperparameters")
    p.add_argument("--nodes", type=int, default=None)
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--idempotency-key", default=None, help="default: a new uuid4 (kept across retries)")
    p.add_argument(
        "--watch", action="store_true", help="follow it on a live line until it ends (Ctrl-C detaches)"
    )
    p.add_argument("--cancel-on-interrupt", action="store_true", help="with --watch: Ctrl-C cancels it")
    _watch_options(p)
    p = _leaf(
        g, "watch", _ft_watch, "follow a fine-tune on a live line until it ends (Ctrl-C detaches)", common
    )
    p.add_argument("id")
    p.add_argument("--cancel-on-interrupt", action="store_true", help="Ctrl-C cancels it")
    _watch_options(p)
    p = _leaf(g, "list", _ft_list, "list fine-tunes (newest first)", common)
    p.add_argument("--state", choices=("queued", "running", *TERMINAL), default=None)
    p.add_argument("--dataset", default=None)
    p = _leaf(g, "show", _ft_show, "show a fine-tune (state, progress, checkpoints)", common)
    p.add_argument("id")
    p = _leaf(g, "cancel", _ft_cancel, "cancel a fine-tune", common)
    p.add_argument("id")
    p = _leaf(
        g, "delete", _deleter("fine-tune", lambda c, a: c.fine_tunes.delete(a.id)), DELETE_HELP["fine-tune"],
        common,
    )  # fmt: skip
    p.add_argument("id")
    p = _leaf(g, "events", _ft_events, "the typed progress events (start, step, checkpoint, end)", common)
    p.add_argument("id")
    p.add_argument("--after", type=int, default=-1, help="only events with seq > AFTER")
    p.add_argument("-f", "--follow", action="store_true", help="stream until the fine-tune ends")
    p = _leaf(g, "metrics", _ft_metrics, "the step metrics' history (loss, reward accuracy, ...)", common)
    p.add_argument("id")
    p = _leaf(g, "logs", _ft_logs, "the trainer's output", common)
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")

    g = _group(sub, "checkpoints", "checkpoints of fine-tunes")
    p = _leaf(g, "list", _ck_list, "list checkpoints", common)
    p.add_argument("--fine-tune", default=None, help="only this fine-tune's")
    p = _leaf(g, "show", _ck_show, "show a checkpoint (files, lineage, sample videos)", common)
    p.add_argument("id")
    p = _leaf(
        g, "delete", _deleter("checkpoint", lambda c, a: c.checkpoints.delete(a.id)),
        DELETE_HELP["checkpoint"], common,
    )  # fmt: skip
    p.add_argument("id")
    p = _leaf(g, "download", _ck_download, "download a checkpoint's files (sha256-checked)", common)
    p.add_argument("id")
    p.add_argument("dir", type=Path)
    p = _leaf(
        g,
        "preference",
        _ck_preference,
        "human win rates in the A/B rounds comparing it (Wilson 95% interval, Bradley-Terry ranking)",
        common,
    )
    p.add_argument("id", help="a checkpoint id or 'base'")
    p.add_argument("--min-raters", type=int, default=None, help="raters a round needs to count as complete")

    g = _group(sub, "evaluations", "evaluations of checkpoints: held-out accuracy, motion, plots")
    p = _leaf(g, "create", _ev_create, "evaluate a checkpoint (a Job; --wait follows it)", common)
    p.add_argument("checkpoint")
    p.add_argument("--baseline", default="base", help="'base' (default), another checkpoint id, or 'none'")
    p.add_argument("--dataset", default=None, help="whose held-out pairs (default: the fine-tune's)")
    p.add_argument("--version", default=None, help="with --dataset: version id or digest, or 'latest'")
    p.add_argument(
        "--holdout-fraction", type=float, default=None, help="compile the version's held-out pairs"
    )
    p.add_argument("--prompt", action="append", default=None, help="a prompt of the prompt set (repeat)")
    p.add_argument(
        "--prompts-file", type=Path, default=None, help="JSON list of prompts or {prompt, first_frame}"
    )
    p.add_argument("--seed", type=int, action="append", default=None, help="a seed (repeat; default 0 and 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps of the generated clips")
    p.add_argument("--num-frames", type=int, default=None, help="frames of the generated clips")
    p.add_argument("--clip-model", default=None, help="a CLIP model id in the store (text-video alignment)")
    p.add_argument("--idempotency-key", default=None, help="default: a new uuid4 (kept across retries)")
    p.add_argument("--wait", action="store_true", help="wait until it ends (exit 1 unless it succeeded)")
    _watch_options(p)
    p = _leaf(g, "wait", _ev_wait, "wait until an evaluation ends (exit 1 unless it succeeded)", common)
    p.add_argument("id")
    _watch_options(p)
    p = _leaf(g, "list", _ev_list, "list evaluations (newest first)", common)
    p.add_argument("--checkpoint", default=None, help="only this checkpoint's")
    p.add_argument("--state", choices=("queued", "running", "succeeded", "failed", "cancelled"), default=None)
    p = _leaf(
        g, "cancel", _ev_cancel, "cancel an evaluation that has not finished (its Job is stopped)", common
    )
    p.add_argument("id")
    p = _leaf(g, "show", _ev_show, "show an evaluation (state, summary, per prompt)", common)
    p.add_argument("id")
    p.add_argument("--plot", type=Path, default=None, help="save the comparison PNG here")

    g = _group(sub, "rollouts", "which checkpoint each inference deployment serves")
    _leaf(g, "list", _ro_list, "list deployments' rollouts", common)
    p = _leaf(g, "show", _ro_show, "desired vs served per replica and the Ready condition", common)
    p.add_argument("deployment")
    p = _leaf(
        g,
        "set",
        _rollout_change(lambda c, a: c.rollouts.set(a.deployment, a.checkpoint, create=a.create)),
        "serve a checkpoint (or 'base') to all traffic",
        common,
    )
    p.add_argument("deployment")
    p.add_argument("checkpoint")
    p.add_argument("--create", action="store_true", help="start a deployment that has no rollout yet")
    _wait_options(p, "it")
    p = _leaf(
        g,
        "canary",
        _rollout_change(_ro_canary),
        "send a percentage of requests to a checkpoint (with a policy: promoted or rolled back by the gate)",
        common,
    )
    p.add_argument("deployment")
    p.add_argument("checkpoint")
    p.add_argument("--percent", type=int, required=True, help="1..100")
    _policy_options(p)
    _wait_options(p, "it")
    p = _leaf(
        g,
        "evaluate",
        _ro_evaluate,
        "check the canary against its policy now: promote, roll back (exit 1) or wait, with the reasons",
        common,
    )
    p.add_argument("deployment")
    _wait_options(p, "a promotion or rollback")
    p = _leaf(
        g, "history", _ro_history, "every change, with the rollout gate's decisions and reasons", common
    )
    p.add_argument("deployment")
    p = _leaf(
        g,
        "promote",
        _rollout_change(lambda c, a: c.rollouts.promote(a.deployment)),
        "make the canary the current checkpoint",
        common,
    )
    p.add_argument("deployment")
    _wait_options(p, "the result")
    p = _leaf(
        g,
        "rollback",
        _rollout_change(lambda c, a: c.rollouts.rollback(a.deployment)),
        "go back to the previous state",
        common,
    )
    p.add_argument("deployment")
    _wait_options(p, "the result")


def _policy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy (the rollout gate promotes when all hold, rolls back when one fails)")
    g.add_argument("--policy", default=None, metavar="FILE.json", help="a RolloutPolicy JSON object")
    g.add_argument(
        "--policy-min-accuracy", type=float, default=None, metavar="X", help="held-out implicit accuracy >= X"
    )
    g.add_argument(
        "--policy-min-requests",
        type=int,
        default=None,
        metavar="N",
        help="canary requests before errors count",
    )
    g.add_argument(
        "--policy-max-error-margin",
        type=float,
        default=None,
        metavar="M",
        help="canary error ratio <= stable's + M (default 0.02)",
    )
    g.add_argument(
        "--policy-allow-motion-collapse",
        action="store_true",
        help="do not require the evaluation to find no motion collapse",
    )
    g.add_argument(
        "--policy-ignore-human-rounds",
        action="store_true",
        help="do not require a human A/B win (Wilson lower bound > 0.5) when a round exists",
    )
    g.add_argument("--policy-min-raters", type=int, default=None, metavar="N", help="raters a round needs")
    g.add_argument(
        "--policy-max-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="roll back if undecided this long",
    )


def _watch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=None, help="give up watching after this many seconds")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")


def _pairs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", required=True, help="dataset version id or digest, or 'latest'")
    p.add_argument("--tie-policy", choices=("drop", "keep"), default="drop")
    p.add_argument("--min-margin", type=float, default=None, help="drop score pairs closer than this (0..10)")
    p.add_argument("--margin-weighting", action="store_true")
    p.add_argument("--seed", type=int, default=None, help="the fine-tune's seed (default 33)")
    p.add_argument("--holdout-fraction", type=float, default=None, help="hold out this fraction of prompts")
    p.add_argument("--holdout-seed", type=int, default=None)


def rewrite_argv(argv: list[str]) -> list[str]:
    """``huvidpo pairs compile --dataset NAME ...`` (the remote compile) is ``huvidpo datasets pairs
    NAME ...``; ``huvidpo pairs DIR`` (the local library command) is left alone."""
    if argv[:2] == ["pairs", "compile"] and any(x == "--dataset" or x.startswith("--dataset=") for x in argv):
        rest = argv[2:]
        out: list[str] = []
        name: str | None = None
        i = 0
        while i < len(rest):
            if rest[i] == "--dataset" and i + 1 < len(rest):
                name = rest[i + 1]
                i += 2
                continue
            if rest[i].startswith("--dataset="):
                name = rest[i].split("=", 1)[1]
            else:
                out.append(rest[i])
            i += 1
        return ["datasets", "pairs", *([name] if name is not None else []), *out]
    return argv
