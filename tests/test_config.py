from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT

from pneumoclip import config
from pneumoclip.cli import main
from pneumoclip.config import (
    SECTIONS,
    ParamsError,
    VariantParams,
    load_section,
    relocate,
    write_relocated,
)

PARAMS = ROOT / "params.yaml"


def write_params(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(PARAMS.read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_shipped_params_load_into_their_types(section):
    params = load_section(section, PARAMS)
    if section == "variants":
        assert params and all(isinstance(v, VariantParams) for v in params.values())
    else:
        assert type(params) is SECTIONS[section]


def test_params_yaml_is_the_only_source_of_values():
    """No dataclass carries a default that could drift from params.yaml."""

    def check(cls):
        for field in dataclasses.fields(cls):
            assert field.default is dataclasses.MISSING, f"{cls.__name__}.{field.name}"
            assert field.default_factory is dataclasses.MISSING, f"{cls.__name__}.{field.name}"

    classes = [c for c in vars(config).values()
               if isinstance(c, type) and dataclasses.is_dataclass(c)]
    assert len(classes) > 10
    for cls in classes:
        check(cls)


def test_relocate_moves_every_path_and_nothing_else(tmp_path):
    raw = yaml.safe_load(PARAMS.read_text())
    moved = relocate(raw, tmp_path)
    assert moved["train_clip"]["index"] == str(tmp_path / raw["train_clip"]["index"])
    assert moved["variants"]["augmented"]["train_data"] == str(tmp_path / "artifacts/synthetic")
    assert moved["sd_lora"]["checkpoint_dir"] == str(tmp_path / ".checkpoints/sd_lora")
    assert moved["train_clip"]["prompts"] == raw["train_clip"]["prompts"]
    assert moved["serve"] == raw["serve"]
    path = write_relocated(tmp_path, PARAMS, sd_lora={"domain": {"vae_steps": 3}},
                           synthesize={"contrast": {"NORMAL": {"BACTERIA": 1.0}}})
    assert load_section("sd_lora", path).domain.vae_steps == 3
    assert load_section("sd_lora", path).domain.unet_steps == raw["sd_lora"]["domain"][
        "unet_steps"]  # a nested section merges
    assert load_section("synthesize", path).contrast == {"NORMAL": {"BACTERIA": 1.0}}  # a value


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
        (lambda r: r["prepare"].pop("seed"), "missing key prepare.seed"),
        (lambda r: r["base_models"]["tiny_sd"].pop("heads"),
         "missing key base_models.tiny_sd.heads"),
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


def test_params_read_as_dvc_writes_them_after_exp_run_set(tmp_path):
    """`dvc exp run -S` dumps YAML 1.2: `no` unquoted is still the string 'no'."""
    text = PARAMS.read_text().replace('mixed_precision: "no"', "mixed_precision: no")
    assert "mixed_precision: no" in text
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_section("train_clip", path).mixed_precision == "no"


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    path = write_params(tmp_path, lambda r: r["prepare"].update(val_fraction=1))
    assert load_section("prepare", path).val_fraction == 1.0


def test_help_lists_the_stages():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in stages:
        assert name.replace("_", "-") in result.output
