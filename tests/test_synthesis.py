"""SD LoRA and synthesis on the tiny base: train, save, load back, resume, generate, judge."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, cli, project_params
from PIL import Image

from pneumoclip.config import load_section
from pneumoclip.diffusion import LORA_FILE, META_FILE, SHARED, generate, lora_sha256
from pneumoclip.prepare import read_index
from pneumoclip.sd_lora import epoch_steps
from pneumoclip.synthesize import (
    MANIFEST,
    SynthesizeError,
    draw,
    generate_contrast,
    load_pipeline,
    plan,
    plan_counts,
    work_key,
)

# A few steps of every adapter (about 10 on the sample's classes): enough to exercise them,
# quick on a CPU.
QUICK_SD = {"batch_size": 8, "epochs": 1.0, "checkpoint_every": 4, "sample_every": 6,
            "sample_per_class": 2, "sample_steps": 4}


NEGATIVE = "a chest x-ray of bacterial pneumonia"
CONTRAST = {"NORMAL": {"BACTERIA": 25.0}}  # strong: a few-step LoRA barely differs


def sd_params(root: Path, trained: dict, **overrides) -> Path:
    """params.yaml for the SD stages under `root`, on the session's base and prepared sample."""
    base = trained["root"] / "models/base/sd"
    index = trained["root"] / "artifacts/prepared/index.csv"
    return project_params(
        root,
        sd_lora=QUICK_SD | {"base_dir": str(base), "index": str(index),
                            "out_dir": str(root / "sd-lora"),
                            "checkpoint_dir": str(root / "ckpt")} | overrides,
        synthesize={"base_dir": str(base), "lora_dir": str(root / "sd-lora"),
                    "index": str(index), "classifier_dir": str(trained["model"]),
                    "out_dir": str(root / "synthetic"), "work_dir": str(root / "work"),
                    "metrics": str(root / "synthetic.json"), "steps": 4, "batch_size": 8,
                    "counts": {"NORMAL": 6, "BACTERIA": 4, "VIRUS": 10},
                    "negative_prompts": {"VIRUS": NEGATIVE}, "contrast": CONTRAST,
                    "probe_per_class": 8},
    )


@pytest.fixture(scope="module")
def sd(tmp_path_factory, trained):
    """One quick SD LoRA run through the CLI, logged to the session's MLflow server."""
    root = tmp_path_factory.mktemp("sd")
    params = sd_params(root, trained)
    out = cli("sd-lora", "--params", str(params))
    return {"root": root, "params": params, "lora": root / "sd-lora", "log": out.stdout}


def assert_diffusers_lora(path: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(path)
    assert weights and all(k.startswith("unet.") for k in weights)
    assert any("to_k.lora.down" in k for k in weights) and any("to_out.0" in k for k in weights)


def differ(a: Image.Image, b: Image.Image) -> bool:
    return np.abs(np.asarray(a, float) - np.asarray(b, float)).max() > 0


def test_lora_saves_in_diffusers_format_and_loads_back_into_a_pipeline(sd, trained):
    meta = json.loads((sd["lora"] / META_FILE).read_text())
    assert meta["per_class"] and not (sd["lora"] / "base").exists()  # LoRA only
    train = [r for r in read_index(trained["root"] / "artifacts/prepared/index.csv")
             if r["split"] == "train"]
    assert meta["steps"] == {c: epoch_steps(1.0, sum(r["label"] == c for r in train), 8)
                             for c in ("NORMAL", "BACTERIA", "VIRUS")}  # one epoch each
    assert meta["adapters"] == {c: f"lora_{c}.safetensors" for c in ("NORMAL", "BACTERIA", "VIRUS")}
    for file in meta["adapters"].values():
        assert_diffusers_lora(sd["lora"] / file)

    params = load_section("synthesize", sd["params"])
    pipe, adapters = load_pipeline(params, meta, "cpu")
    pipe.set_adapters(adapters["VIRUS"])
    (image,) = generate(pipe, ["a chest x-ray of viral pneumonia"], [3], 4, 3.0, 64)
    assert image.size == (64, 64) and image.mode == "L"
    # each class has its own adapter in the pipeline: another one, or none, draws differently
    pipe.set_adapters(adapters["NORMAL"])
    (normal,) = generate(pipe, ["a chest x-ray of viral pneumonia"], [3], 4, 3.0, 64)
    pipe.disable_lora()
    (plain,) = generate(pipe, ["a chest x-ray of viral pneumonia"], [3], 4, 3.0, 64)
    assert differ(image, normal) and differ(image, plain) and differ(normal, plain)


def test_one_shared_lora_for_all_classes_when_per_class_is_off(tmp_path, trained):
    params = sd_params(tmp_path, trained, per_class=False, epochs=0.25)
    out = cli("sd-lora", "--params", str(params))
    train = [r for r in read_index(trained["root"] / "artifacts/prepared/index.csv")
             if r["split"] == "train"]
    assert f"1 LoRA adapter(s), steps {SHARED} {epoch_steps(0.25, len(train), 8)}," in out.stdout
    meta = json.loads((tmp_path / "sd-lora" / META_FILE).read_text())
    assert meta["adapters"] == dict.fromkeys(("NORMAL", "BACTERIA", "VIRUS"), LORA_FILE)
    assert sorted(p.name for p in (tmp_path / "sd-lora").glob("*.safetensors")) == [LORA_FILE]
    assert_diffusers_lora(tmp_path / "sd-lora" / LORA_FILE)
    pipe, adapters = load_pipeline(load_section("synthesize", params), meta, "cpu")
    assert set(adapters.values()) == {Path(LORA_FILE).stem}
    (image,) = generate(pipe, ["a chest x-ray of viral pneumonia"], [3], 4, 3.0, 64)
    pipe.disable_lora()
    (plain,) = generate(pipe, ["a chest x-ray of viral pneumonia"], [3], 4, 3.0, 64)
    assert differ(image, plain)


def test_sd_run_is_logged_with_loss_curves_and_sample_grids(sd):
    from mlflow.tracking import MlflowClient

    meta = json.loads((sd["lora"] / META_FILE).read_text())
    client = MlflowClient()
    run = client.get_run(meta["run_id"])
    assert run.data.params["lora.r"] == "16"
    assert run.data.tags["dvc_stage"] == "sd_lora"
    for cls in ("NORMAL", "BACTERIA", "VIRUS"):  # LoRA phases only: the base is pretrained
        history = client.get_metric_history(run.info.run_id, f"lora_{cls}_loss")
        assert history[-1].step == meta["steps"][cls], cls
    assert not client.get_metric_history(run.info.run_id, "unet_loss")
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/lora_VIRUS_step00006.png", "samples/final.png"} <= samples


def kill_at_checkpoint(cmd: list[str], ckpt_root: Path, phase: str) -> None:
    """Start `cmd` and SIGKILL it as soon as it has checkpointed inside `phase`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            states = list(ckpt_root.glob("*/state.pt"))
            if states:
                try:
                    state = torch.load(states[0], map_location="cpu", weights_only=False)
                except Exception:  # caught mid-rename; look again
                    state = None
                if state and state["phase"] == phase:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no {phase} checkpoint appeared (exit {proc.returncode})")


# the second adapter's phase: the first one, finished before the kill, must survive it
@pytest.mark.parametrize("phase", ["lora_NORMAL", "lora_BACTERIA"])
def test_an_interrupted_run_resumes_and_ends_where_an_unbroken_one_does(
    sd, trained, tmp_path, phase
):
    from safetensors.torch import load_file

    params = sd_params(tmp_path, trained)
    kill_at_checkpoint(["pneumoclip", "sd-lora", "--params", str(params)], tmp_path / "ckpt",
                       phase)
    assert not (tmp_path / "sd-lora").exists()  # no half-written output
    out = cli("sd-lora", "--params", str(params))
    assert f"resuming {phase} from step" in out.stdout
    assert not any((tmp_path / "ckpt").iterdir())  # cleared after success
    files = sorted(p.name for p in sd["lora"].glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "sd-lora").glob("*.safetensors"))
    for file in files:
        resumed = load_file(tmp_path / "sd-lora" / file)
        unbroken = load_file(sd["lora"] / file)
        assert resumed.keys() == unbroken.keys()
        for key, value in unbroken.items():
            torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # one MLflow run, continued rather than duplicated
    from mlflow.tracking import MlflowClient

    meta = json.loads((tmp_path / "sd-lora" / META_FILE).read_text())
    history = MlflowClient().get_metric_history(meta["run_id"], "lora_VIRUS_loss")
    assert history[-1].step == meta["steps"]["VIRUS"]


@pytest.fixture(scope="module")
def synthetic(sd):
    out = cli("synthesize", "--params", str(sd["params"]))
    params = load_section("synthesize", sd["params"])
    return {"params": params, "out": Path(params.out_dir), "log": out.stdout,
            "report": json.loads(Path(params.metrics).read_text())}


def read_manifest(folder: Path) -> list[dict]:
    with open(folder / MANIFEST, newline="") as fh:
        return list(csv.DictReader(fh))


def test_manifest_matches_the_files(synthetic, sd):
    rows = read_manifest(synthetic["out"])
    files = {p.relative_to(synthetic["out"]).as_posix()
             for p in synthetic["out"].rglob("*.png") if p.name != "grid.png"}
    assert {r["file"] for r in rows} == files
    counts = {c: sum(r["class"] == c for r in rows) for c in ("NORMAL", "BACTERIA", "VIRUS")}
    assert counts == {"NORMAL": 6, "BACTERIA": 4, "VIRUS": 10}
    lora_sha = json.loads((sd["lora"] / META_FILE).read_text())["lora_sha256"]
    for i, row in enumerate(rows):
        assert row["file"].startswith(row["class"] + "/")
        assert int(row["seed"]) == synthetic["params"].seed + i
        assert row["lora_sha256"] == lora_sha and row["steps"] == "4"
        assert row["negative_prompt"] == (NEGATIVE if row["class"] == "VIRUS" else "")
        assert row["contrast"] == ("BACTERIA:25" if row["class"] == "NORMAL" else "")
        with Image.open(synthetic["out"] / row["file"]) as image:
            assert image.size == (64, 64) and image.mode == "L"
    assert (synthetic["out"] / "grid.png").is_file()


def test_quality_report_has_consistency_per_class_and_a_two_sample_auroc(synthetic):
    report = synthetic["report"]
    rows = read_manifest(synthetic["out"])
    for cls, stats in report["per_class"].items():
        mine = [r for r in rows if r["class"] == cls]
        assert stats["generated"] == len(mine)
        assert stats["judged"] == max(len(mine), 8)  # probe images top small classes up
        assert 0.0 <= stats["consistency"] <= 1.0
    assert report["per_class"]["VIRUS"]["consistency"] == pytest.approx(
        np.mean([r["predicted"] == "VIRUS" for r in rows if r["class"] == "VIRUS"]))
    assert 0.0 <= report["two_sample_auroc"] <= 1.0
    assert "real-vs-synthetic AUROC" in synthetic["log"]


def test_real_consistency_is_the_judges_recall_on_real_validation_images(synthetic):
    from pneumoclip.classifier import ClipClassifier, read_image
    from pneumoclip.prepare import read_index

    params = synthetic["params"]
    judge = ClipClassifier.load(params.classifier_dir)
    val = [r for r in read_index(params.index) if r["split"] == "val"]
    predicted = [p["label"] for p in judge.predict([read_image(r["path"]) for r in val])]
    for cls, stats in synthetic["report"]["per_class"].items():
        hits = [p == cls for r, p in zip(val, predicted, strict=True) if r["label"] == cls]
        assert stats["real_judged"] == len(hits) > 0
        assert stats["real_consistency"] == pytest.approx(np.mean(hits), abs=1e-9)
    assert "(real val images: " in synthetic["log"]


def test_generation_is_deterministic_per_seed(synthetic, sd):
    params = synthetic["params"]
    meta = json.loads((sd["lora"] / META_FILE).read_text())
    pipe, adapters = load_pipeline(params, meta, "cpu")
    row = read_manifest(synthetic["out"])[7]
    pipe.set_adapters(adapters[row["class"]])
    args = (params.steps, params.guidance, meta["resolution"])
    (alone,) = generate(pipe, [row["prompt"]], [int(row["seed"])], *args)
    (again,) = generate(pipe, [row["prompt"]], [int(row["seed"])], *args)
    other = generate(pipe, [row["prompt"]] * 2, [int(row["seed"]) + 1000, int(row["seed"])],
                     *args)
    assert np.array_equal(np.asarray(alone), np.asarray(again))  # same call: same bytes
    # in another batch, the same seed draws the same picture up to float rounding
    with Image.open(synthetic["out"] / row["file"]) as stored:
        stored = np.asarray(stored, float)
    for same in (stored, np.asarray(other[1], float)):
        diff = np.abs(np.asarray(alone, float) - same)
        assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())
    assert np.abs(np.asarray(alone, float) - np.asarray(other[0], float)).mean() > 5
    # a VIRUS row was drawn with its negative prompt: without it the picture changes
    virus = next(r for r in read_manifest(synthetic["out"]) if r["class"] == "VIRUS")
    pipe.set_adapters(adapters["VIRUS"])
    (negative,) = generate(pipe, [virus["prompt"]], [int(virus["seed"])], *args, [NEGATIVE])
    (plain,) = generate(pipe, [virus["prompt"]], [int(virus["seed"])], *args)
    with Image.open(synthetic["out"] / virus["file"]) as stored:
        assert np.abs(np.asarray(negative, float) - np.asarray(stored, float)).max() <= 2
    assert np.abs(np.asarray(negative, float) - np.asarray(plain, float)).mean() > 1


def test_class_contrast_guidance_steers_away_from_the_other_classes_adapters(synthetic, sd):
    params = synthetic["params"]
    meta = json.loads((sd["lora"] / META_FILE).read_text())
    pipe, adapters = load_pipeline(params, meta, "cpu")
    row = next(r for r in read_manifest(synthetic["out"]) if r["class"] == "NORMAL")
    pipe.set_adapters(adapters["NORMAL"])
    args = ([row["prompt"]], [int(row["seed"])], params.steps, params.guidance,
            meta["resolution"], [""])
    bacteria = meta["captions"]["BACTERIA"][0]

    def contrast(weight: float) -> np.ndarray:
        (image,) = generate_contrast(pipe, adapters["NORMAL"],
                                     [(adapters["BACTERIA"], bacteria, weight)], *args)
        return np.asarray(image, float)

    (plain,) = generate(pipe, *args)
    plain = np.asarray(plain, float)
    # weight 0 is the pipeline's own sampling, step for step
    assert np.array_equal(contrast(0.0), plain)
    steered = contrast(CONTRAST["NORMAL"]["BACTERIA"])
    with Image.open(synthetic["out"] / row["file"]) as stored:
        assert np.abs(steered - np.asarray(stored, float)).max() <= 2  # how the row was drawn
    assert np.abs(steered - plain).mean() > 1
    assert pipe.get_active_adapters() == [adapters["NORMAL"]]  # left as it was found


def test_a_rerun_keeps_the_images_an_interrupted_run_drew(sd, tmp_path):
    params = dataclasses.replace(
        load_section("synthesize", sd["params"]),
        out_dir=str(tmp_path / "synthetic"), work_dir=str(tmp_path / "work"),
        metrics=str(tmp_path / "m.json"),
    )
    meta = json.loads((sd["lora"] / META_FILE).read_text())
    counts = {"NORMAL": 6, "BACTERIA": 4, "VIRUS": 10}
    rows = plan(params, counts, meta["captions"])
    lora_sha = lora_sha256(sd["lora"], meta["adapters"].values())
    work = Path(params.work_dir) / work_key(params, lora_sha, counts)
    # "interrupted" after the first batch (the 6 NORMAL images: batches are the plan's, and
    # a batch left half drawn is drawn again whole, its drawn files kept)
    draw(*load_pipeline(params, meta, "cpu"), rows[:6], work, params, 64, meta["captions"])
    marked = work / rows[2]["file"]
    Image.new("L", (64, 64), 123).save(marked)  # would be overwritten by a redraw
    path = tmp_path / "params.yaml"
    raw = yaml.safe_load(sd["params"].read_text())
    raw["synthesize"] |= {"out_dir": params.out_dir, "work_dir": params.work_dir,
                          "metrics": params.metrics}
    path.write_text(yaml.safe_dump(raw))
    out = cli("synthesize", "--params", str(path))
    assert "6 of 26 images already drawn" in out.stdout  # 20 + 6 probe images
    with Image.open(tmp_path / "synthetic" / rows[2]["file"]) as image:
        assert set(np.asarray(image).flatten()) == {123}
    assert not work.exists()  # cleaned after success


def test_counts_balance_to_the_largest_class_or_follow_params(sd):
    params = load_section("synthesize", sd["params"])
    classes = ["NORMAL", "BACTERIA", "VIRUS"]
    train = {"NORMAL": 10, "BACTERIA": 25, "VIRUS": 9}
    balanced = dataclasses.replace(params, counts="balance")
    assert plan_counts(balanced, train, classes) == {"NORMAL": 15, "BACTERIA": 0, "VIRUS": 16}
    assert plan_counts(params, train, classes) == {"NORMAL": 6, "BACTERIA": 4, "VIRUS": 10}
    with pytest.raises(SynthesizeError, match="unknown classes.*COVID"):
        plan_counts(dataclasses.replace(params, counts={"COVID": 3}), train, classes)
    with pytest.raises(SynthesizeError, match="'balance' or a mapping"):
        plan_counts(dataclasses.replace(params, counts="even"), train, classes)
    captions = {c: [f"a chest x-ray, {c}"] for c in classes}
    with pytest.raises(SynthesizeError, match="negative_prompts names unknown classes.*COVID"):
        plan(dataclasses.replace(params, negative_prompts={"COVID": "x"}), train, captions)
    with pytest.raises(SynthesizeError, match="contrast names unknown classes.*COVID"):
        plan(dataclasses.replace(params, contrast={"VIRUS": {"COVID": 1.0}}), train, captions)
    with pytest.raises(SynthesizeError, match="contrast.VIRUS contrasts VIRUS with itself"):
        plan(dataclasses.replace(params, contrast={"VIRUS": {"VIRUS": 1.0}}), train, captions)


def test_per_class_adapters_need_class_names_that_can_name_an_adapter(tmp_path, trained):
    captions = {"NORMAL": ["a"], "BACTERIA": ["b"], "VIRUS": ["c"], "VIRUS.other": ["d"]}
    out = cli("sd-lora", "--params", str(sd_params(tmp_path, trained, captions=captions)),
              check=False)
    assert out.returncode == 1 and "class names must be identifiers" in out.stderr
    assert "VIRUS.other" in out.stderr and not (tmp_path / "sd-lora").exists()


def test_synthesize_without_a_lora_names_the_stage_to_run(tmp_path, trained):
    params = sd_params(tmp_path, trained)
    out = cli("synthesize", "--params", str(params), check=False)
    assert out.returncode == 1
    assert "sd_lora.json is missing; run `dvc repro sd_lora`" in out.stderr


def test_augmented_variant_adds_only_kept_synthetic_images_to_train(synthetic, tmp_path):
    from pneumoclip.train_clip import TrainError, read_synthetic

    folder = tmp_path / "synthetic"
    import shutil

    shutil.copytree(synthetic["out"], folder)
    rows = read_manifest(folder)
    rows[0]["kept"] = "0"
    with open(folder / MANIFEST, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    train, info = read_synthetic(str(folder), ["NORMAL", "BACTERIA", "VIRUS"])
    assert len(train) == len(rows) - 1 == info["images"]
    assert {r["split"] for r in train} == {"train"}
    assert all(Path(r["path"]).is_file() for r in train)
    assert info["per_class"] == {"NORMAL": 5, "BACTERIA": 4, "VIRUS": 10}
    with pytest.raises(TrainError, match="manifest.csv is missing"):
        read_synthetic(str(tmp_path), ["NORMAL", "BACTERIA", "VIRUS"])
