"""The `register` stage against a real MLflow server: selection by validation, safe promotion."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import cli


def variant_copy(trained, root: Path, name: str, val_f1: float) -> None:
    """A copy of the trained model folder that claims a given validation macro-F1."""
    folder = root / name
    shutil.copytree(trained["model"], folder)
    val = json.loads((folder / "val_metrics.json").read_text())
    val["val_macro_f1"] = val_f1
    (folder / "val_metrics.json").write_text(json.dumps(val))


def register_params(trained, root: Path, model_name: str, variants: list[str]) -> Path:
    raw = yaml.safe_load(Path(trained["params"]).read_text())
    raw["register"] |= {"models_dir": str(root), "metrics_dir": str(root / "metrics"),
                        "variants": variants, "model_name": model_name,
                        "out": str(root / "registry.json")}
    path = root / f"params-{'-'.join(variants)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_best_by_validation_is_registered_and_champion_moves_only_on_a_win(trained, tmp_path):
    from mlflow import MlflowClient

    name = f"clf-{uuid.uuid4().hex[:8]}"
    for variant, f1 in {"a": 0.50, "b": 0.60, "c": 0.55, "d": 0.60, "e": 0.70}.items():
        variant_copy(trained, tmp_path, variant, f1)

    def register(*variants: str) -> dict:
        out = cli("register", "--params", str(register_params(trained, tmp_path, name,
                                                                   list(variants))))
        assert "registered" in out.stdout
        return json.loads((tmp_path / "registry.json").read_text())

    first = register("a", "b")  # b wins on validation; first version takes the alias
    assert (first["version"], first["variant"], first["promoted"]) == (1, "b", True)
    assert first["reason"] == "no champion yet"
    worse = register("c")
    assert (worse["version"], worse["promoted"], worse["champion_version"]) == (2, False, 1)
    tie = register("d")
    assert (tie["promoted"], tie["champion_version"]) == (False, 1)
    assert "does not beat version 1's 0.6000" in tie["reason"]
    better = register("e")
    assert (better["version"], better["promoted"], better["champion_version"]) == (4, True, 4)

    client = MlflowClient(trained["uri"])
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "4"
    assert champion.tags["variant"] == "e"
    assert float(champion.tags["val_macro_f1"]) == pytest.approx(0.70)
    for tag in ("git_commit", "data_dvc_md5", "synthetic_dvc_md5", "run_id"):
        assert champion.tags[tag], tag

    shown = cli("registry", "show", "--params",
                str(register_params(trained, tmp_path, name, ["e"]))).stdout
    lines = shown.splitlines()
    assert lines[0] == f"{name}:"
    assert lines[1].split("\t")[:4] == ["version", "aliases", "variant", "val_macro_f1"]
    assert lines[2].split("\t")[:3] == ["4", "champion", "e"]
    assert len(lines) == 2 + 4


def test_register_names_what_is_missing(trained, tmp_path):
    params = register_params(trained, tmp_path, "x", ["nope"])
    out = cli("register", "--params", str(params), check=False)
    assert out.returncode == 1
    assert "variant nope:" in out.stderr and "run `dvc repro train_clip@nope`" in out.stderr
