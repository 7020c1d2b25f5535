"""The pretrained tiny bases: the shipped ones leak nothing of the sample, and `pneumoclip
pretrain` makes bases that `base_models` installs, from the rows it is allowed to use only."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE, cli, project_params

from pneumoclip.config import load_section
from pneumoclip.fsutil import sha256_file
from pneumoclip.prepare import read_index, scan

SHIPPED = ROOT / "bases/tiny"


def used_images(bases: Path) -> list[dict]:
    with open(bases / "images.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_shipped_bases_never_saw_a_patient_or_image_of_the_sample():
    """The sample's test split scores the shipped bases, so none of its patients (and no
    copy of any of its images) may be in what they were pretrained on."""
    records, _ = scan(SAMPLE, [".jpeg", ".jpg", ".png"])
    assert len(records) > 300
    used = used_images(SHIPPED)
    assert len(used) > 3000
    assert not {r.patient_id for r in records} & {u["patient_id"] for u in used}
    assert not {r.sha256 for r in records} & {u["sha256"] for u in used}
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    assert manifest["images_sha256"] == sha256_file(SHIPPED / "images.csv")
    assert manifest["data"]["splits"] == ["train"]  # the benchmark split's train part only
    assert manifest["data"]["train_images"] + manifest["data"]["val_images"] == len(used)


def test_the_shipped_bases_are_small_float16_safetensors():
    from safetensors import safe_open

    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 15e6
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 4  # clip; sd's unet, vae, text encoder
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pkl", ".ckpt"}]
    for path in weights:
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path


def test_the_loss_is_clip_loss_when_each_class_has_one_image_and_one_caption(tmp_path):
    """With one image and one caption per class, the same-class positives are the diagonal,
    and the loss is transformers' own CLIP loss; with more, same-class pairs all count."""
    from transformers import CLIPModel, CLIPTokenizer

    from pneumoclip.base_models import build_tiny_clip
    from pneumoclip.pretrain import class_caption_loss

    build_tiny_clip(load_section("base_models", ROOT / "params.yaml").tiny_clip, 0, tmp_path)
    clip = CLIPModel.from_pretrained(tmp_path).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    captions = ["a chest x-ray of normal lungs", "a chest x-ray of bacterial pneumonia",
                "a chest x-ray of viral pneumonia"]
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    pixels = torch.randn(3, 3, clip.config.vision_config.image_size,
                         clip.config.vision_config.image_size, generator=torch.Generator()
                         .manual_seed(0))
    with torch.no_grad():
        ours = class_caption_loss(clip, tokens, torch.arange(3), pixels, torch.arange(3))
        theirs = clip(**tokens, pixel_values=pixels, return_loss=True).loss
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        # two images of one class: its caption is a positive of both, not a negative of one
        both = class_caption_loss(clip, tokens, torch.arange(3), pixels, torch.tensor([0, 0, 2]))
    assert not torch.isclose(both, ours)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, mlflow_server):
    """`pneumoclip pretrain` on the sample's train split, leaving out the patients of a few
    of its images, with a couple of epochs and steps: the real command, small."""
    root = tmp_path_factory.mktemp("pretrain")
    params = project_params(
        root, pretrain={"clip": {"epochs": 2, "batch_size": 32},
                        "sd": {"batch_size": 8, "vae_steps": 3, "unet_steps": 3}},
        sd_lora={"sample_every": 0, "checkpoint_every": 2})
    cli("prepare", "--params", str(params))
    index = root / "artifacts/prepared/index.csv"
    train = [r for r in read_index(index) if r["split"] == "train"]
    excluded = root / "exclude/chest_xray"
    for row in train[:: len(train) // 6][:6]:  # a few patients' images, Kermany layout
        src = Path(row["path"])
        dest = excluded / src.relative_to(SAMPLE / "chest_xray")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    out = cli("pretrain", "--params", str(params), "--index", str(index), "--splits", "train",
              "--exclude", str(excluded.parent))
    return {"root": root, "params": params, "index": index, "excluded": excluded.parent,
            "bases": Path(load_section("pretrain", params).out_dir), "log": out.stdout,
            "uri": mlflow_server}


def test_pretrain_uses_only_the_given_splits_less_the_excluded_patients(pretrained):
    rows = read_index(pretrained["index"])
    records, _ = scan(pretrained["excluded"], [".jpeg"])
    gone = {r.patient_id for r in records}
    expected = {r["sha256"] for r in rows if r["split"] == "train" and r["patient_id"] not in gone}
    used = used_images(pretrained["bases"])
    assert {u["sha256"] for u in used} == expected  # every allowed train image, nothing else
    assert not gone & {u["patient_id"] for u in used}
    assert {u["role"] for u in used} == {"train", "val"}
    by_patient = {}
    for u in used:  # the epoch-picking slice is patient-grouped
        assert by_patient.setdefault(u["patient_id"], u["role"]) == u["role"]
    manifest = json.loads((pretrained["bases"] / "manifest.json").read_text())
    assert manifest["data"]["excluded_patients"] == len(gone)
    assert manifest["data"]["index_sha256"] == sha256_file(pretrained["index"])
    assert set(manifest["code"]) == {"pneumoclip", "source_sha256", "git_commit"}
    assert manifest["params"]["pretrain"]["clip"]["epochs"] == 2
    assert "pretrain clip: epoch 2/2" in pretrained["log"]
    from mlflow import MlflowClient  # one run, with the curves and the manifest

    run = MlflowClient(pretrained["uri"]).get_run(manifest["mlflow_run_id"])
    assert {"clip_zero_shot_val_macro_f1", "vae_final_l1", "unet_final_loss"} <= set(
        run.data.metrics)


def test_base_models_installs_what_pretrain_made_and_it_trains(pretrained, tmp_path):
    """The output is a tiny_dir: `source: tiny` installs it, and a LoRA trains on it."""
    params = project_params(
        tmp_path, base_models={"tiny_dir": str(pretrained["bases"])},
        train_clip={"epochs": 1, "index": str(pretrained["index"])},
        variants={"real": {"balance": False, "train_data": str(pretrained["index"])}})
    cli("base-models", "--params", str(params))
    record = json.loads((tmp_path / "models/base/sd/pneumoclip_source.json").read_text())
    manifest = json.loads((pretrained["bases"] / "manifest.json").read_text())
    assert record["pretrain_images_sha256"] == manifest["images_sha256"]
    out = cli("train-clip", "--params", str(params), "--variant", "real")
    assert "real: best epoch 1/1" in out.stdout


def test_pretrain_refuses_an_index_with_nothing_left(pretrained, tmp_path):
    out = cli("pretrain", "--params", str(pretrained["params"]), "--index",
              str(pretrained["index"]), "--splits", "train", "--exclude", str(SAMPLE),
              "--out-dir", str(tmp_path / "bases"), check=False)
    assert out.returncode == 1 and "no rows of splits ['train']" in out.stderr
    assert not (tmp_path / "bases").exists()


def test_check_unseen_passes_the_benchmark_split_and_catches_a_leak(pretrained, tmp_path):
    """A benchmark checks that its bases never saw its val or test split."""
    from pneumoclip.pretrain import PretrainError, check_unseen

    assert check_unseen(pretrained["bases"], pretrained["index"]) > 0
    with pytest.raises(PretrainError, match="pretrained on .* images of the train split"):
        check_unseen(pretrained["bases"], pretrained["index"], ("train",))
