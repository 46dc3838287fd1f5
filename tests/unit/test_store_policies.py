"""The store's per-component access split: defined once, generated everywhere, wired to the right pods.

The policies themselves are tested on a real S3 server in tests/integration/test_store_policies_s3.py;
here: the committed files are the generated ones, the bucket-init Job creates each user with its own
policy (its script run against a stub ``mc``), and every pod gets only its own store key.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

from services.common.records import keys
from services.common.store import policies
from services.common.store.policies import COMPONENTS, Access, allows
from tests.unit.test_deploy_manifests import (  # noqa: F401
    ENVIRONMENTS,
    Obj,
    by_kind,
    check,
    configmap,
    pods,
    rendered,
)

ROOT = Path(__file__).resolve().parents[2]
STORE_SECRET = re.compile(r"^huvidpo-store-(root|controlplane|trainer|inference)(-[a-z0-9]{10})?$")


def test_committed_policy_files_and_readme_table_are_the_generated_ones() -> None:
    for rel, text in policies.generated_files().items():
        assert (ROOT / rel).read_text() == text, f"{rel} is stale: run make store-policies"
    assert policies.main(["--check"]) == 0


def test_the_split_keeps_each_component_to_its_prefixes() -> None:
    ft, cid = "ft-abc", keys.checkpoint_id("ft-abc", 3)
    assert allows("trainer", Access.WRITE, keys.progress_key(ft))
    assert allows("trainer", Access.WRITE, keys.checkpoint_manifest_key(cid))
    assert not allows("trainer", Access.WRITE, keys.finetune_status_key(ft))  # the control plane's alone
    assert not allows("trainer", Access.WRITE, keys.dataset_prefix("cats") + "dataset.json")
    assert not allows(
        "controlplane", Access.WRITE, keys.checkpoint_manifest_key(cid)
    )  # only the trainer publishes
    assert allows("controlplane", Access.READ, keys.model_manifest_key("tiny"))
    # POST /v1/models: the control plane registers base models, read from imports/ or uploaded
    assert allows("controlplane", Access.WRITE, keys.model_manifest_key("tiny"))
    assert allows("controlplane", Access.READ, keys.IMPORTS + "sd15/unet/config.json")
    assert not allows("controlplane", Access.WRITE, keys.IMPORTS + "sd15/unet/config.json")
    assert allows("inference", Access.WRITE, keys.generation_key("default", "r1", "mp4"))
    assert not allows("inference", Access.READ, keys.dataset_prefix("cats") + "dataset.json")
    assert not any(allows(c, Access.WRITE, keys.model_manifest_key("tiny")) for c in ("trainer", "inference"))
    # Nobody is granted anything on the bucket itself (policy, ACL, deletion): only object actions
    # and listing its keys.
    for c in COMPONENTS:
        actions = {a for st in policies.iam_policy(c)["Statement"] for a in st["Action"]}
        assert actions <= {
            "s3:GetObject",
            "s3:ListBucket",
            "s3:PutObject",
            "s3:AbortMultipartUpload",
            "s3:DeleteObject",
        }


def _secret_value(objects: list[Obj], name: str, key: str) -> str:
    found = [
        s for n, s in by_kind(objects, "Secret").items() if re.fullmatch(rf"{name}(-[a-z0-9]{{10}})?", n)
    ]
    assert len(found) == 1, name
    secret = found[0]
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def _store_secrets(spec: Obj) -> set[str]:
    names = set()
    for c in spec.get("initContainers", []) + spec["containers"]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and STORE_SECRET.match(ref["name"]):
                names.add(STORE_SECRET.match(ref["name"]).group(1))  # type: ignore[union-attr]
        for src in c.get("envFrom", []):
            assert "secretRef" not in src or not STORE_SECRET.match(src["secretRef"]["name"])
    for v in spec.get("volumes", []):
        assert not STORE_SECRET.match(v.get("secret", {}).get("secretName", ""))
    return names


def test_each_pod_gets_only_its_own_store_key(rendered: dict[str, list[Obj]]) -> None:  # noqa: F811
    expected = {
        "Deployment/huvidpo-controlplane": {"controlplane"},
        "Deployment/huvidpo-inference": {"inference"},
        "trainer-job": {"trainer"},
        "StatefulSet/huvidpo-minio": {"root"},
        "Job/huvidpo-bucket-init": {"root", *COMPONENTS},
        "Job/huvidpo-seed-tiny-model": {"root"},  # cpu-dev: an operator's upload of the base model
    }
    for env in ENVIRONMENTS:
        seen = {}
        for workload, _, _, spec in pods(rendered[env]):
            got = _store_secrets(spec)
            if got:
                seen[workload] = got
        assert seen == {k: v for k, v in expected.items() if k in seen}, (env, seen)
        assert {"Deployment/huvidpo-controlplane", "Deployment/huvidpo-inference", "trainer-job"} <= set(seen)
        # The Secret the trainer Jobs name is generated under exactly that name in development; a
        # production overlay requires it (and every other store Secret) by that name instead.
        if env in check.DEV_RENDERS:
            assert "huvidpo-store-trainer" in by_kind(rendered[env], "Secret")
        else:
            required = {
                b["spec"]["paramRef"]["name"]
                for b in by_kind(rendered[env], "ValidatingAdmissionPolicyBinding").values()
                if "paramRef" in b["spec"]  # the require-secrets bindings (others take no parameter)
            }
            assert {f"huvidpo-store-{c}" for c in ("root", *COMPONENTS)} <= required, env


def _bucket_init(objects: list[Obj]) -> tuple[str, dict[str, str]]:
    job = by_kind(objects, "Job")["huvidpo-bucket-init"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {k: str(v) for k, v in configmap(objects, "huvidpo-store")["data"].items()}
    for e in container["env"]:
        ref = e["valueFrom"]["secretKeyRef"]
        env[e["name"]] = _secret_value(objects, re.sub(r"-[a-z0-9]{10}$", "", ref["name"]), ref["key"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "policies")
    env["_POLICY_MOUNT"] = mounts["policies"]
    env["_POLICY_CONFIGMAP"] = volume["configMap"]["name"]
    assert container["command"] == ["/bin/sh", "-ec"]
    return container["args"][0], env


def test_bucket_init_job_creates_one_user_and_policy_per_component(
    rendered: dict[str, list[Obj]],  # noqa: F811
    tmp_path: Path,
) -> None:
    objects = rendered["deploy"]
    script, env = _bucket_init(objects)
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    cm = by_kind(objects, "ConfigMap")[env.pop("_POLICY_CONFIGMAP")]
    assert env.pop("_POLICY_MOUNT") == "/etc/huvidpo/store-policies"
    assert set(cm["data"]) == {f"{c}.iam.json" for c in COMPONENTS}
    for name, text in cm["data"].items():
        (policy_dir / name).write_text(text)
    # A stub mc: logs its arguments; `admin user info` shows the policies attached so far.
    bin_dir, log, attached = tmp_path / "bin", tmp_path / "mc.log", tmp_path / "attached"
    bin_dir.mkdir()
    attached.write_text("")
    stub = bin_dir / "mc"
    stub.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in\n'
        f'  *"admin user info"*) for p in $(cat {attached}); do echo "{{\\"policyName\\":\\"$p\\"}}"; done ;;\n'
        f'  *"admin policy attach"*) echo "$7" >> {attached} ;;\n'
        "esac\n"
    )
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    run_env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        **env,
        "HUVIDPO_STORE_BUCKET": "my-bucket",
        "MC_DIR": str(tmp_path / "mc"),
        "POLICY_DIR": str(policy_dir),
    }
    (tmp_path / "mc").mkdir()
    for _ in range(2):  # a re-run (after a Secret change) is harmless
        subprocess.run(["/bin/sh", "-ec", script], env=run_env, check=True, timeout=30)
    calls = log.read_text().splitlines()
    root = (env["ROOT_ACCESS_KEY"], env["ROOT_SECRET_KEY"])
    assert any(
        c.endswith(f"alias set store http://{env['HUVIDPO_STORE_ENDPOINT']} {root[0]} {root[1]}")
        for c in calls
    )
    assert sum("mb --ignore-existing store/my-bucket" in c for c in calls) == 2
    for c in COMPONENTS:
        key, secret = env[f"{c}_ACCESS_KEY"], env[f"{c}_SECRET_KEY"]
        assert key != root[0] and key.startswith("huvidpo-dev-")
        assert sum(call.endswith(f"admin user add store {key} {secret}") for call in calls) == 2
        created = [call for call in calls if f"admin policy create store huvidpo-{c} " in call]
        assert len(created) == 2
        loaded = json.loads(Path(created[0].rsplit(" ", 1)[1]).read_text())
        assert loaded == policies.iam_policy(c, bucket="my-bucket")
        attaches = [call for call in calls if "admin policy attach" in call and f"huvidpo-{c} " in call]
        assert attaches == [
            f"--config-dir {tmp_path / 'mc'} admin policy attach store huvidpo-{c} --user {key}"
        ]
    assert "set -x" not in script  # secrets are never echoed


def test_no_component_creates_the_bucket(rendered: dict[str, list[Obj]]) -> None:  # noqa: F811
    """The bucket exists before any component starts (the Job makes it), and no component creates it."""
    for env in ENVIRONMENTS:
        data: dict[str, Any] = configmap(rendered[env], "huvidpo-store")["data"]
        assert data["HUVIDPO_STORE_CREATE_BUCKET"] == "false"
