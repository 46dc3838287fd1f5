"""Sample videos per checkpoint: rendered by the trainer into each checkpoint (DPO with the LoRA
active, stage 1), listed in its manifest, published with it by the trainer entrypoint and served by
the control plane; training is the same with them on or off."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from huvidpo.data import make_synthetic_dataset
from huvidpo.training import ConfigError, DPOConfig, Stage1Config, run_dpo, run_stage1
from huvidpo.training.checkpoint import is_complete, list_checkpoints
from huvidpo.training.samples import plan_samples
from huvidpo.video_io import read_video

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("samples-data")
    return make_synthetic_dataset(
        root / "data", n_prompts=2, videos_per_prompt=3, num_frames=4, size=32, seed=3
    )


def _dpo(model: Path, data: Path, out: Path, **kw: Any) -> DPOConfig:
    values: dict[str, Any] = dict(
        model=str(model), dataset=str(data), output_dir=str(out), num_frames=4, height=32, width=32,
        max_steps=2, checkpoint_every=1, keep_last=5, lora_rank=2, lora_dropout=0.5, lr=1e-2,
        device="cpu", plot=False, sample_steps=2,
    )  # fmt: skip
    values.update(kw)
    return DPOConfig(**values)


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_checkpoints_hold_sample_videos_in_their_manifest_and_training_is_unchanged(
    tiny_model_dir: Path, pref_data: Path, tmp_path: Path
) -> None:
    held_out = {"holdout_fraction": 0.5}  # one of the two prompts: the samples take it first
    t0 = time.perf_counter()
    off = run_dpo(_dpo(tiny_model_dir, pref_data, tmp_path / "off", **held_out))
    t_off = time.perf_counter() - t0
    t0 = time.perf_counter()
    on = run_dpo(_dpo(tiny_model_dir, pref_data, tmp_path / "on", sample_count=2, **held_out))
    t_on = time.perf_counter() - t0
    print(f"2 steps, 2 checkpoints: {t_off:.2f} s without samples, {t_on:.2f} s with 2 samples each")
    # Same seed: the same losses (LoRA dropout 0.5 draws from the global RNG every step) and weights.
    assert _losses(tmp_path / "on") == _losses(tmp_path / "off")
    from safetensors.torch import load_file

    assert on.weights_dir is not None and off.weights_dir is not None
    a = load_file(str(on.weights_dir / "adapter_model.safetensors"))
    b = load_file(str(off.weights_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)

    ckpts = list_checkpoints(tmp_path / "on" / "checkpoints")
    assert [p.name for p in ckpts] == ["ckpt-000001", "ckpt-000002"]
    assert not (list_checkpoints(tmp_path / "off" / "checkpoints")[0] / "samples").exists()  # off by default
    held = on.data_report["heldout_prompts"]
    for ck in ckpts:
        assert is_complete(ck, verify=True)
        files = json.loads((ck / "manifest.json").read_text())["files"]
        items = json.loads((ck / "samples" / "samples.json").read_text())["items"]
        assert [i["index"] for i in items] == [0, 1] and [i["seed"] for i in items] == [0, 1]
        assert items[0]["prompt"] == held[0]  # held-out prompts first
        assert items[1]["prompt"] != held[0]
        assert "samples/samples.json" in files
        for it in items:
            assert {k: it[k] for k in ("frames", "height", "width", "steps")} == {
                "frames": 4, "height": 32, "width": 32, "steps": 2,
            }  # fmt: skip
            assert it["video"] == f"samples/{it['index']:02d}.mp4" and it["video"] in files
            assert it["first_frame"] == f"samples/{it['index']:02d}-first.png" and it["first_frame"] in files
            frames, _ = read_video(ck / it["video"])
            assert frames.shape == (4, 32, 32, 3)
    # The weights changed between checkpoints and so did the samples (same prompts, frames, seeds).
    v1, v2 = (read_video(ck / "samples" / "00.mp4")[0] for ck in ckpts)
    assert not np.array_equal(v1[1:], v2[1:])


def test_stage1_checkpoints_hold_samples_with_explicit_prompts_and_first_frames(
    tiny_model_dir: Path, pref_data: Path, tmp_path: Path
) -> None:
    first = sorted((pref_data / "videos").iterdir())[0].relative_to(pref_data).as_posix()
    cfg = Stage1Config(
        model=str(tiny_model_dir), dataset=str(pref_data), output_dir=str(tmp_path / "s1"), num_frames=4,
        height=32, width=32, max_steps=1, device="cpu", plot=False, sample_count=3, sample_steps=1,
        sample_prompts=("a red ball", "a blue cube"), sample_first_frames=(first, first),
        sample_num_frames=3, sample_height=16, sample_width=24, sample_seed=7,
    )  # fmt: skip
    run_stage1(cfg)
    [ck] = list_checkpoints(tmp_path / "s1" / "checkpoints")
    items = json.loads((ck / "samples" / "samples.json").read_text())["items"]
    assert [(i["prompt"], i["seed"]) for i in items] == [
        ("a red ball", 7),
        ("a blue cube", 8),
        ("a red ball", 9),
    ]
    assert read_video(ck / items[2]["video"])[0].shape == (3, 16, 24, 3)


def test_sample_options_are_checked_and_default_off(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert DPOConfig().sample_count == 0 and Stage1Config().sample_count == 0
    base = {"model": "m", "dataset": "d", "output_dir": "o"}
    for bad, field in (
        ({"sample_count": 17}, "sample_count"),
        ({"sample_height": 30}, "sample_height"),
        ({"sample_steps": 0}, "sample_steps"),
        ({"sample_prompts": ["a"], "sample_first_frames": ["x.png", "y.png"]}, "sample_first_frames"),
        ({"sample_prompts": ["a"], "sample_first_frames": ["/etc/passwd"]}, "sample_first_frames"),
        ({"sample_prompts": ["a"], "sample_first_frames": ["../x.png"]}, "sample_first_frames"),
    ):
        with pytest.raises(ConfigError) as err:
            DPOConfig.from_mapping({**base, **bad}).validate()
        assert err.value.field == field
    # A first frame the dataset lacks is refused before training starts, naming the file as given.
    cfg = DPOConfig(**base, sample_count=1, sample_prompts=("a",), sample_first_frames=("videos/gone.mp4",))
    with pytest.raises(ConfigError, match=r"'videos/gone\.mp4' is not a file of the dataset") as err:
        plan_samples(cfg, [])
    assert err.value.field == "sample_first_frames"


# -- the trainer entrypoint publishes them; the control plane lists and serves them ---------------
def test_trainer_publishes_samples_and_the_api_lists_and_serves_them(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from services.common.records.finetune import FineTuneSpec, write_spec
    from services.common.settings import TrainerSettings
    from services.common.store import LocalStore
    from services.trainer.entry import run
    from tests.unit.test_trainer_entry import _version

    store = LocalStore(tmp_path / "s")
    version = _version(store, tmp_path, tiny_model_dir)
    hp = {"height": 32, "width": 32, "num_frames": 4, "max_steps": 1, "lora_rank": 2, "sample_count": 2,
          "sample_steps": 1}  # fmt: skip
    write_spec(store, FineTuneSpec.model_validate({
        "id": "ft-s", "created_at": "2026-01-01T00:00:00Z", "dataset": "cats", "version": version,
        "base_model": "tiny", "stage": "dpo", "hyperparameters": hp,
    }))  # fmt: skip
    assert run(store, TrainerSettings(finetune_id="ft-s", work_dir=tmp_path / "w", device="cpu")) == 0
    manifest = store.get_json("checkpoints/ckpt-ft-s-1/manifest.json")
    for rel in ("samples/samples.json", "samples/00.mp4", "samples/01.mp4", "samples/00-first.png"):
        assert rel in manifest["files"], rel
    items = json.loads(store.get_bytes("checkpoints/ckpt-ft-s-1/samples/samples.json"))["items"]
    assert len(items) == 2

    client = _client(store, tmp_path)
    body = client.get("/v1/checkpoints/ckpt-ft-s-1").json()
    assert body["samples"] == [
        {"index": i["index"], "prompt": i["prompt"], "seed": i["seed"], "url": f"/v1/checkpoints/ckpt-ft-s-1/samples/{i['index']}"}
        for i in items
    ]  # fmt: skip
    listed = client.get("/v1/checkpoints", params={"finetune_id": "ft-s"}).json()["items"]
    assert listed[0]["samples"] == body["samples"]
    r = client.get(body["samples"][1]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert r.content == store.get_bytes("checkpoints/ckpt-ft-s-1/samples/01.mp4")
    assert read_video(r.content)[0].shape == (4, 32, 32, 3)
    for url in ("/v1/checkpoints/ckpt-ft-s-1/samples/2", "/v1/checkpoints/ckpt-ft-nope-1/samples/0"):
        missing = client.get(url)
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
        assert missing.json()["type"].endswith("/not-found"), missing.json()


def _client(store: Any, tmp_path: Path) -> TestClient:
    """The control plane over ``store``, every request with a token of scope ``read`` only."""
    import hashlib

    from services.common.settings import ControlPlaneSettings
    from services.controlplane.app import create_app
    from tests.unit.test_controlplane_api import FakeExecutor

    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(b"admin").hexdigest()],
        read_tokens=[hashlib.sha256(b"reader").hexdigest()],
        work_dir=tmp_path / "cp",
    )
    app = create_app(settings, store, FakeExecutor(), background=False)
    return TestClient(app, headers={"Authorization": "Bearer reader"})
