"""Shared fixtures. Tests never touch the network: every model is tiny and built from configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny model directory (diffusers layout, safetensors), written once per session."""
    from huvidpo.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


# One radosgw (and one moto server) per session, shared by the integration and e2e tests.
from tests.s3_fixtures import make_s3_store, moto_s3_endpoint, s3_endpoint  # noqa: E402, F401
