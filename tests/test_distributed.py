"""Training and synthesis on 2 processes (torchrun: accelerate's MULTI_CPU over gloo, the code
path of N GPUs) against 1 process at the same global batch.

What a multi-GPU user relies on: the ranks end with the same weights (DDP averaged the
gradients), each rank trains on other images, one MLflow run and one output, and the result
equals a single-process run at the same global batch (within float summation order: the
ranks sum their halves apart).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, project_params, sharing_project
from PIL import Image

pytestmark = pytest.mark.slow

ONE = [sys.executable, "-m", "pneumoclip.cli"]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
       "-m", "pneumoclip.cli"]
TOLERANCE = 1e-3  # largest weight difference allowed between 1 and 2 processes


def stage(launcher: list[str], params: Path, *args: str, db: Path) -> str:
    """Run a stage command; its output (both ranks' for torchrun)."""
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, *args, "--params", str(params)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def runs_in(db: Path, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def with_sections(params: Path, **sections) -> Path:
    data = yaml.safe_load(params.read_text())
    for name, values in sections.items():
        data[name] |= values
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    return params


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Path:
    """Tiny bases and the prepared sample, shared by every run here."""
    root = tmp_path_factory.mktemp("dist")
    params = project_params(root)
    stage(ONE, params, "base-models", db=root / "base.db")
    stage(ONE, params, "prepare", db=root / "base.db")
    return root


def adapter_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out |= {f"{file.name}:{k}": v for k, v in load_file(file).items()}
    return out


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def test_train_clip_on_two_processes_is_one_process_at_the_same_global_batch(bases):
    """At the default batch, which does not divide the sample's 226 training images: the
    ranks' halves of each global batch, and the partial batch dropped on both."""
    common = {"epochs": 3, "patience": 5}
    one = sharing_project(bases, "clip1", train_clip=common | {"batch_size": 32})
    two = sharing_project(bases, "clip2", train_clip=common | {"batch_size": 16})
    stage(ONE, one, "train-clip", "--variant", "real", db=bases / "clip1.db")
    log = stage(TWO, two, "train-clip", "--variant", "real", db=bases / "clip2.db")

    assert "real: weights identical on 2 processes" in log  # gradients were averaged
    assert log.count("real: saved ") == 1  # the main process alone writes
    (run,) = runs_in(bases / "clip2.db", "pneumoclip-classifier")  # exactly one run
    assert run.data.params["processes"] == "2"
    out_one, out_two = (p.parent / "models/clip-lora/real" for p in (one, two))
    assert largest_difference(adapter_weights(out_one), adapter_weights(out_two)) < TOLERANCE
    history = [yaml.safe_load((o / "val_metrics.json").read_text())["history"]
               for o in (out_one, out_two)]
    for key in ("train_loss", "val_macro_f1"):  # epoch by epoch
        assert [h[key] for h in history[0]] == pytest.approx(
            [h[key] for h in history[1]], abs=1e-4), key


SD = {"epochs": 0.07, "batch_size": 8, "per_class": False, "checkpoint_every": 100,
      "sample_every": 0, "sample_per_class": 1, "sample_steps": 2}  # 2 steps on the sample


def test_sd_lora_on_two_processes_is_one_process_at_the_same_global_batch(bases):
    one = sharing_project(bases, "sd1", sd_lora=SD)
    two = sharing_project(bases, "sd2", sd_lora=SD | {"batch_size": SD["batch_size"] // 2})
    stage(ONE, one, "sd-lora", db=bases / "sd1.db")
    log = stage(TWO, two, "sd-lora", db=bases / "sd2.db")

    assert "sd_lora: weights identical on 2 processes" in log
    (run,) = runs_in(bases / "sd2.db", "pneumoclip-sd")
    assert run.data.params["processes"] == "2"
    out_one, out_two = (p.parent / "models/sd-lora" for p in (one, two))
    assert largest_difference(adapter_weights(out_one), adapter_weights(out_two)) < TOLERANCE


def test_synthesize_on_two_processes_writes_the_images_of_one(bases):
    """One LoRA and judge for both (trained once here); the plan's batches dealt to 2 ranks."""
    sd = sharing_project(bases, "syn1", sd_lora=SD)
    stage(ONE, sd, "sd-lora", db=bases / "syn.db")
    with_sections(sd, train_clip={"epochs": 1})
    stage(ONE, sd, "train-clip", "--variant", "real", db=bases / "syn.db")
    made = sd.parent
    plan = {"counts": {"NORMAL": 3, "VIRUS": 3}, "probe_per_class": 1, "steps": 2,
            "batch_size": 2, "base_dir": str(bases / "models/base/sd"),
            "lora_dir": str(made / "models/sd-lora"),
            "classifier_dir": str(made / "models/clip-lora/real")}
    one = with_sections(sharing_project(bases, "syn1b"), synthesize=plan)
    two = with_sections(sharing_project(bases, "syn2"), synthesize=plan)
    stage(ONE, one, "synthesize", db=bases / "syn.db")
    log = stage(TWO, two, "synthesize", db=bases / "syn.db")

    files = sorted(p.relative_to(one.parent / "artifacts/synthetic")
                   for p in (one.parent / "artifacts/synthetic").rglob("*.png"))
    assert len([f for f in files if f.name != "grid.png"]) == 6
    same = 0
    for f in files:  # each image from the same batch, so the same image to within float order
        a, b = (np.asarray(Image.open(p.parent / "artifacts/synthetic" / f), dtype=np.int16)
                for p in (one, two))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, f
        assert (a != b).mean() <= 0.001, f  # a stray pixel one level off, not another image
        same += (a == b).all()
    assert same >= len(files) - 2  # most are byte for byte the same
    assert log.count("NORMAL: 3 drawn") == 1  # the main process alone reports and writes


PROBE = """
import dataclasses
import torch
from accelerate.utils import gather_object
from pneumoclip import distributed
from pneumoclip.config import load_section
from pneumoclip.train_clip import loader

params = load_section("train_clip", "params.yaml")
acc = distributed.accelerator("no")
ids = torch.arange(40)


def batches(size, prepare):
    rows = loader(ids, ids % 3, dataclasses.replace(params, batch_size=size), False,
                  torch.Generator().manual_seed(0))
    return [b[0].tolist() for b in prepare(rows)]


every = gather_object([batches(5, acc.prepare)])
if acc.is_main_process:
    plain = batches(10, lambda rows: rows)
    for step, (a, b) in enumerate(zip(every[0], every[1])):
        assert not set(a) & set(b), (step, a, b)
        assert a + b == plain[step], (step, a, b, plain[step])
    print("PROBE OK", len(every[0]), "steps")
"""


def test_each_rank_draws_its_own_half_of_the_global_batch():
    """The prepared loader: per step, the two ranks' batches are disjoint and together are
    the one-process batch of twice the size."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*TWO[:-2], "--no-python", sys.executable, "-c", PROBE], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert "PROBE OK 4 steps" in proc.stdout, proc.stdout + proc.stderr[-3000:]
