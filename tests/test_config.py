from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT

from pneumoclip.cli import main
from pneumoclip.config import SECTIONS, ParamsError, load_section

PARAMS = ROOT / "params.yaml"


def write_params(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(PARAMS.read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_shipped_params_load_into_their_dataclasses(section):
    params = load_section(section, PARAMS)
    assert dataclasses.is_dataclass(params)
    assert type(params) is SECTIONS[section]


def test_shipped_params_name_every_field_so_nothing_hides_in_code_defaults():
    raw = yaml.safe_load(PARAMS.read_text())

    def missing(instance, data, where):
        for field in dataclasses.fields(instance):
            assert field.name in data, f"{where}.{field.name} is not in params.yaml"
            value = getattr(instance, field.name)
            if dataclasses.is_dataclass(value):
                missing(value, data[field.name], f"{where}.{field.name}")

    for name, cls in SECTIONS.items():
        missing(cls(), raw[name], name)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["prepare"].update(val_fracton=0.2), "unknown key prepare.val_fracton"),
        (lambda r: r["prepare"].update(seed="zero"), "prepare.seed must be int, got str 'zero'"),
        (lambda r: r["prepare"].update(seed=True), "prepare.seed must be int, got bool True"),
        (
            lambda r: r["base_models"]["tiny_clip"].update(heads=2.5),
            "base_models.tiny_clip.heads must be int, got float 2.5",
        ),
        (
            lambda r: r["prepare"].update(extensions=".jpeg"),
            "prepare.extensions must be a list, got str '.jpeg'",
        ),
        (lambda r: r.update(prepar={}), "unknown section 'prepar'"),
    ],
)
def test_bad_params_fail_naming_the_key(tmp_path, edit, message):
    path = write_params(tmp_path, edit)
    section = "base_models" if "base_models" in message else "prepare"
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_section(section, path)
    result = CliRunner().invoke(main, [section.replace("_", "-"), "--params", str(path)])
    assert result.exit_code == 1
    assert message in result.output


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    path = write_params(tmp_path, lambda r: r["prepare"].update(val_fraction=1))
    assert load_section("prepare", path).val_fraction == 1.0


def test_each_dvc_stage_declares_exactly_its_own_params_section():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # foreach stages: one per variant
        section = name
        assert stage["params"] == [section], name
        assert stage["cmd"].split()[1] == section.replace("_", "-"), name


def test_help_lists_the_stages():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in stages:
        assert name.replace("_", "-") in result.output


def test_register_sees_every_variant_that_dvc_trains():
    params = yaml.safe_load(PARAMS.read_text())
    variants = list(params["train_clip"]["variants"])
    assert params["register"]["variants"] == variants
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["register"]["deps"]
    for variant in variants:
        assert f"${{register.models_dir}}/{variant}" in deps, variant
        assert f"${{register.metrics_dir}}/{variant}.json" in deps, variant


def test_bentofile_pins_match_the_constraints():
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    pins = {k.lower(): v for k, v in pins.items()}
    packages = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["packages"]
    for package in packages:
        name, version = package.split("==")
        assert pins[name.lower()] == version, package
