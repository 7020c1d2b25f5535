"""dvc.yaml as a contract: every stage depends on exactly the code and params it uses.

The code a stage runs is its module's import closure within the package, derived here from
the source (imports inside functions count). A stage that lists less would not rerun when a
module it uses changes; one that lists more reruns for nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from pneumoclip.config import TOP_LEVEL, relocate

PKG = ROOT / "src/pneumoclip"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def package_imports(module: str) -> set[str]:
    tree = ast.parse((PKG / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "pneumoclip" or node.module.startswith("pneumoclip.")):
            if node.module == "pneumoclip":  # from pneumoclip import tracking
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pneumoclip.")}
    return found


def import_closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(package_imports(name))
    return seen


def test_the_closure_follows_imports_inside_functions_too():
    assert "classifier" in package_imports("synthesize")  # imported inside judge()
    assert import_closure("synthesize") >= {"diffusion", "tracking", "config", "fsutil"}
    assert "sd_lora" not in import_closure("synthesize")  # training code is not synthesis's


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_depends_on_exactly_its_import_closure(stage):
    spec = STAGES[stage].get("do", STAGES[stage])
    module = spec["cmd"].split()[1].replace("-", "_")  # pneumoclip train-clip -> train_clip
    code = {Path(d).stem for d in spec["deps"] if d.startswith("src/")}
    assert code == import_closure(module), f"{stage}: dvc.yaml deps vs the module's imports"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_declares_exactly_the_params_it_reads(stage):
    """Its section, and the profile switch: `config.load_section` merges the chosen
    profile's overrides over every section, so each stage reads `profile` and `profiles`."""
    spec = STAGES[stage].get("do", STAGES[stage])
    expected = [stage]
    if stage == "train_clip":  # the shared settings, and its own variant's entry only
        expected = ["train_clip", "variants.${key}"]
    assert spec["params"] == expected + list(TOP_LEVEL)


def test_a_profile_overrides_no_value_that_dvc_yaml_reads_itself():
    """dvc.yaml templates paths (`${sd_lora.base_dir}`) and the variants from the sections'
    own values, not the merged ones: a profile that changed them would desync the DAG."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, overrides in params["profiles"].items():
        assert "variants" not in (overrides or {}), name
        moved = relocate(overrides or {}, "/elsewhere")
        assert moved == (overrides or {}), name  # no path() field is overridden


def test_variant_stages_and_register_follow_the_variants_section():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert STAGES["train_clip"]["foreach"] == STAGES["evaluate"]["foreach"] == "${variants}"
    assert set(params["register"]["variants"]) <= set(params["variants"])
    # folders, not a per-variant list: a new variant needs no edit of dvc.yaml
    assert {"${register.models_dir}", "${register.metrics_dir}"} <= set(
        STAGES["register"]["deps"])
