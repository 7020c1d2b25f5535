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


def test_two_registers_at_once_end_with_the_better_version(trained, tmp_path):
    """Three races of two `pneumoclip register` processes on fresh models: the better version
    is champion after each (the worse one starts a little later, so it would set last)."""
    import subprocess
    import time

    from mlflow import MlflowClient

    names = [f"race-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    procs = []
    for name in names:
        for variant, f1 in {"good": 0.80, "worse": 0.70}.items():
            root = tmp_path / name / variant  # its own params and registry.json
            variant_copy(trained, root, variant, f1)
            params = register_params(trained, root, name, [variant])
            procs.append(subprocess.Popen(["pneumoclip", "register", "--params", str(params)],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            time.sleep(0.3)
    for proc in procs:
        assert proc.wait(120) == 0, proc.stdout.read()
    client = MlflowClient(trained["uri"])
    for name in names:
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.tags["variant"] == "good", name


def test_nan_never_wins_and_never_blocks(trained, tmp_path):
    from mlflow import MlflowClient

    name = f"nan-{uuid.uuid4().hex[:8]}"
    variant_copy(trained, tmp_path, "broken", float("nan"))
    variant_copy(trained, tmp_path, "fine", 0.40)
    variant_copy(trained, tmp_path, "next", 0.30)
    out = cli("register", "--params",
              str(register_params(trained, tmp_path, name, ["broken"])), check=False)
    assert out.returncode == 1 and "no variant has a finite val_macro_f1" in out.stderr
    cli("register", "--params", str(register_params(trained, tmp_path, name, ["broken", "fine"])))
    first = json.loads((tmp_path / "registry.json").read_text())
    assert (first["variant"], first["promoted"]) == ("fine", True)
    # a champion whose stored score reads NaN (hand-edited, or from an old bug) must not block
    client = MlflowClient(trained["uri"])
    client.set_model_version_tag(name, str(first["version"]), "val_macro_f1", "nan")
    cli("register", "--params", str(register_params(trained, tmp_path, name, ["next"])))
    second = json.loads((tmp_path / "registry.json").read_text())
    assert (second["variant"], second["promoted"]) == ("next", True)
    assert "has no finite val_macro_f1" in second["reason"]


def test_a_champion_validated_on_other_data_is_replaced_and_the_rule_is_written(
        trained, tmp_path):
    from mlflow import MlflowClient

    name = f"data-{uuid.uuid4().hex[:8]}"
    variant_copy(trained, tmp_path, "old", 0.90)
    variant_copy(trained, tmp_path, "new", 0.50)
    cli("register", "--params", str(register_params(trained, tmp_path, name, ["old"])))
    old = json.loads((tmp_path / "registry.json").read_text())
    client = MlflowClient(trained["uri"])
    client.set_model_version_tag(name, str(old["version"]), "data_dvc_md5", "other-data.dir")
    out = cli("register", "--params", str(register_params(trained, tmp_path, name, ["new"])))
    new = json.loads((tmp_path / "registry.json").read_text())
    assert (new["promoted"], new["champion_version"]) == (True, new["version"])
    assert "was validated on other data (other-data.dir" in new["reason"]
    assert new["reason"] in out.stdout  # and in the log
    assert new["data_dvc_md5"] == client.get_model_version(name, new["version"]).tags[
        "data_dvc_md5"]
