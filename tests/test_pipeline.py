"""The real `dvc` CLI on a copy of the project: fresh-clone repro, no-op rerun, params reruns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

PROJECT_FILES = ["dvc.yaml", "dvc.lock", "params.yaml", "data.dvc", ".dvcignore", "src", "sample"]


def run(*args: str, cwd: Path) -> str:
    # the project's own SQLite store, as in the README (and apart from the session server)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db")
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh clone in miniature: the project's files, a new git repo, no data, no cache."""
    dest = tmp_path_factory.mktemp("clone")
    for rel in PROJECT_FILES:
        src = ROOT / rel
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dest / rel)
    (dest / ".dvc").mkdir()
    shutil.copyfile(ROOT / ".dvc/config", dest / ".dvc/config")
    # the default steps and epochs are sized for the full data set; a few suffice here
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    raw["train_clip"] |= {"epochs": 3}
    raw["evaluate"] |= {"bootstrap": 100}
    raw["sd_lora"] |= {"steps": 20, "batch_size": 16, "sample_every": 10}
    raw["sd_lora"]["domain"] |= {"vae_steps": 20, "unet_steps": 30}
    raw["synthesize"] |= {"probe_per_class": 8}
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run("git", "init", "-q", cwd=dest)
    run("pneumoclip", "sample", "data", cwd=dest)
    run("dvc", "add", "data", cwd=dest)  # as the README does: caches it, data.dvc unchanged
    return dest


def stages_run(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}


def test_bundled_sample_is_exactly_what_data_dvc_tracks(project):
    assert (project / "data.dvc").read_text() == (ROOT / "data.dvc").read_text()
    assert "up to date" in run("dvc", "status", "data.dvc", cwd=project)


def all_stages(project: Path) -> set[str]:
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    variants = yaml.safe_load((project / "params.yaml").read_text())["train_clip"]["variants"]
    return {f"{name}@{v}" if "foreach" in stage else name
            for name, stage in stages.items() for v in variants}


def lock_entry(lock_text: str, stage: str) -> dict:
    return yaml.safe_load(lock_text)["stages"][stage]


def test_repro_builds_everything_then_does_nothing(project):
    log = run("dvc", "repro", cwd=project)
    assert stages_run(log) == all_stages(project)
    assert (project / "artifacts/prepared/index.csv").is_file()
    assert (project / "models/base/clip/model.safetensors").is_file()
    assert (project / "models/base/sd/unet/diffusion_pytorch_model.safetensors").is_file()
    for cls in ("NORMAL", "BACTERIA", "VIRUS"):  # one LoRA per class
        assert (project / f"models/sd-lora/lora_{cls}.safetensors").is_file()
    assert (project / "artifacts/synthetic/manifest.csv").is_file()
    assert (project / "metrics/synthetic.json").is_file()
    for variant in ("real", "control", "augmented"):
        assert (project / f"models/clip-lora/{variant}/adapter_model.safetensors").is_file()
        assert (project / f"metrics/{variant}/confusion.png").is_file()
    synthetic = json.loads((project / "models/clip-lora/augmented/pneumoclip.json").read_text())
    assert synthetic["synthetic"]["dvc_md5"] == lock_entry(
        (project / "dvc.lock").read_text(), "synthesize")["outs"][0]["md5"]
    assert "up to date" in run("dvc", "status", cwd=project)
    # the committed dvc.lock is what a fresh machine rebuilds for the deterministic stages
    for stage in ("base_models", "prepare"):
        assert lock_entry((project / "dvc.lock").read_text(), stage) == lock_entry(
            (ROOT / "dvc.lock").read_text(), stage
        ), stage
    assert stages_run(run("dvc", "repro", cwd=project)) == set()
    shown = run("dvc", "metrics", "show", cwd=project)
    for name in ("real", "control", "augmented", "synthetic"):
        assert f"metrics/{name}.json" in shown
    assert "test.macro_f1" in shown
    # the default SQLite registry: the champion is listed against its version
    registry = run("pneumoclip", "registry", "show", cwd=project).splitlines()
    assert registry[2].split("\t")[:2] == ["1", "champion"]


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("evaluate", "bootstrap", 50, {"evaluate@real", "evaluate@control",
                                       "evaluate@augmented", "register"}),
        ("synthesize", "guidance", 2.0, {"synthesize", "train_clip@augmented",
                                         "evaluate@augmented", "register"}),
        ("train_clip", "epochs", 2, {"train_clip@real", "train_clip@control", "synthesize",
                                     "train_clip@augmented", "evaluate@real",
                                     "evaluate@control", "evaluate@augmented", "register"}),
    ],
)
def test_changing_a_param_reruns_exactly_the_stages_that_read_it(
    project, section, key, value, expected
):
    # no restore afterwards (that would cost a second rebuild): each case starts from
    # whatever state the last one left, brought up to date first
    run("dvc", "repro", cwd=project)
    params_path = project / "params.yaml"
    raw = yaml.safe_load(params_path.read_text())
    assert raw[section][key] != value
    raw[section][key] = value
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert stages_run(run("dvc", "repro", cwd=project)) == expected
