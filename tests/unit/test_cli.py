"""`huvidpo init-tiny` and `huvidpo generate` from the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from huvidpo.cli import main
from huvidpo.video_io import read_video


def test_init_tiny_writes_a_loadable_diffusers_directory(tmp_path: Path) -> None:
    assert main(["init-tiny", str(tmp_path / "m")]) == 0
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "m" / sub).is_dir()
    weights = list((tmp_path / "m").rglob("*.safetensors"))
    assert len(weights) == 3
    assert not list((tmp_path / "m").rglob("*.bin"))


def test_init_tiny_latent_scale_gives_the_random_vae_unit_variance_latents(tmp_path: Path) -> None:
    import torch

    from demo.loop import LATENT_SCALE
    from huvidpo.data import make_synthetic_dataset
    from huvidpo.models.components import load_components
    from huvidpo.models.tiny import UNIT_VARIANCE_LATENT_SCALE

    assert LATENT_SCALE == UNIT_VARIANCE_LATENT_SCALE  # the demo's recipe trains on what the CLI writes
    stds = {}
    data = make_synthetic_dataset(tmp_path / "d", n_prompts=1, videos_per_prompt=2, num_frames=4, size=64)
    clip = torch.from_numpy(read_video(next((data / "videos").glob("*.mp4")))[0]).float()  # (f, h, w, 3)
    pixels = clip.permute(0, 3, 1, 2) / 127.5 - 1.0
    for name, extra in (("sd", []), ("unit", ["--latent-scale", str(UNIT_VARIANCE_LATENT_SCALE)])):
        assert main(["init-tiny", str(tmp_path / name), *extra]) == 0
        comps = load_components(tmp_path / name)
        with torch.no_grad():
            stds[name] = float((comps.vae.encode(pixels).latent_dist.mean * comps.latent_scale).std())
    assert load_components(tmp_path / "sd").latent_scale == 0.18215
    assert 0.5 < stds["unit"] < 2.0 and stds["sd"] < 0.15  # SD's factor leaves them ~16x too small


def test_generate_writes_an_mp4_from_a_first_frame(tiny_model_dir: Path, tmp_path: Path) -> None:
    img = tmp_path / "frame.png"
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(img)
    out = tmp_path / "v.mp4"
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "a cat", "--first-frame", str(img)]
    args += ["--frames", "3", "--height", "64", "--width", "80", "--steps", "2", "--quiet", "--out", str(out)]
    rc = main(args)
    assert rc == 0
    frames, _ = read_video(out)
    assert frames.shape == (3, 64, 80, 3)


def test_generate_reports_bad_input_without_a_traceback(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "x",
            "--height",
            "63",
            "--out",
            str(tmp_path / "v.gif"),
        ]
    )
    assert rc == 2
    assert "height must be a positive multiple of 8" in capsys.readouterr().err
    rc = main(
        ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "v.gif")]
    )
    assert rc == 2
    assert "model directory not found" in capsys.readouterr().err


def test_generation_options_default_to_the_generation_config_defaults() -> None:
    """`huvidpo generate` and scripts/ab_samples.py share one set of sampling options; with no flags
    they give GenerationConfig()'s defaults, and each flag reaches its field."""
    import argparse
    import dataclasses

    from huvidpo.cli import add_generation_options, generation_config
    from huvidpo.pipeline import GenerationConfig

    p = argparse.ArgumentParser()
    add_generation_options(p)
    p.add_argument("--seed", type=int, default=0)
    assert generation_config(p.parse_args([])) == GenerationConfig()
    flags = "--frames 4 --height 64 --width 72 --steps 3 --guidance 2.5 --eta 0.5 --negative-prompt blur"
    flags += " --shared-noise-ratio 0.1 --no-adain --no-hist-match --seed 9"
    got = generation_config(p.parse_args(flags.split()))
    want = GenerationConfig(
        num_frames=4, height=64, width=72, steps=3, guidance_scale=2.5, eta=0.5, negative_prompt="blur",
        shared_noise_ratio=0.1, latent_adain=False, hist_match=False, seed=9,
    )  # fmt: skip
    assert got == want
    assert dataclasses.replace(got, seed=0) == generation_config(p.parse_args(flags.split()), seed=0)
    q = argparse.ArgumentParser()
    add_generation_options(q, steps=25)
    q.add_argument("--seed", type=int, default=0)
    assert generation_config(q.parse_args([])).steps == 25
