"""CLIP LoRA training, evaluation, the MLflow pyfunc model and `pneumoclip predict`,
against a real MLflow server and the bundled sample."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EPOCHS, ROOT, SAMPLE, cli, dicom_bytes
from PIL import Image

from pneumoclip.classifier import (
    MAX_ASPECT,
    MIN_SIDE,
    ClipClassifier,
    ImageError,
    UnsupportedFormat,
    read_image,
    to_rgb,
)
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
    saved = {k.split(".")[-2] for k in keys if "lora_" not in k}  # modules_to_save
    assert saved == set(load_section("train_clip", ROOT / "params.yaml").lora.modules_to_save)
    assert not [k for k in keys if "text_model" in k]  # the text tower stays the base's


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


def split_rows(trained, split: str) -> list[dict]:
    return [r for r in read_index(trained["root"] / "artifacts/prepared/index.csv")
            if r["split"] == split]


def test_prior_adaptation_keeps_validation_as_it_is_and_follows_a_shifted_batch(trained):
    """The model records its mean calibrated validation posterior as the priors EM starts
    from, so EM stops where it starts on the validation set; a batch with NORMAL
    over-represented moves the NORMAL prior up."""
    from pneumoclip.priors import MIN_BATCH

    model = ClipClassifier.load(trained["model"])
    val = split_rows(trained, "val")
    probs = model.predict_proba([read_image(r["path"]) for r in val])
    reference = np.asarray(model.reference_priors)
    assert reference.sum() == pytest.approx(1, abs=1e-5)
    assert probs.mean(axis=0) == pytest.approx(reference, abs=1e-4)
    adapted, priors = model.adapt_priors(probs)
    assert priors == pytest.approx(reference, abs=1e-3)
    assert np.abs(adapted - probs).max() < 1e-2
    normal = [r for r in split_rows(trained, "train") if r["label"] == "NORMAL"][:MIN_BATCH]
    shifted = [r for r in val if r["label"] != "NORMAL"][:10] + normal
    shifted_probs = model.predict_proba([read_image(r["path"]) for r in shifted])
    _, shifted_priors = model.adapt_priors(shifted_probs)
    i = model.classes.index("NORMAL")
    assert shifted_priors[i] > shifted_probs.mean(axis=0)[i] > reference[i]
    with pytest.raises(ValueError, match=f"at least {MIN_BATCH} images"):
        model.adapt_priors(probs[:3])
    model.reference_priors = None
    with pytest.raises(ValueError, match="records no reference_priors"):
        model.adapt_priors(shifted_probs)


def test_evaluate_adapt_priors_scores_the_adapted_test_posteriors(trained, tmp_path):
    import shutil

    from pneumoclip.evaluate import evaluate_variant

    models = tmp_path / "models"  # a copy without mlflow_run.json: its own MLflow run
    shutil.copytree(trained["model"], models / "real",
                    ignore=shutil.ignore_patterns("mlflow_run.json"))
    params = dataclasses.replace(
        load_section("evaluate", trained["params"]), models_dir=str(models),
        out_dir=str(tmp_path / "metrics"), adapt_priors=True)
    test = evaluate_variant(params, "real")["test"]
    model = ClipClassifier.load(models / "real", base_dir=params.base_dir)
    rows = split_rows(trained, "test")
    probs, priors = model.adapt_priors(model.predict_proba([read_image(r["path"]) for r in rows]))
    assert list(test["adapted_priors"].values()) == pytest.approx(priors.tolist(), abs=1e-4)
    y = np.array([model.classes.index(r["label"]) for r in rows])
    assert test["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == y)))


def test_predict_adapt_priors_treats_the_files_as_one_batch(trained):
    from pneumoclip.priors import MIN_BATCH

    paths = [r["path"] for r in split_rows(trained, "train")][:MIN_BATCH]
    base = ["predict", "--model", str(trained["model"]), "--json"]
    rows = [json.loads(x) for x in cli(*base, "--adapt-priors", *paths).stdout.splitlines()]
    assert len(rows) == MIN_BATCH and all(r["priors"] == rows[0]["priors"] for r in rows)
    expected = ClipClassifier.load(trained["model"]).predict(
        [read_image(p) for p in paths], adapt_priors=True)
    for row, want in zip(rows, expected, strict=True):
        assert row["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    plain = [json.loads(x) for x in cli(*base, *paths).stdout.splitlines()]
    assert "priors" not in plain[0] and plain[0]["probabilities"] != rows[0]["probabilities"]
    refused = cli(*base, "--adapt-priors", *paths[:3], check=False)
    assert refused.returncode == 1
    assert f"needs a batch of at least {MIN_BATCH} images, got 3" in refused.stderr


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
    cfg = AugmentParams(shift=0.1, scale=0.1, rotate=10, brightness=0.2, contrast=0.2,
                        fill="edge")
    a = augment(x, cfg, torch.Generator().manual_seed(1))
    b = augment(x, cfg, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)
    none = AugmentParams(shift=0, scale=0, rotate=0, brightness=0, contrast=0, fill="black")
    assert torch.allclose(augment(x, none, torch.Generator(), black=torch.zeros(3)), x,
                          atol=1e-5)


def test_augment_fill_black_gives_a_zoom_out_a_black_margin():
    """`fill: black` pads what a zoom-out exposes with the model's black pixel (a wider field
    of view, as other sites' X-rays show); `edge` repeats the edge pixels instead."""
    from transformers import CLIPImageProcessor

    from pneumoclip.train_clip import black_pixel

    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size=16)
    black = black_pixel(processor)
    white = processor(images=[Image.new("RGB", (16, 16), "white")],
                      return_tensors="pt")["pixel_values"]
    assert black.shape == (3,) and (black < white[0, :, 0, 0]).all()
    # zoom out by 30-40%: every corner lies outside the source image
    zoom_out = AugmentParams(shift=0, scale=0.4, rotate=0, brightness=0, contrast=0,
                             fill="black")
    x = white.repeat(64, 1, 1, 1)
    draws = torch.Generator().manual_seed(0)
    torch.rand(64, generator=draws)  # the rotation's draw comes first
    scale = 1 + (torch.rand(64, generator=draws) * 2 - 1) * 0.4
    out = augment(x, zoom_out, torch.Generator().manual_seed(0), black=black)
    shrunk = scale < 0.8
    assert shrunk.any()
    corners = out[shrunk][:, :, 0, 0]
    assert torch.allclose(corners, black.expand_as(corners), atol=1e-5)
    assert torch.allclose(out[shrunk][:, :, 8, 8], white[0, :, 8, 8].expand(int(shrunk.sum()), 3))
    edge = augment(x, dataclasses.replace(zoom_out, fill="edge"), torch.Generator().manual_seed(0))
    assert torch.allclose(edge, x, atol=1e-5)  # a white image stays white
    with pytest.raises(ValueError, match="black pixel"):
        augment(x, zoom_out, torch.Generator())


def test_balanced_loader_draws_classes_evenly():
    labels = torch.tensor([0] * 300 + [1] * 60 + [2] * 40)
    params = load_section("train_clip", ROOT / "params.yaml")
    data = loader(torch.zeros(400, 1), labels, params, True, torch.Generator().manual_seed(0))
    drawn = torch.cat([y for _, y in data] * 5)
    share = torch.bincount(drawn).float() / len(drawn)
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.05), share
    whole = dataclasses.replace(params, batch_size=50)  # 400 = 8 x 50: one pass, each once
    plain = torch.cat([y for _, y in loader(torch.zeros(400, 1), labels, whole, False,
                                            torch.Generator().manual_seed(0))])
    assert torch.equal(torch.bincount(plain), torch.tensor([300, 60, 40]))
    # the last partial batch is dropped, as it is on N processes (400 = 12 x 32 + 16)
    assert len(loader(torch.zeros(400, 1), labels, params, False, torch.Generator())) == 12


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


# ---------------------------------------------------------------- reading images

XRAY = sorted((SAMPLE / "chest_xray/train/NORMAL").glob("*.jpeg"))[0]


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def gray(image: Image.Image) -> np.ndarray:
    """The one channel of read_image's gray RGB, as ints."""
    out = np.asarray(image)
    assert (out[..., 0] == out[..., 2]).all()
    return out[..., 0].astype(int)


def no_decoding(monkeypatch):
    """Make any pixel decoding (Pillow's or pydicom's) fail the test."""
    import pydicom.pixels
    from PIL import ImageFile

    def refuse(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(pydicom.pixels, "pixel_array", refuse)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_other_image_formats_are_refused_naming_the_format(fmt):
    data = encoded(Image.open(XRAY), fmt)
    with pytest.raises(UnsupportedFormat) as err:
        read_image(data)
    assert str(err.value) == f"{fmt} images are not accepted: send PNG, JPEG or DICOM"
    assert isinstance(err.value, ImageError)  # callers that catch ImageError still do


def test_unknown_bytes_are_not_an_unsupported_format():
    with pytest.raises(ImageError, match="not a readable image") as err:
        read_image(b"hello, not an image")
    assert not isinstance(err.value, UnsupportedFormat)


def test_exif_orientation_6_gives_the_upright_pixels():
    upright = Image.open(XRAY).convert("L").crop((0, 0, 224, 160))  # not square: 224 x 160
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways saves it
    data = encoded(stored, "JPEG", quality=95, exif=exif)
    out = read_image(data)
    assert out.size == upright.size
    decoded = Image.open(io.BytesIO(data)).convert("L")  # the stored pixels, not turned
    assert decoded.size == (160, 224)
    np.testing.assert_array_equal(
        gray(out), np.asarray(decoded.transpose(Image.Transpose.ROTATE_270)))
    assert np.abs(gray(out) - np.asarray(upright, dtype=int)).mean() < 2  # JPEG's loss only


def test_a_thin_image_is_refused_from_its_header_without_decoding(monkeypatch):
    data = encoded(Image.new("L", (2_000_000, 2)), "PNG")
    assert len(data) < 20_000  # a few KB that the CLIP processor would blow up to gigabytes
    no_decoding(monkeypatch)
    for limit in (None, 4_000_000):  # 4,000,000 pixels: not over the service's pixel cap
        with pytest.raises(ImageError, match=f"2000000x2 pixels is too small: the short side "
                                             f"must be at least {MIN_SIDE} px"):
            read_image(data, max_pixels=limit)


@pytest.mark.parametrize(("size", "ok"), [
    ((MIN_SIDE, MIN_SIDE), True), ((MIN_SIDE - 1, 200), False), ((16, 16), False),
    ((MAX_ASPECT * 50, 50), True), ((MAX_ASPECT * 50 + 1, 50), False),
    ((50, MAX_ASPECT * 50 + 1), False),
])
def test_tiny_and_elongated_images_are_refused_by_the_size_rule(size, ok):
    data = encoded(Image.open(XRAY).convert("L").resize(size), "PNG")
    if ok:
        assert read_image(data).size == size
        return
    with pytest.raises(ImageError, match=f"image of {size[0]}x{size[1]} pixels is too") as err:
        read_image(data)
    assert f"at most {MAX_ASPECT} times the short side" in str(err.value)


def xray_pixels() -> np.ndarray:
    return np.asarray(Image.open(XRAY).convert("L"), dtype=int)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("bits", [8, 16])
def test_an_uncompressed_dicom_gives_the_pixels_of_its_source(photometric, bits):
    data = dicom_bytes(Image.open(XRAY), photometric=photometric, bits=bits)
    out = read_image(data)
    assert out.mode == "RGB"
    # MONOCHROME1 stores inverted values (0 is white): read, they are the source's again
    np.testing.assert_array_equal(gray(out), xray_pixels())
    assert read_image(data).size == Image.open(XRAY).size


def test_a_dicom_voi_window_is_applied():
    out = gray(read_image(dicom_bytes(Image.open(XRAY), window=(100, 81))))
    x = xray_pixels()  # DICOM's linear window: 0 up to 59, 255 from 140, a ramp between
    expected = np.clip(((x - 99.5) / 80 + 0.5) * 255, 0, 255)
    assert np.abs(out - expected).max() <= 1
    assert (out == 0).mean() > 0.1 and (out == 255).mean() > 0.1


def test_a_16_bit_dicom_is_rescaled_before_its_window():
    # stored 16 * v + 8 with slope 0.0625 and intercept -0.5: the window (128, 256) is in
    # rescaled units, and maps 0-255 onto itself; on the stored values it would be all white
    out = gray(read_image(dicom_bytes(Image.open(XRAY), bits=16, window=(128, 256))))
    assert np.abs(out - xray_pixels()).max() <= 1


def edit_dicom(data: bytes, change) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    change(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_an_rle_lossless_dicom_is_decoded():
    from pydicom.uid import RLELossless

    data = dicom_bytes(Image.open(XRAY), bits=16, compress=RLELossless)
    np.testing.assert_array_equal(gray(read_image(data)), xray_pixels())


def encapsulated(codestream: Image.Image, fmt: str, syntax: str, **kw) -> bytes:
    """A DICOM of the sample X-ray's header whose one frame is `codestream` saved as `fmt`."""
    from pydicom.encaps import encapsulate

    def change(ds):
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([encoded(codestream, fmt, **kw)])
        ds["PixelData"].VR = "OB"

    return edit_dicom(dicom_bytes(Image.open(XRAY)), change)


@pytest.mark.parametrize(("fmt", "syntax", "kw"), [
    ("JPEG", "1.2.840.10008.1.2.4.50", {"quality": 100}),  # JPEG Baseline
    ("JPEG2000", "1.2.840.10008.1.2.4.90", {"irreversible": False, "no_jp2": True}),  # lossless
])
def test_a_dicom_compressed_as_pillow_decodes_is_decoded(fmt, syntax, kw):
    source = Image.open(XRAY).convert("L")
    data = encapsulated(source, fmt, syntax, **kw)
    expected = np.asarray(Image.open(io.BytesIO(encoded(source, fmt, **kw))), dtype=int)
    np.testing.assert_array_equal(gray(read_image(data)), expected)


def test_a_dicom_codestream_larger_than_its_header_is_refused_before_decoding(monkeypatch):
    data = encapsulated(Image.new("L", (8000, 8000)), "JPEG2000", "1.2.840.10008.1.2.4.90",
                        no_jp2=True)
    assert len(data) < 2_000  # 64 million pixels to decode, in a 224x224 file
    no_decoding(monkeypatch)
    with pytest.raises(ImageError, match="DICOM frame of 8000x8000 pixels in a 224x224 image"):
        read_image(data)


def test_a_dicom_in_a_syntax_no_plugin_decodes_is_refused_naming_it(monkeypatch):
    from pydicom.uid import JPEGLSLossless

    data = dicom_bytes(Image.open(XRAY), compress=JPEGLSLossless)
    no_decoding(monkeypatch)
    with pytest.raises(UnsupportedFormat, match=r"DICOM transfer syntax JPEG-LS Lossless Image "
                       r"Compression \(1\.2\.840\.10008\.1\.2\.4\.80\) cannot be decoded here"):
        read_image(data)


def test_a_dicom_without_pixel_data_is_an_image_error():
    data = edit_dicom(dicom_bytes(Image.open(XRAY)), lambda ds: delattr(ds, "PixelData"))
    with pytest.raises(ImageError, match="^DICOM has no pixel data$") as err:
        read_image(data)
    assert not isinstance(err.value, UnsupportedFormat)


def test_a_dicom_size_is_checked_from_its_header_before_decoding(monkeypatch):
    small = dicom_bytes(Image.open(XRAY).resize((16, 16)))
    huge = edit_dicom(dicom_bytes(Image.open(XRAY)),
                      lambda ds: setattr(ds, "Rows", 60_000) or setattr(ds, "Columns", 60_000))
    no_decoding(monkeypatch)
    with pytest.raises(ImageError, match=f"16x16 pixels is too small: the short side must be "
                                         f"at least {MIN_SIDE} px"):
        read_image(small)
    with pytest.raises(ImageError, match="60000x60000 pixels is over the limit of 4,000,000"):
        read_image(huge, max_pixels=4_000_000)
    with pytest.raises(ImageError, match="60000x60000 pixels is over the limit"):
        read_image(huge)  # no cap given: Pillow's decompression-bomb limit


def test_a_multi_frame_dicom_gives_its_first_frame():
    first = xray_pixels().astype(np.uint8)

    def two_frames(ds):
        ds.NumberOfFrames = 2
        ds.PixelData = first.tobytes() + (255 - first).tobytes()

    data = edit_dicom(dicom_bytes(Image.open(XRAY)), two_frames)
    np.testing.assert_array_equal(gray(read_image(data)), first)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained tiny CLIP folder that ClipClassifier.load reads (no LoRA, no training)."""
    from pneumoclip.base_models import build_tiny_clip

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_clip(load_section("base_models", ROOT / "params.yaml").tiny_clip, 0, out)
    prompts = load_section("train_clip", ROOT / "params.yaml").prompts
    meta = {"prompts": prompts, "base": str(out), "base_is_tiny": True, "temperature": 1.0}
    (out / "pneumoclip.json").write_text(json.dumps(meta))
    return out


def test_equalize_makes_the_model_blind_to_a_monotonic_intensity_curve(tiny_model, tmp_path):
    """A model trained with `equalize` (recorded in its folder) gives the same answer for an
    image and the image under any strictly increasing intensity curve; training reads the
    pixels the same way."""
    import shutil

    from pneumoclip.train_clip import load_pixels

    gray = np.asarray(Image.open(XRAY).convert("L")).astype(float) // 4 * 4  # 64 levels
    curved = np.round(255 * (gray / 255) ** 0.6)  # gamma 0.6, still 64 distinct levels
    assert len(np.unique(curved)) == len(np.unique(gray))
    paths = []
    for name, values in (("plain", gray), ("curved", curved)):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(values.astype(np.uint8)).save(paths[-1])
    images = [read_image(p) for p in paths]
    plain = ClipClassifier.load(tiny_model).predict_proba(images)
    assert np.abs(plain[0] - plain[1]).max() > 1e-4  # without it, the curve moves the answer
    folder = tmp_path / "equalized"
    shutil.copytree(tiny_model, folder)
    meta = json.loads((folder / "pneumoclip.json").read_text()) | {"equalize": True}
    (folder / "pneumoclip.json").write_text(json.dumps(meta))
    model = ClipClassifier.load(folder)
    assert model.equalize
    probs = model.predict_proba(images)
    assert np.array_equal(probs[0], probs[1])
    trained_on = load_pixels(model.processor, [str(p) for p in paths], "test", equalize=True)
    assert torch.equal(trained_on, model.pixel_values(images))


def test_predict_classifies_a_dicom_as_its_source_image(tiny_model, tmp_path):
    from pneumoclip.predict import predict_files

    dicom = tmp_path / "xray.dcm"
    dicom.write_bytes(dicom_bytes(Image.open(XRAY), photometric="MONOCHROME1", bits=16))
    gif = tmp_path / "xray.gif"
    Image.open(XRAY).save(gif)
    jpeg, dcm, refused = predict_files([str(XRAY), str(dicom), str(gif)], str(tiny_model))
    assert dcm["file"] == str(dicom) and dcm["label"] == jpeg["label"]
    for c, p in jpeg["probabilities"].items():
        assert dcm["probabilities"][c] == pytest.approx(p, abs=1e-6)
    assert refused == {"file": str(gif),
                       "error": "GIF images are not accepted: send PNG, JPEG or DICOM"}
    assert "PNG, JPEG or DICOM" in cli("predict", "--help").stdout


def test_the_serving_docs_quote_the_size_rule():
    text = " ".join((ROOT / "docs/serving.md").read_text().split())
    assert (f"the short side at least {MIN_SIDE} px and the long side at most {MAX_ASPECT} "
            f"times the short side ({MAX_ASPECT}:1" in text)
