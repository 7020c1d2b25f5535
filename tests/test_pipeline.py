"""The real `dvc` CLI on a copy of the project: fresh-clone repro, no-op rerun, what a change
invalidates, one real rerun, the runs as the MLflow server shows them, a queued `dvc exp`
grid that MLflow sees too, and a round trip through a DVC remote."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import BIN, ROOT, SERVER_ENV, copy_project, free_port, stop, wait_http

PROJECT_FILES = ["dvc.yaml", "dvc.lock", "params.yaml", "data.dvc", ".dvcignore", ".gitignore",
                 "src", "sample", "bases"]


GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t"}


def run(*args: str, cwd: Path) -> str:
    # the project's own SQLite store, as in the README (and apart from the session server)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db", **GIT)
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh clone in miniature: the project's files, a new git repo, no data, no cache."""
    dest = tmp_path_factory.mktemp("clone")
    copy_project(dest, PROJECT_FILES)
    # the default steps and epochs are sized for the full data set; a few suffice here
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    raw["train_clip"] |= {"epochs": 3}
    raw["evaluate"] |= {"bootstrap": 100}
    raw["train_clip"]["lora"] |= {"r": 8, "alpha": 8}
    raw["sd_lora"] |= {"epochs": 2, "batch_size": 16, "sample_every": 10}
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
    variants = yaml.safe_load((project / "params.yaml").read_text())["variants"]
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
        assert (project / f"metrics/{variant}/test.png").is_file()
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
    for name in ("real", "control", "augmented"):
        assert f"metrics/{name}.json" in shown
    assert "macro_f1" in shown and "recall_VIRUS" in shown and "synthetic" not in shown
    # one row per variant, a few columns: it fits a terminal
    assert len(shown.splitlines()[0].split()) <= 9 and max(map(len, shown.splitlines())) <= 140
    plots = run("dvc", "plots", "show", "--json", cwd=project)
    for name in ("roc/VIRUS.csv", "reliability.csv", "training.csv", "confusion.csv"):
        assert f"metrics/real/{name}" in plots, name
    # the default SQLite registry: the champion is listed against its version
    registry = run("pneumoclip", "registry", "show", cwd=project).splitlines()
    assert registry[2].split("\t")[:2] == ["1", "champion"]


def status(project: Path) -> set[str]:
    """The stages `dvc status` says changed (their own deps or params, not downstream)."""
    return set(json.loads(run("dvc", "status", "--json", cwd=project).splitlines()[-1]))


@pytest.mark.parametrize(
    ("path", "edit", "expected"),
    [
        ("src/pneumoclip/diffusion.py", lambda t: t + "\n# edited\n", {"sd_lora", "synthesize"}),
        ("src/pneumoclip/classifier.py", lambda t: t + "\n# edited\n",
         {"sd_lora", "synthesize", "register", "train_clip@real", "train_clip@control",
          "train_clip@augmented", "evaluate@real", "evaluate@control", "evaluate@augmented"}),
        ("params.yaml", lambda t: yaml.safe_dump(
            yaml.safe_load(t) | {"variants": yaml.safe_load(t)["variants"] | {
                "control": {"balance": False, "train_data": "artifacts/prepared/index.csv"}}},
            sort_keys=False), {"train_clip@control"}),
    ],
)
def test_an_edit_invalidates_exactly_the_stages_that_use_it(project, path, edit, expected):
    run("dvc", "repro", cwd=project)  # up to date first (a no-op after the test above)
    file = project / path
    original = file.read_text()
    edited = edit(original)
    assert edited != original
    file.write_text(edited)
    try:
        assert status(project) == expected
    finally:
        file.write_text(original)
    assert status(project) == set()


def test_a_param_change_reruns_only_the_stages_that_read_it(project):
    """One real rerun; the cases above prove the invalidation sets without rerunning."""
    run("dvc", "repro", cwd=project)
    params_path = project / "params.yaml"
    original = params_path.read_text()
    raw = yaml.safe_load(original)
    raw["register"]["alias"] = "best"
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        assert stages_run(run("dvc", "repro", cwd=project)) == {"register"}
        assert json.loads((project / "artifacts/registry.json").read_text())["alias"] == "best"
    finally:
        params_path.write_text(original)
        run("dvc", "repro", cwd=project)


def test_the_tracking_server_lines_the_variants_up_for_comparison(project):
    """`mlflow server` on the main command's SQLite store, read over its REST API as the UI
    reads it: one run per variant, the same metric columns, the data each one used."""
    run("dvc", "repro", cwd=project)
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{project}/mlflow.db",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=project, env=SERVER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, proc)
        experiment = requests.get(f"{api}/experiments/get-by-name", timeout=30, params={
            "experiment_name": "pneumoclip-classifier"}).json()["experiment"]
        answer = requests.post(f"{api}/runs/search", timeout=30, json={
            "experiment_ids": [experiment["experiment_id"]], "max_results": 100})
        assert answer.status_code == 200, answer.text
        runs = answer.json()["runs"]
    finally:
        stop(proc)
    # the UI opens a model-training experiment on its runs table
    tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    variants = [{t["key"]: t["value"] for t in r["data"]["tags"]}["variant"] for r in runs]
    assert sorted(variants) == ["augmented", "control", "real"]  # one row per variant
    columns = {"test_accuracy", "test_macro_f1", "best_val_macro_f1", "test_recall_NORMAL",
               "test_recall_BACTERIA", "test_recall_VIRUS"}
    data_md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    synthetic_md5 = lock_entry((project / "dvc.lock").read_text(), "synthesize")["outs"][0]["md5"]
    for variant, r in zip(variants, runs, strict=True):
        assert columns <= {m["key"] for m in r["data"]["metrics"]}, variant
        inputs = {(d["dataset"]["name"], d["tags"][0]["value"]): d["dataset"]["digest"]
                  for d in r["inputs"]["dataset_inputs"]}
        expected = {("kermany-train", "training"), ("kermany-val", "validation"),
                    ("kermany-test", "testing")}
        if variant == "augmented":
            expected.add(("synthetic", "training"))
            assert inputs[("synthetic", "training")] == synthetic_md5.removesuffix(".dir")
        assert set(inputs) == expected, variant
        assert inputs[("kermany-train", "training")] == data_md5.removesuffix(".dir")


def test_a_queued_exp_grid_is_compared_by_dvc_and_by_mlflow(project):
    """The grid docs/pipeline.md shows, narrowed to one variant's stages to keep it short."""
    from mlflow import MlflowClient

    run("dvc", "repro", cwd=project)
    run("git", "add", "-A", cwd=project)
    run("git", "commit", "-qm", "baseline", "--allow-empty", cwd=project)
    run("dvc", "exp", "run", "--queue", "-S", "train_clip.lora.r=4,16", "evaluate@control",
        cwd=project)
    run("dvc", "queue", "start", "-j", "1", cwd=project)
    deadline = time.monotonic() + 600
    busy = {"Queued", "Running"}
    while busy & set((queue := run("dvc", "queue", "status", cwd=project)).split()):
        assert time.monotonic() < deadline, queue
        time.sleep(3)
    assert "Failed" not in queue, queue
    table = run("dvc", "exp", "show", "--csv", cwd=project)
    rows = list(csv.DictReader(io.StringIO(table)))
    exps = {r["Experiment"]: r for r in rows if r["Experiment"]}
    assert len(exps) == 2, table
    assert {r["train_clip.lora.r"] for r in exps.values()} == {"4", "16"}
    assert all(r["metrics/control.json:macro_f1"] for r in exps.values())
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("pneumoclip-classifier")
    runs = client.search_runs([experiment.experiment_id], "tags.dvc_exp != ''")
    assert {r.data.tags["dvc_exp"] for r in runs} == set(exps)
    assert {r.data.tags["variant"] for r in runs} == {"control"}


def test_a_remote_gives_a_fresh_clone_every_result_without_retraining(project, tmp_path):
    """`dvc push` to a local-directory remote (a real DVC remote type, as S3 or GCS would
    be), then a fresh `git clone` and `dvc pull`: everything is there and nothing reruns."""
    run("dvc", "repro", cwd=project)
    run("dvc", "remote", "add", "-d", "team", str(tmp_path / "remote"), cwd=project)
    run("dvc", "push", cwd=project)
    assert "in sync" in run("dvc", "status", "--cloud", cwd=project)
    run("git", "add", "-A", cwd=project)  # what goes in git: code, params, dvc.lock, metrics
    run("git", "commit", "-qm", "results", "--allow-empty", cwd=project)
    tracked = run("git", "ls-files", cwd=project).split()
    assert "dvc.lock" in tracked and "metrics/real.json" in tracked
    assert ".dvc/config" in tracked  # the remote, for every clone
    assert not [f for f in tracked if f.startswith(("data/", "models/", "artifacts/",
                                                    ".dvc/cache", "mlflow"))]
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    run("dvc", "pull", cwd=clone)
    assert "up to date" in run("dvc", "status", cwd=clone)
    assert stages_run(run("dvc", "repro", cwd=clone)) == set()
    for rel in ("data/chest_xray", "models/base/sd/unet/diffusion_pytorch_model.safetensors",
                "models/sd-lora/lora_VIRUS.safetensors", "artifacts/synthetic/manifest.csv",
                "models/clip-lora/augmented/adapter_model.safetensors",
                "artifacts/prepared/index.csv"):
        assert (clone / rel).exists(), rel
    assert (clone / "models/clip-lora/real/adapter_model.safetensors").read_bytes() == (
        project / "models/clip-lora/real/adapter_model.safetensors").read_bytes()
