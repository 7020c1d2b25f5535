"""train_clip's crash safety: a killed run resumes after its last finished epoch and ends
where an unbroken one does, SIGTERM ends its MLflow run as KILLED, and a corrupt checkpoint
is set aside. Each test trains on the session's base and prepared sample, next to `trained`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import EPOCHS, ROOT, cli, project_params

from pneumoclip.config import load_section
from pneumoclip.fsutil import load_state
from pneumoclip.train_clip import STATE_FILE, checkpoint_dir

METRICS = ("train_loss", "val_accuracy", "val_macro_f1")


def resume_params(root: Path, trained: dict, epochs: int = EPOCHS) -> Path:
    """params.yaml under `root` that trains `real` exactly as `trained` did (same base,
    index and settings), with its own output and checkpoint folders."""
    base = trained["root"] / "models/base/clip"
    index = trained["root"] / "artifacts/prepared/index.csv"
    return project_params(
        root,
        train_clip={"epochs": epochs, "patience": 10, "base_dir": str(base),
                    "index": str(index)},
        variants={"real": {"balance": False, "train_data": str(index)}},
    )


def train_cmd(params: Path) -> list[str]:
    return ["pneumoclip", "train-clip", "--params", str(params), "--variant", "real"]


def start_until_checkpoint(params: Path, ckpt_root: Path, log: Path):
    """Start a train_clip run; return it and its first checkpoint as soon as one is saved."""
    with open(log, "w") as out:
        proc = subprocess.Popen(train_cmd(params), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        for path in ckpt_root.glob(f"*/{STATE_FILE}"):
            try:
                return proc, torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # caught mid-rename; look again
                pass
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    pytest.fail(f"no checkpoint appeared (exit {proc.returncode}): {log.read_text()[-3000:]}")


def runs_for(client, out_dir: Path) -> list:
    """The MLflow runs whose params name `out_dir` (each test has its own)."""
    experiment = client.get_experiment_by_name("pneumoclip-classifier")
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"params.out_dir = '{out_dir}'")


def test_a_killed_run_resumes_after_its_last_epoch_and_ends_where_an_unbroken_one_does(
    trained, tmp_path
):
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    params = resume_params(tmp_path, trained)
    cfg = load_section("train_clip", params)
    out = Path(cfg.out_dir) / "real"
    proc, state = start_until_checkpoint(params, Path(cfg.checkpoint_dir), tmp_path / "log")
    assert state["epoch"] < EPOCHS
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing half-written

    rerun = cli(*train_cmd(params)[1:])
    resumed_after = re.search(r"real: resuming after epoch (\d+) \(", rerun.stdout)
    assert resumed_after and 1 <= int(resumed_after[1]) < EPOCHS, rerun.stdout
    assert not any(Path(cfg.checkpoint_dir).iterdir())  # cleared after success

    # the same weights and the same epochs as the unbroken `trained` run
    resumed = load_file(out / "adapter_model.safetensors")
    unbroken = load_file(trained["model"] / "adapter_model.safetensors")
    assert resumed.keys() == unbroken.keys()
    for key, value in unbroken.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)
    history = json.loads((out / "val_metrics.json").read_text())["history"]
    expected = json.loads((trained["model"] / "val_metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    for got, want in zip(history, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-5)

    # one MLflow run, continued rather than duplicated, each epoch logged once
    client = MlflowClient()
    (run,) = runs_for(client, Path(cfg.out_dir))
    assert run.info.run_id == state["run_id"]
    assert run.info.status == "FINISHED"
    for metric in METRICS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert steps == list(range(1, EPOCHS + 1)), metric


def test_sigterm_ends_the_mlflow_run_as_killed_and_writes_no_output(trained, tmp_path):
    from mlflow import MlflowClient

    params = resume_params(tmp_path, trained)
    cfg = load_section("train_clip", params)
    proc, state = start_until_checkpoint(params, Path(cfg.checkpoint_dir), tmp_path / "log")
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(120) != 0
    assert MlflowClient().get_run(state["run_id"]).info.status == "KILLED"
    assert not (Path(cfg.out_dir) / "real").exists()
    assert not list(Path(cfg.out_dir).glob("real*"))  # nor a scratch folder
    assert list(Path(cfg.checkpoint_dir).glob(f"*/{STATE_FILE}"))  # kept to resume from


def test_a_corrupt_checkpoint_is_set_aside_and_the_run_starts_over(trained, tmp_path):
    params = resume_params(tmp_path, trained, epochs=1)
    cfg = load_section("train_clip", params)
    ckpt = checkpoint_dir(cfg, "real", load_section("variants", params)["real"])
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_bytes(b"half a checkpoint")
    out = cli(*train_cmd(params)[1:])
    assert (f"real: checkpoint {ckpt / STATE_FILE} is unreadable (" in out.stdout
            and "moved to state.corrupt, starting over" in out.stdout), out.stdout
    assert "resuming" not in out.stdout
    history = json.loads((Path(cfg.out_dir) / "real/val_metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1]
    assert not ckpt.exists()


def test_a_checkpoint_of_another_shape_is_set_aside_with_its_bytes(tmp_path):
    path = tmp_path / STATE_FILE
    torch.save({"epoch": 3}, path)
    before = path.read_bytes()

    def make(saved: dict) -> dict:
        return {"epoch": saved["epoch"], "run_id": saved["run_id"]}  # KeyError: not ours

    assert load_state(path, "real", make) is None
    assert not path.exists()
    assert path.with_suffix(".corrupt").read_bytes() == before
