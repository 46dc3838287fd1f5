"""Who may do what in the bucket: one store user per component, defined once, here.

Every other form of the split is generated from ``GRANTS`` (``python -m services.common.store.policies
--write``, or ``make store-policies``), and a test checks that the committed copies equal the output:

- ``deploy/base/store-policies/<component>.iam.json``: an identity policy per component. The MinIO
  bucket-init Job creates one user per component and attaches these (``mc admin policy create``); on
  AWS S3 they are the IAM policies of the components' users or roles as they are.
- ``deploy/base/store-policies/bucket-policy.json``: the same grants as one bucket policy naming the
  users as principals, for servers that take bucket policies rather than IAM (Ceph radosgw).
- the table in ``deploy/README.md`` ("Store access per component").

The prefixes come from ``services.common.records.keys``, the only place keys are built. What each
component does there (read from the code, ``services/*``):

control plane
    ``datasets/``: creates datasets, stages uploads (its own multipart and presigned PUTs), commits
    versions, validates and compiles pairs, records ratings, deletes: read, write, delete.
    ``finetunes/`` and ``idempotency/finetunes/``: creates specs, compare-and-swaps statuses, reads
    the trainer's progress, deletes fine-tunes: read, write, delete.
    ``rollouts/``: lists and compare-and-swaps the rollout records, reads the inference replicas'
    heartbeats (``rollouts/*/replicas/``) for the rollout status: read, write (never deleted).
    ``checkpoints/``: lists the published checkpoints, reads their manifests, signs download URLs
    (which act with its key), deletes checkpoints: read, delete. It never writes one: only the trainer
    publishes, so a control plane decoding a hostile upload cannot forge a checkpoint.
    ``models/``: registers base models (``POST /v1/models``): stages the files under
    ``models/{id}/uploads/``, publishes the manifest, deletes a refused or repeated upload's staged
    files; checks that a fine-tune's base model exists: read, write, delete.
    ``imports/``: the files a registration with ``from_prefix`` copies: read.
    ``evaluations/``: writes evaluation specs, reads their records and plots (the checkpoint view, the
    rollout gate), deletes them: read, write, delete.
    ``.huvidpo-tmp/``: ``MinioStore.put_stream`` uploads a stream of unknown length there by
    multipart, then copies it to its key and deletes it: read, write, delete. Only the control plane
    streams (uploads); the trainer and inference write files and bytes of known size.
trainer
    ``datasets/`` and ``models/``: downloads the version it trains on (with the staged upload files a
    version references and the compiled pairs) and the base model: read.
    ``finetunes/``: reads its spec and status (the cancel request): read.
    ``finetunes/*/progress.jsonl``: keeps the progress records: write.
    ``checkpoints/``: lists the published steps (its resume point), downloads one to resume,
    publishes new ones: read, write, delete (``put_file`` deletes an object whose file changed while
    it was sent; a writer can overwrite anyway, so delete adds no power).
    One user serves every trainer Job, so these cover every fine-tune's checkpoints and progress, not
    only the Job's own: narrowing them to one fine-tune needs a credential per Job (e.g. STS
    AssumeRole with a session policy on ``checkpoints/ckpt-<id>-*``), which this split does not do.
    ``evaluations/``: the evaluator Job (``python -m services.evaluator``, the trainer image and store
    user, run by the control plane through the fine-tunes' executor) reads its spec and writes the
    record and plot: read, write, delete (``put_file`` deletes a plot whose file changed while it was
    sent, as for checkpoints). The rest it reads is the trainer's already: the base model and CLIP
    model (``models/``), the checkpoints, the dataset version with its held-out pairs and the first
    frames (files of that version, ``datasets/``).
inference
    ``models/``, ``checkpoints/`` and ``rollouts/``: the base model, the adapters it serves and the
    rollout record it follows: read.
    ``generations/``: videos over the inline limit, behind a presigned URL signed with its key: read,
    write. ``first_frame_uri`` can therefore only name objects under these prefixes.
    ``rollouts/*/replicas/*.json``: its heartbeat record (the checkpoints and rollout revision it
    serves), rewritten every poll: write. One user serves every replica, so a replica could write
    another's record; the control plane only reports them.

"read" is ``s3:GetObject`` plus ``s3:ListBucket`` restricted (``s3:prefix``) to the same keys: a
reader can probe any key with a GET anyway, and S3 (radosgw too) answers 403, not 404, to a GET of a
missing key from a principal without list rights, so ``MinioStore`` lists the one key to tell
"missing" from "denied" (``ObjectNotFound`` vs ``StoreAccessDenied``). "write" is ``s3:PutObject``
(single and multipart uploads, server-side copies) and ``s3:AbortMultipartUpload``. "delete" is
``s3:DeleteObject`` (single and multi-object deletes). No component may change the bucket, its policy
or another user: that is the root user's, which only the bucket-init Job holds.
"""

from __future__ import annotations

import argparse
import enum
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.records import keys
from services.common.store.helpers import RESERVED_PREFIX


class Access(enum.Flag):
    READ = enum.auto()
    WRITE = enum.auto()
    DELETE = enum.auto()


R, W, D = Access.READ, Access.WRITE, Access.DELETE
NAMES = {R: "read", W: "write", D: "delete"}

# The actions behind each access; "read" also lists the same keys (statement with an s3:prefix condition).
ACTIONS: dict[Access, tuple[str, ...]] = {
    Access.READ: ("s3:GetObject",),
    Access.WRITE: ("s3:PutObject", "s3:AbortMultipartUpload"),
    Access.DELETE: ("s3:DeleteObject",),
}
TMP_PREFIX = RESERVED_PREFIX + "tmp/"  # MinioStore.put_stream's multipart staging (see s3.py)
ANY = "*"  # an id in a key pattern: matches within one key segment on radosgw, any characters on AWS


@dataclass(frozen=True)
class Grant:
    """``access`` to every key matching ``pattern`` (an S3 resource pattern relative to the bucket)."""

    pattern: str
    access: Access
    why: str


def _all(prefix: str) -> str:
    return prefix + "*"


COMPONENTS = ("controlplane", "trainer", "inference")

GRANTS: dict[str, tuple[Grant, ...]] = {
    "controlplane": (
        Grant(_all(keys.DATASETS), R | W | D, "datasets, uploads, versions, ratings, compiled pairs"),
        Grant(_all(keys.FINETUNES), R | W | D, "fine-tune specs and statuses; reads progress"),
        Grant(_all(keys.IDEMPOTENCY_FINETUNES), R | W | D, "Idempotency-Key records of fine-tune creates"),
        Grant(_all(keys.ROLLOUTS), R | W, "rollout records (compare-and-swap)"),
        Grant(_all(keys.CHECKPOINTS), R | D, "lists, signs downloads, deletes; never publishes"),
        Grant(_all(keys.MODELS), R | W | D, "registers base models (stages, publishes, drops refused ones)"),
        Grant(_all(keys.IMPORTS), R, "files to register as a base model (from_prefix)"),
        Grant(_all(keys.EVALUATIONS), R | W | D, "evaluation specs, records and plots"),
        Grant(_all(TMP_PREFIX), R | W | D, "multipart staging of streamed uploads"),
    ),
    "trainer": (
        Grant(_all(keys.DATASETS), R, "the dataset version and compiled pairs it trains on"),
        Grant(_all(keys.MODELS), R, "the base model"),
        Grant(_all(keys.FINETUNES), R, "its spec and status"),
        Grant(keys.progress_key(ANY), W, "its progress records"),
        Grant(_all(keys.CHECKPOINTS), R | W | D, "publishes checkpoints, resumes from them"),
        Grant(_all(keys.EVALUATIONS), R | W | D, "the evaluator Job: its spec, record and plot"),
    ),
    "inference": (
        Grant(_all(keys.MODELS), R, "the base model"),
        Grant(_all(keys.CHECKPOINTS), R, "the adapters it serves"),
        Grant(_all(keys.ROLLOUTS), R, "the rollout record it follows"),
        Grant(_all(keys.GENERATIONS), R | W, "videos over the inline limit, behind presigned URLs"),
        Grant(keys.replica_key(ANY, ANY), W, "its replica heartbeat (what it serves)"),
    ),
}

USER_PREFIX = "huvidpo-"
DEFAULT_BUCKET = "huvidpo"


def user_name(component: str) -> str:
    """The store user (MinIO policy name, radosgw uid) of ``component``: ``huvidpo-<component>``."""
    if component not in GRANTS:
        raise ValueError(f"unknown component {component!r}; one of {', '.join(COMPONENTS)}")
    return USER_PREFIX + component


def allows(component: str, access: Access, key: str) -> bool:
    """Whether ``component`` has ``access`` to ``key``. A trailing ``*`` covers any rest of the key;
    one inside a pattern covers one key segment (radosgw's reading; AWS's is wider, ids have no ``/``)."""
    return any(access in g.access and _regex(g.pattern).match(key) for g in GRANTS[component])


def _regex(pattern: str) -> re.Pattern[str]:
    body, rest = (pattern[:-1], ".*") if pattern.endswith("*") else (pattern, "")
    return re.compile("^" + re.escape(body).replace(r"\*", "[^/]*") + rest + "$")


def _statements(component: str, bucket: str) -> list[dict[str, Any]]:
    statements: list[dict[str, Any]] = []
    grants = GRANTS[component]
    for access in (Access.READ, Access.WRITE, Access.DELETE):
        patterns = [g.pattern for g in grants if access in g.access]
        if not patterns:
            continue
        statements.append(
            {
                "Sid": NAMES[access].capitalize(),
                "Effect": "Allow",
                "Action": list(ACTIONS[access]),
                "Resource": [f"arn:aws:s3:::{bucket}/{p}" for p in patterns],
            }
        )
        if access is Access.READ:
            statements.append(
                {
                    "Sid": "List",
                    "Effect": "Allow",
                    "Action": ["s3:ListBucket"],
                    "Resource": [f"arn:aws:s3:::{bucket}"],
                    "Condition": {"StringLike": {"s3:prefix": patterns}},
                }
            )
    return statements


def iam_policy(component: str, bucket: str = DEFAULT_BUCKET) -> dict[str, Any]:
    """The identity policy of ``component``'s user (MinIO ``mc admin policy create``, AWS IAM)."""
    user_name(component)
    return {"Version": "2012-10-17", "Statement": _statements(component, bucket)}


def bucket_policy(bucket: str = DEFAULT_BUCKET, principals: dict[str, str] | None = None) -> dict[str, Any]:
    """One bucket policy granting each component's user its own statements (radosgw, or any server
    that takes bucket policies). ``principals``: component -> principal ARN (default: the radosgw
    user ``arn:aws:iam:::user/huvidpo-<component>``, no tenant)."""
    principals = principals or {c: f"arn:aws:iam:::user/{user_name(c)}" for c in COMPONENTS}
    statements = []
    for component in COMPONENTS:
        for st in _statements(component, bucket):
            sid = f"{component.capitalize()}{st['Sid']}"
            statements.append({**st, "Sid": sid, "Principal": {"AWS": [principals[component]]}})
    return {"Version": "2012-10-17", "Statement": statements}


def markdown_table() -> str:
    """The per-component table of deploy/README.md."""
    rows = ["| Component | Keys | Access | Why |", "|---|---|---|---|"]
    for component in COMPONENTS:
        for g in GRANTS[component]:
            access = ", ".join(name for a, name in NAMES.items() if a in g.access)
            rows.append(f"| {component} | `{g.pattern}` | {access} | {g.why} |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------- generation
REPO = Path(__file__).resolve().parents[3]
POLICY_DIR = Path("deploy/base/store-policies")
README = Path("deploy/README.md")
TABLE_BEGIN = "<!-- store-policies:begin (generated: make store-policies) -->\n"
TABLE_END = "<!-- store-policies:end -->\n"


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def generated_files(root: Path = REPO) -> dict[Path, str]:
    """Every generated file (path relative to ``root``) and its content; the README keeps its text
    outside the marked table."""
    files = {POLICY_DIR / f"{c}.iam.json": _dump(iam_policy(c)) for c in COMPONENTS}
    files[POLICY_DIR / "bucket-policy.json"] = _dump(bucket_policy())
    readme = (root / README).read_text()
    head, sep, rest = readme.partition(TABLE_BEGIN)
    if not sep or TABLE_END not in rest:
        raise ValueError(f"{README} has no store-policies markers")
    files[README] = head + TABLE_BEGIN + markdown_table() + TABLE_END + rest.split(TABLE_END, 1)[1]
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the generated files")
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale")
    parser.add_argument("--component", choices=COMPONENTS, help="print this component's IAM policy")
    args = parser.parse_args(argv)
    if args.component:
        sys.stdout.write(_dump(iam_policy(args.component)))
        return 0
    stale = []
    for rel, text in generated_files().items():
        path = REPO / rel
        if path.exists() and path.read_text() == text:
            continue
        stale.append(str(rel))
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        verb = "rewrote" if args.write else "stale (run make store-policies)"
        print(f"{verb}: {', '.join(stale)}", file=sys.stderr)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
