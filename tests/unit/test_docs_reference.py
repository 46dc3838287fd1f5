"""The reference docs name every setting they document, with its real default: a setting added to
``InferenceSettings`` without a line in services/inference/README.md, or a default changed in code
but not in the table, fails here."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices

from services.common.settings import InferenceSettings

ROOT = Path(__file__).resolve().parents[2]


def _rows(text: str) -> dict[str, str]:
    """Each ``| `VAR` | default | ... |`` table row by variable (a row may name two variables)."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3:
            for var in re.findall(r"`(HUVIDPO_[A-Z0-9_]+)`", cells[0]):
                rows[var] = cells[1]
    return rows


def _env_name(name: str, field: object) -> str:
    alias = getattr(field, "validation_alias", None)
    if isinstance(alias, AliasChoices):
        return str(alias.choices[1])  # (python name, the variable, older names...)
    return "HUVIDPO_INFERENCE_" + name.upper()


def _shown(default: object) -> str:
    if isinstance(default, bool):
        return "`true`" if default else "`false`"
    if default is None or default == [] or default == "":
        return "(unset)" if default is None else "(empty)"
    if isinstance(default, list):
        return "`" + ",".join(map(str, default)) + "`"
    return f"`{default}`"


def test_the_inference_readme_documents_every_setting_with_its_default() -> None:
    rows = _rows((ROOT / "services" / "inference" / "README.md").read_text())
    for name, field in InferenceSettings.model_fields.items():
        var = _env_name(name, field)
        assert var in rows, f"{var} is not in services/inference/README.md's settings table"
        default = field.get_default(call_default_factory=True)
        if isinstance(default, Path):
            default = f"./{default}"
        assert rows[var] == _shown(default), (var, rows[var], _shown(default))


def test_the_manifest_example_in_docs_datasets_is_a_valid_dataset(tmp_path: Path) -> None:
    from huvidpo.data import load_dataset

    text = (ROOT / "docs" / "datasets.md").read_text()
    block = re.search(r"## Records.*?```json\n(.*?)```", text, re.S)
    assert block is not None, "docs/datasets.md lost its manifest example"
    (tmp_path / "manifest.jsonl").write_text(block.group(1))
    (tmp_path / "videos").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "videos" / f"{name}.mp4").write_bytes(b"")
    ds = load_dataset(tmp_path, check_videos=False)
    assert sorted(ds.videos) == ["a", "b", "c"] and len(ds.choices) == 1
    assert [r.score for r in ds.videos["c"].ratings] == [5.0]
