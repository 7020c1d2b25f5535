"""CLIP LoRA training, evaluation, the MLflow pyfunc model and `pneumoclip predict`,
against a real MLflow server and the bundled sample."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EPOCHS, ROOT, SAMPLE, cli
from PIL import Image

from pneumoclip.classifier import ClipClassifier, read_image, to_rgb
from pneumoclip.config import AugmentParams, load_section
from pneumoclip.evaluate import bootstrap_ci, expected_calibration_error
from pneumoclip.prepare import read_index
from pneumoclip.train_clip import augment, loader


def test_model_folder_has_adapter_processor_prompts_and_val_metrics(trained):
    model = trained["model"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "processor_config.json",
                 "tokenizer.json", "pneumoclip.json", "val_metrics.json", "mlflow_run.json"):
        assert (model / name).is_file(), name
    assert not list(model.glob("*.bin"))
    meta = json.loads((model / "pneumoclip.json").read_text())
    prompts = load_section("train_clip", ROOT / "params.yaml").prompts
    assert meta["prompts"] == prompts
    assert meta["label_map"] == {"NORMAL": 0, "BACTERIA": 1, "VIRUS": 2}
    val = json.loads((model / "val_metrics.json").read_text())
    assert [h["epoch"] for h in val["history"]] == list(range(1, EPOCHS + 1))
    assert val["val_macro_f1"] == max(h["val_macro_f1"] for h in val["history"])
    assert val["val_macro_f1"] == val["history"][val["best_epoch"] - 1]["val_macro_f1"]


def test_lora_touches_only_the_vision_tower(trained):
    from safetensors.torch import load_file

    keys = list(load_file(trained["model"] / "adapter_model.safetensors"))
    lora = [k for k in keys if "lora_" in k]
    assert lora, keys[:5]
    assert all("vision_model" in k for k in lora)
    # modules_to_save names match by suffix, so the norms and position embedding of the
    # text tower are trained fully too (docs/pipeline.md says so); LoRA stays in the vision tower
    saved = {k.split(".")[-2] for k in keys if "lora_" not in k}  # modules_to_save
    assert saved == set(load_section("train_clip", ROOT / "params.yaml").lora.modules_to_save)


def test_training_lowers_the_loss(trained):
    history = json.loads((trained["model"] / "val_metrics.json").read_text())["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_mlflow_run_has_params_tags_and_per_epoch_metrics(trained):
    from mlflow import MlflowClient

    info = json.loads((trained["model"] / "mlflow_run.json").read_text())
    assert info["tracking_uri"] == trained["uri"]
    client = MlflowClient(trained["uri"])
    run = client.get_run(info["run_id"])
    assert run.data.tags["variant"] == "real"
    assert run.data.tags["dvc_stage"] == "train_clip@real"
    assert len(run.data.tags["git_commit"]) >= 40
    assert run.data.tags["data_dvc_md5"].endswith(".dir")
    assert run.data.params["lora.r"] == "32"
    assert run.data.params["variant.balance"] == "False"
    for metric in ("train_loss", "val_accuracy", "val_macro_f1"):
        history = client.get_metric_history(info["run_id"], metric)
        assert [m.step for m in history] == list(range(1, EPOCHS + 1)), metric
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "pneumoclip-classifier"


def test_pyfunc_model_predicts_what_the_in_process_model_predicts(trained):
    import mlflow
    import pandas as pd

    from pneumoclip.tracking import image_bytes

    info = json.loads((trained["model"] / "mlflow_run.json").read_text())
    paths = sorted((SAMPLE / "chest_xray/train/PNEUMONIA").glob("*.jpeg"))[:6]
    pyfunc = mlflow.pyfunc.load_model(info["model_uri"])
    assert pyfunc.metadata.signature.inputs.input_names() == ["image"]
    out = pyfunc.predict(pd.DataFrame({"image": [image_bytes(p) for p in paths]}))
    local = ClipClassifier.load(trained["model"])
    expected = local.predict_proba([read_image(p) for p in paths])
    got = out[[f"prob_{c}" for c in local.classes]].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert list(out["label"]) == [local.classes[i] for i in expected.argmax(1)]
    # the logged model carries its tiny base: it does not need models/base
    assert (Path(pyfunc._model_impl.context.artifacts["model_dir"]) / "base").is_dir()


def test_evaluate_writes_metrics_plots_and_logs_them(trained):
    from mlflow import MlflowClient

    out = cli("evaluate", "--params", str(trained["params"]), "--variant", "real")
    assert "real: test accuracy" in out.stdout
    metrics_dir = trained["root"] / "metrics"
    metrics = json.loads((metrics_dir / "real/details.json").read_text())
    # the headline file that `dvc metrics show` lists: a few numbers, the same ones
    headline = json.loads((metrics_dir / "real.json").read_text())
    assert headline == {"accuracy": metrics["test"]["accuracy"],
                        "macro_f1": metrics["test"]["macro_f1"],
                        "balanced_accuracy": metrics["test"]["balanced_accuracy"],
                        **{f"recall_{c}": m["recall"]
                           for c, m in metrics["test"]["per_class"].items()},
                        "val_macro_f1": metrics["val"]["macro_f1"]}
    test = metrics["test"]
    index = read_index(trained["root"] / "artifacts/prepared/index.csv")
    n_test = sum(r["split"] == "test" for r in index)
    assert test["n"] == n_test
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "ece"):
        assert 0 <= test[key] <= 1, key
    for key in ("accuracy", "macro_f1"):
        low, high = test[f"{key}_ci95"]
        assert low <= test[key] <= high
    assert set(test["per_class"]) == {"NORMAL", "BACTERIA", "VIRUS"}
    assert sum(c["support"] for c in test["per_class"].values()) == n_test
    assert all(0 <= c["auroc"] <= 1 for c in test["per_class"].values())
    assert set(metrics["zero_shot"]) == {"accuracy", "macro_f1"}
    assert metrics["majority_baseline"]["label"] in {"NORMAL", "BACTERIA", "VIRUS"}
    confusion = (metrics_dir / "real/confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == n_test + 1
    for png in ("test.png", "training.png"):
        assert Image.open(metrics_dir / "real" / png).size[0] > 300
    for cls in ("NORMAL", "BACTERIA", "VIRUS"):  # one ROC file per class, from (0,0) to (1,1)
        roc = (metrics_dir / f"real/roc/{cls}.csv").read_text().splitlines()
        assert roc[0] == "fpr,tpr" and roc[-1] == "1.0,1.0"
    reliability = list(csv.DictReader(open(metrics_dir / "real/reliability.csv")))
    assert sum(int(r["count"]) for r in reliability) == n_test
    ece = sum(int(r["count"]) * abs(float(r["accuracy"]) - float(r["confidence"]))
              for r in reliability) / n_test
    assert ece == pytest.approx(test["ece"], abs=1e-9)  # the plot is the ECE's own terms
    training = list(csv.DictReader(open(metrics_dir / "real/training.csv")))
    val = json.loads((trained["model"] / "val_metrics.json").read_text())
    assert [int(r["epoch"]) for r in training] == [h["epoch"] for h in val["history"]]
    run_id = json.loads((trained["model"] / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(trained["uri"]).get_run(run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    assert "test_recall_VIRUS" in run.data.metrics
    artifacts = {a.path for a in MlflowClient(trained["uri"]).list_artifacts(run_id, "evaluation")}
    expected = {f"evaluation/{name}" for name in ("details.json", "test.png", "training.png")}
    assert expected <= artifacts
    # the images it used, as MLflow dataset inputs: one per split, with the split's size
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert {k: d.name for k, d in inputs.items()} == {
        "training": "kermany-train", "validation": "kermany-val", "testing": "kermany-test"}
    profile = json.loads(inputs["testing"].profile)
    assert profile["num_rows"] == n_test


def test_predict_prints_a_table_and_isolates_unreadable_files(trained, tmp_path):
    good = sorted((SAMPLE / "chest_xray/train/NORMAL").glob("*.jpeg"))[:2]
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(good[0].read_bytes()[:300])
    missing = tmp_path / "missing.png"
    args = ["predict", "--model", str(trained["model"]), str(good[0]), str(broken),
            str(missing), str(good[1])]
    out = cli(*args, check=False)
    assert out.returncode == 2, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split("\t") == ["file", "label", "NORMAL", "BACTERIA", "VIRUS"]
    assert lines[1].startswith(str(good[0])) and lines[4].startswith(str(good[1]))
    assert "error: not a readable image" in lines[2]
    assert "error: cannot read" in lines[3]
    rows = [json.loads(x) for x in cli(*args[:4], "--json", str(good[1])).stdout.splitlines()]
    assert [r["file"] for r in rows] == [str(good[0]), str(good[1])]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)


def test_predict_takes_an_mlflow_model_uri(trained):
    info = json.loads((trained["model"] / "mlflow_run.json").read_text())
    image = str(sorted((SAMPLE / "chest_xray/train/NORMAL").glob("*.jpeg"))[0])
    via_uri = json.loads(cli("predict", "--model", info["model_uri"], "--json", image).stdout)
    local = json.loads(cli("predict", "--model", str(trained["model"]), "--json", image).stdout)
    assert via_uri["label"] == local["label"]
    for c, p in local["probabilities"].items():
        assert via_uri["probabilities"][c] == pytest.approx(p, abs=1e-5)


def test_unknown_variant_fails_naming_the_known_ones(trained):
    out = cli("train-clip", "--params", str(trained["params"]), "--variant", "nope", check=False)
    assert out.returncode == 1
    known = "real, control, augmented"
    assert f"unknown variant 'nope' (params variants: {known})" in out.stderr


# ---------------------------------------------------------------- units


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16", "P"])
def test_any_image_mode_becomes_gray_rgb(mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))
        assert image.mode.startswith("I;16")
    else:
        image = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode)
    out = np.asarray(to_rgb(image))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out.std() > 10


def test_augment_is_seeded_keeps_shape_and_is_identity_at_zero_strength():
    x = torch.randn(4, 3, 16, 16)
    cfg = AugmentParams(shift=0.1, scale=0.1, rotate=10, brightness=0.2, contrast=0.2)
    a = augment(x, cfg, torch.Generator().manual_seed(1))
    b = augment(x, cfg, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)
    none = AugmentParams(shift=0, scale=0, rotate=0, brightness=0, contrast=0)
    assert torch.allclose(augment(x, none, torch.Generator()), x, atol=1e-5)


def test_balanced_loader_draws_classes_evenly():
    labels = torch.tensor([0] * 300 + [1] * 60 + [2] * 40)
    params = load_section("train_clip", ROOT / "params.yaml")
    data = loader(torch.zeros(400, 1), labels, params, True, torch.Generator().manual_seed(0))
    drawn = torch.cat([y for _, y in data] * 5)
    share = torch.bincount(drawn).float() / len(drawn)
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.05), share
    plain = torch.cat([y for _, y in loader(torch.zeros(400, 1), labels, params, False,
                                            torch.Generator().manual_seed(0))])
    assert torch.equal(torch.bincount(plain), torch.tensor([300, 60, 40]))


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    y = np.array([0, 0, 0, 0])
    calibrated = np.array([[0.75, 0.25]] * 4)
    pred_right = calibrated.copy()
    assert expected_calibration_error(np.array([0, 0, 0, 1]), pred_right, 10) == pytest.approx(0)
    overconfident = np.array([[0.01, 0.99]] * 4)
    assert expected_calibration_error(y, overconfident, 10) == pytest.approx(0.99)


def test_bootstrap_resamples_patients_not_images():
    y = np.array([0] * 50 + [1] * 50)
    pred = y.copy()
    pred[:50] = 1  # every image of patient "a" is wrong
    one_patient = bootstrap_ci(y, pred, ["a"] * 50 + ["b"] * 50, 300, 0)
    per_image = bootstrap_ci(y, pred, [str(i) for i in range(100)], 300, 0)
    # two patients: accuracy is 0, 0.5 or 1 per resample, so the interval is far wider
    assert one_patient["accuracy_ci95"] == [0.0, 1.0]
    assert per_image["accuracy_ci95"][1] - per_image["accuracy_ci95"][0] < 0.3
