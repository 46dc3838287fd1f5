"""Every training option is described once (huvidpo.training.options) and that one declaration shows
everywhere: ``huvidpo train dpo|stage1 --help``, the OpenAPI schema of a fine-tune's hyperparameters,
the generated docs/hyperparameters.md, and the checks themselves (``validate()``). Unknown option
names get a suggestion on the command line and over REST."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from huvidpo.cli import main
from huvidpo.training.config import ConfigError, DPOConfig, Stage1Config, TrainConfig
from huvidpo.training.options import info, infos, markdown
from huvidpo.training.options import main as options_main
from services.common.records import hyperparameters as hp_mod
from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.problems import PROBLEM_BASE
from tests.doubles import IdleExecutor

ROOT = Path(__file__).resolve().parents[2]
STAGES: dict[str, type[TrainConfig]] = {"dpo": DPOConfig, "stage1": Stage1Config}
TOKEN = "hp-docs-write"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _flat(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------- declarations
@pytest.mark.parametrize("stage", STAGES)
def test_every_option_has_a_one_line_description(stage: str) -> None:
    for name, declared in infos(STAGES[stage]).items():
        assert declared.help and "\n" not in declared.help and len(declared.help) <= 100, name


def _outside(declared: Any) -> list[Any]:
    """Values just outside an option's declared values."""
    out: list[Any] = []
    b = declared.bound
    if b is not None and b.lo is not None:
        out.append(b.lo if b.lo_open else b.lo - 1)
    if b is not None and b.hi is not None:
        out.append(b.hi if b.hi_open else b.hi + 1)
    if declared.multiple_of is not None:
        out.append(b.lo + 1 if b is not None and b.lo is not None else 1)
    if declared.choices is not None:
        out.append("not-a-choice")
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_validate_refuses_every_value_outside_the_declared_bounds(stage: str) -> None:
    """validate() is driven by the declarations: no declared bound goes unchecked."""
    cls = STAGES[stage]
    base = {"model": "m", "dataset": "d", "output_dir": "o"}
    checked = 0
    for name, declared in infos(cls).items():
        for value in _outside(declared):
            cfg = dataclasses.replace(cls(**base), **{name: value})
            with pytest.raises(ConfigError) as err:
                cfg.validate()
            assert err.value.field == name, (name, value, str(err.value))
            checked += 1
        # and the default itself is within them
        assert declared.problem(name, getattr(cls(), name)) is None, name
    assert checked > 40


# ---------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("stage", STAGES)
def test_train_help_shows_each_options_description_and_bounds(
    stage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", stage, "--help"])
    assert exc.value.code == 0
    text = _flat(capsys.readouterr().out)
    for name, declared in infos(STAGES[stage]).items():
        assert _flat(declared.help) in text, name
        if declared.values():
            assert _flat(declared.values()) in text, name
    assert "AdamW learning rate ((0, 1]; default: " in text


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["train", "dpo", "--lerning-rate", "1e-4"], 'did you mean "--lr"?'),
        (["train", "dpo", "--learning-rate=1e-4"], 'did you mean "--lr"?'),
        (["train", "dpo", "--lora-rnak", "4"], 'did you mean "--lora-rank"?'),
        (["train", "stage1", "--max-stpes", "3"], 'did you mean "--max-steps"?'),
        (["train", "stage1", "--beta", "3"], "it is an option of dpo training only"),
    ],
)
def test_an_unknown_flag_is_a_usage_error_naming_the_flag_meant(
    argv: list[str], suggestion: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--model", "m", "--dataset", "d", "--out", "o"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert suggestion in err and f"unknown {argv[1]} training option {argv[2].split('=')[0]!r}" in err, err


def test_a_config_file_key_gets_the_same_suggestion(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("n_epochs: 3\n")
    with pytest.raises(ConfigError, match='did you mean "epochs"') as err:
        DPOConfig.load(f)
    assert err.value.field == "n_epochs"


# ------------------------------------------------------------------------------------ REST/OpenAPI
@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(TOKEN.encode()).hexdigest()], work_dir=tmp_path / "work"
    )
    return TestClient(create_app(settings, LocalStore(tmp_path / "store"), IdleExecutor(), background=False))


def test_openapi_carries_each_hyperparameters_description_and_bounds(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    props = schemas["FineTuneHyperparameters"]["properties"]
    assert schemas["FineTuneHyperparameters"]["additionalProperties"] is False
    names = {n for cls in STAGES.values() for n in infos(cls)} - hp_mod.RESERVED
    assert set(props) == names
    for name, prop in props.items():
        declared = info(DPOConfig if name in infos(DPOConfig) else Stage1Config, name)
        assert prop["description"].startswith(declared.help), name
        schema = prop["anyOf"][0] if "anyOf" in prop else prop  # max_steps also takes null
        b = declared.bound
        if b is not None and b.lo is not None:
            assert schema["exclusiveMinimum" if b.lo_open else "minimum"] == b.lo, name
        if b is not None and b.hi is not None:
            assert schema["exclusiveMaximum" if b.hi_open else "maximum"] == b.hi, name
        if declared.choices is not None:
            assert schema.get("enum", [schema.get("const")]) == list(declared.choices), name
        if declared.multiple_of is not None:
            assert schema["multipleOf"] == declared.multiple_of, name
    assert "(dpo only)" in props["beta"]["description"]
    # the typed models a spec is stored with carry them too
    stored = hp_mod.DPOHyperparameters.model_json_schema()["properties"]
    assert stored["lora_dropout"]["exclusiveMaximum"] == 1 and stored["lora_dropout"]["description"]
    # ... in the schema only: a stored spec stays readable (the trainer refuses it with exit 2)
    assert hp_mod.DPOHyperparameters.model_validate({"height": 30}).as_mapping() == {"height": 30}


def _create(client: TestClient, hyperparameters: dict[str, Any], stage: str = "dpo") -> Any:
    body = {"dataset": "d", "version": "0" * 64, "base_model": "tiny", "stage": stage}
    return client.post("/v1/fine-tunes", json={**body, "hyperparameters": hyperparameters}, headers=AUTH)


@pytest.mark.parametrize(
    ("stage", "sent", "detail"),
    [
        ("dpo", "learning_rate", 'did you mean "lr"?'),
        ("dpo", "lerning_rate", 'did you mean "lr"?'),
        ("dpo", "lora_rnak", 'did you mean "lora_rank"?'),
        ("stage1", "trainable_pattern", 'did you mean "trainable_patterns"?'),
        ("stage1", "beta", "it is an option of dpo training only"),
    ],
)
def test_an_unknown_hyperparameter_is_a_422_naming_it_and_the_option_meant(
    client: TestClient, stage: str, sent: str, detail: str
) -> None:
    r = _create(client, {sent: 1}, stage)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["type"] == PROBLEM_BASE + "validation-error"
    assert body["field"] == f"hyperparameters.{sent}"
    assert detail in body["detail"] and f"unknown {stage} training option {sent!r}" in body["detail"]


def test_a_hyperparameter_outside_a_declared_bound_is_a_422_naming_it(client: TestClient) -> None:
    for sent, field in (({"lora_dropout": 1}, "lora_dropout"), ({"tie_policy": "coin"}, "tie_policy")):
        r = _create(client, sent)
        assert r.status_code == 422 and r.json()["field"] == f"hyperparameters.{field}", r.text


# ------------------------------------------------------------------------------------- the table
def test_the_committed_hyperparameter_table_is_current() -> None:
    committed = ROOT / "docs" / "hyperparameters.md"
    assert committed.read_text() == markdown(), (
        "docs/hyperparameters.md is stale: run python -m huvidpo.training.options --write docs/hyperparameters.md"
    )
    assert options_main(["--check", str(committed)]) == 0


def test_the_table_lists_every_option_with_its_bounds(tmp_path: Path) -> None:
    out = tmp_path / "hp.md"
    assert options_main(["--write", str(out)]) == 0
    text = out.read_text()
    assert options_main(["--check", str(tmp_path / "missing.md")]) == 1
    for cls in STAGES.values():
        for name in infos(cls):
            assert re.search(rf"^\| `{name}` \|", text, re.M), name
    assert "| `lr` | float | `0.0001` | `3e-05` | (0, 1] | yes | AdamW learning rate |" in text
