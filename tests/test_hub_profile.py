"""The `hub` profile, offline: hub-format stand-ins load through the same `from_pretrained`
calls as the hub ids, and the profile, pointed at them, runs the whole pipeline with the real
`dvc repro` (base_models to register), then the registered champion predicts with the
stand-ins and the project's base folder gone and the hub switched off (issue 13, items 1-2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SAMPLE, copy_project
from hub_standins import (
    CLIP_B16,
    CLIP_IMAGE_SIZE,
    CLIP_MEAN,
    CLIP_STD,
    SD21,
    SD21_BASE,
    SD21_BASE_RESOLUTION,
    SD21_RESOLUTION,
    STANDINS,
)

PROJECT_FILES = ["dvc.yaml", "params.yaml", "data.dvc", ".dvcignore", ".gitignore", "src",
                 "bases"]
GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t"}


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("standins")
    return {repo: build(root / repo.replace("/", "--")) for repo, build in STANDINS.items()}


# ---------------------------------------------------------------- the stand-ins themselves


@pytest.mark.parametrize(("repo", "prediction_type", "resolution"), [
    (SD21_BASE, "epsilon", SD21_BASE_RESOLUTION), (SD21, "v_prediction", SD21_RESOLUTION)])
def test_sd_standins_load_as_the_hub_repos_do(standins, repo, prediction_type, resolution):
    from diffusers import StableDiffusionPipeline

    folder = standins[repo]
    assert sorted(p.name for p in folder.iterdir()) == [
        "feature_extractor", "model_index.json", "scheduler", "text_encoder", "tokenizer",
        "unet", "vae"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    # the call base_models makes for a hub id
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                   requires_safety_checker=False)
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert (sched.prediction_type, sched.steps_offset, sched.beta_schedule) == (
        prediction_type, 1, "scaled_linear")
    assert (sched.beta_start, sched.beta_end, sched.skip_prk_steps) == (0.00085, 0.012, True)
    unet = pipe.unet.config
    assert unet.use_linear_projection is True
    assert isinstance(unet.attention_head_dim, list | tuple) and len(unet.attention_head_dim) > 1
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert unet.sample_size * pipe.vae_scale_factor == resolution  # 8x, as SD 2.x's VAE
    text = pipe.text_encoder.config
    assert text.hidden_act == "gelu"
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id, pipe.tokenizer.pad_token_id)
    assert pipe.feature_extractor.crop_size["height"] == 224
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a chest x-ray of viral pneumonia", num_inference_steps=2, height=resolution,
                 width=resolution, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (resolution, resolution)


def test_clip_standin_loads_as_the_hub_repo_does(standins):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    folder = standins[CLIP_B16]
    assert {"config.json", "model.safetensors", "preprocessor_config.json",
            "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    model = CLIPModel.from_pretrained(str(folder))
    processor = CLIPProcessor.from_pretrained(str(folder))
    vision = model.config.vision_config
    assert (vision.patch_size, vision.image_size, vision.hidden_act) == (
        16, CLIP_IMAGE_SIZE, "quick_gelu")
    image_processor = processor.image_processor
    assert image_processor.size["shortest_edge"] == 224
    assert (image_processor.crop_size["height"], image_processor.crop_size["width"]) == (224, 224)
    assert list(image_processor.image_mean) == CLIP_MEAN
    assert list(image_processor.image_std) == CLIP_STD
    pixels = processor(images=Image.new("L", (300, 260)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    tokenizer = processor.tokenizer
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    with torch.no_grad():  # the pooling pitfall: three prompts, three embeddings
        pooled = model.text_model(**tokenizer(
            ["normal lungs", "bacterial pneumonia", "viral pneumonia"], padding=True,
            return_tensors="pt")).pooler_output
    assert torch.cdist(pooled, pooled)[~torch.eye(3, dtype=torch.bool)].min() > 1e-3


# ---------------------------------------------------------------- the profile end to end


def run(*args: str, cwd: Path, env: dict | None = None) -> str:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db", **GIT) | (env or {})
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def hub_project(dest: Path, standins: dict[str, Path], sd_repo: str, resolution: int) -> Path:
    """A fresh project on `profile: hub` whose hub ids are the stand-in folders, with the
    sizes shrunk to a few steps (edits of the hub profile's own entry, as a user makes)."""
    dest.mkdir(parents=True)
    copy_project(dest, PROJECT_FILES)
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    raw["profile"] = "hub"
    hub = raw["profiles"]["hub"]
    hub["base_models"]["clip"]["source"] = str(standins[CLIP_B16])
    hub["base_models"]["sd"]["source"] = str(standins[sd_repo])
    hub["train_clip"] |= {"epochs": 2, "patience": 2, "batch_size": 32, "lr": 1e-3}
    hub["sd_lora"] |= {"resolution": resolution, "batch_size": 4, "epochs": 0.1,
                       "warmup_steps": 1, "checkpoint_every": 2, "sample_every": 2}
    hub["synthesize"] |= {"batch_size": 16}
    raw["sd_lora"] |= {"sample_per_class": 1, "sample_steps": 2}
    raw["synthesize"] |= {"steps": 2, "probe_per_class": 2, "counts": {"VIRUS": 4,
                                                                       "BACTERIA": 2}}
    raw["evaluate"] |= {"bootstrap": 20}
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run("git", "init", "-q", cwd=dest)
    run("pneumoclip", "sample", "data", "--source", str(SAMPLE), cwd=dest)
    run("dvc", "add", "data", cwd=dest)
    return dest


@pytest.mark.slow
def test_the_hub_profile_runs_the_pipeline_on_hub_format_bases(standins, tmp_path):
    project = hub_project(tmp_path / "project", standins, SD21_BASE, SD21_BASE_RESOLUTION)
    log = run("dvc", "repro", cwd=project)
    stages = {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}
    assert {"base_models", "sd_lora", "synthesize", "register"} <= stages, log[-3000:]
    # the bases are the stand-ins, saved in save_pretrained form, loaded from their folders
    assert "loading clip from folder" in log and "loading sd from folder" in log
    base = project / "models/base"
    assert json.loads((base / "sd/pneumoclip_source.json").read_text())["source"] == str(
        standins[SD21_BASE])
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lock["sd_lora"]["params"]["params.yaml"]["profile"] == "hub"  # a DVC param dep
    # what the hub profile switched: a 224 px classifier processor
    for cls in ("NORMAL", "BACTERIA", "VIRUS"):
        assert (project / f"models/sd-lora/lora_{cls}.safetensors").is_file()
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(str(project / "models/clip-lora/real"))
    assert processor.image_processor.crop_size["height"] == 224
    registry = json.loads((project / "artifacts/registry.json").read_text())
    assert "up to date" in run("dvc", "status", cwd=project)

    # the champion predicts with no base folder anywhere and the hub switched off
    moved = tmp_path / "moved"
    moved.mkdir()
    for folder in [base, *standins.values()]:
        shutil.move(str(folder), moved / f"{folder.parent.name}-{folder.name}")
    try:
        out = run("pneumoclip", "predict", "--json", "--model",
                  f"models:/{registry.get('model_name', 'pneumoclip-classifier')}@champion",
                  str(sorted((SAMPLE / "chest_xray/train/NORMAL").iterdir())[0]),
                  cwd=project, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    finally:
        for folder in [base, *standins.values()]:
            shutil.move(str(moved / f"{folder.parent.name}-{folder.name}"), folder)
    row = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert row["label"] in {"NORMAL", "BACTERIA", "VIRUS"}, out
    assert abs(sum(row["probabilities"].values()) - 1) < 1e-4
