from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from pneumoclip.base_models import build_base_models, learn_bpe
from pneumoclip.config import TINY_RANDOM, BaseModelSource, load_section

PROMPTS = [
    "a chest x-ray of normal lungs",
    "a chest x-ray of bacterial pneumonia",
    "a chest x-ray of viral pneumonia",
]


def shipped_params():
    params = load_section("base_models", ROOT / "params.yaml")
    return dataclasses.replace(params, tiny_dir=str(ROOT / params.tiny_dir))


def build(out: Path, seed: int = 0) -> Path:
    """The random-init tiny bases (`tiny-random`)."""
    random = BaseModelSource(source=TINY_RANDOM, revision="main")
    build_base_models(dataclasses.replace(shipped_params(), out_dir=str(out), seed=seed,
                                          clip=random, sd=random))
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("base") / "models")


def test_same_seed_gives_byte_identical_models(base, tmp_path):
    again = tree_bytes(build(tmp_path / "again"))
    first = tree_bytes(base)
    assert sorted(first) == sorted(again)
    assert any(name.endswith(".safetensors") for name in first)
    for name in first:
        assert first[name] == again[name], name


def test_another_seed_gives_other_weights(base, tmp_path):
    other = tree_bytes(build(tmp_path / "other", seed=1))
    first = tree_bytes(base)
    assert other["clip/model.safetensors"] != first["clip/model.safetensors"]
    assert other["sd/unet/diffusion_pytorch_model.safetensors"] != first[
        "sd/unet/diffusion_pytorch_model.safetensors"
    ]


def test_no_pickles_only_safetensors(base):
    weights = [p.name for p in base.rglob("*") if p.suffix in {".bin", ".pt", ".pkl", ".ckpt"}]
    assert weights == []


def test_bpe_learns_each_corpus_word_as_one_token():
    merges = learn_bpe(["viral", "virus", "bacterial", "viral"])
    joined = {"".join(m) for m in merges}
    assert {"viral</w>", "virus</w>", "bacterial</w>"} <= joined


def test_class_words_tokenize_to_distinct_known_ids(base):
    from transformers import CLIPProcessor

    tokenizer = CLIPProcessor.from_pretrained(base / "clip").tokenizer
    ids = {w: tokenizer(w).input_ids for w in ("normal", "bacterial", "viral", "pneumonia")}
    for word, seq in ids.items():
        assert len(seq) == 3, (word, seq)  # <bos> word <eos>: one whole-word token
        assert seq[0] == tokenizer.bos_token_id and seq[-1] == tokenizer.eos_token_id
    middle = [seq[1] for seq in ids.values()]
    assert len(set(middle)) == 4
    assert tokenizer.unk_token_id not in middle


def test_clip_loads_with_from_pretrained_and_class_prompts_embed_differently(base):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(base / "clip").eval()
    tokenizer = CLIPProcessor.from_pretrained(base / "clip").tokenizer
    # The pooling pitfall: the text config must use the tokenizer's own eos id.
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    assert model.config.text_config.bos_token_id == tokenizer.bos_token_id
    with torch.no_grad():
        out = model.text_model(**tokenizer(PROMPTS, padding=True, return_tensors="pt"))
    pooled = out.pooler_output
    distances = torch.cdist(pooled, pooled)
    off_diagonal = distances[~torch.eye(3, dtype=torch.bool)]
    assert off_diagonal.min() > 1e-3, distances


def test_sd_loads_as_a_diffusers_pipeline_and_generates(base):
    from diffusers import StableDiffusionPipeline

    params = load_section("base_models", ROOT / "params.yaml")
    size = params.tiny_sd.resolution
    pipe = StableDiffusionPipeline.from_pretrained(base / "sd")
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        PROMPTS[0], num_inference_steps=2, height=size, width=size,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (size, size)
    assert image.mode == "RGB"


def test_a_local_folder_source_goes_through_the_hub_loaders(tmp_path, monkeypatch):
    """A folder in hub layout loads with the same fetch_hub_* (`from_pretrained(path)`) code
    as a hub id, and is saved in save_pretrained form with its pneumoclip_source.json."""
    import json

    from diffusers import StableDiffusionPipeline
    from hub_standins import clip_vit_b16, sd21
    from transformers import CLIPModel

    from pneumoclip import base_models

    clip_dir, sd_dir = clip_vit_b16(tmp_path / "clip-standin"), sd21(tmp_path / "sd-standin")
    called = []
    for name in ("fetch_hub_clip", "fetch_hub_sd"):
        real = getattr(base_models, name)
        monkeypatch.setattr(base_models, name, lambda s, o, real=real, name=name: (
            called.append((name, s.source)), real(s, o))[1])
    params = load_section("base_models", ROOT / "params.yaml")
    params = dataclasses.replace(
        params, out_dir=str(tmp_path / "base"),
        clip=BaseModelSource(source=str(clip_dir), revision="main"),
        sd=BaseModelSource(source=str(sd_dir), revision="main"))
    build_base_models(params)
    assert called == [("fetch_hub_clip", str(clip_dir)), ("fetch_hub_sd", str(sd_dir))]
    out = tmp_path / "base"
    for name, src in (("clip", clip_dir), ("sd", sd_dir)):
        assert json.loads((out / name / "pneumoclip_source.json").read_text()) == {
            "source": str(src), "revision": "main"}
    assert (out / "sd/model_index.json").is_file()
    assert (out / "sd/unet/diffusion_pytorch_model.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(out / "sd")
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # kept from the folder
    saved, original = (CLIPModel.from_pretrained(p).state_dict() for p in (out / "clip", clip_dir))
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)


def test_tiny_installs_the_shipped_pretrained_bases_in_float32(tmp_path):
    """`source: tiny` (the default) loads bases/tiny through the hub loaders, in float32,
    with the very weights that were shipped in float16, and records which pretraining."""
    import json

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPModel

    params = dataclasses.replace(shipped_params(), out_dir=str(tmp_path / "base"))
    assert (params.clip.source, params.sd.source) == ("tiny", "tiny")
    build_base_models(params)
    shipped, out = Path(params.tiny_dir), tmp_path / "base"
    clip = CLIPModel.from_pretrained(out / "clip")
    assert clip.dtype == torch.float32
    for key, value in load_file(shipped / "clip/model.safetensors").items():
        assert value.dtype == torch.float16
        torch.testing.assert_close(clip.state_dict()[key], value.float(), rtol=0, atol=0)
    unet = UNet2DConditionModel.from_pretrained(out / "sd", subfolder="unet")
    weights = load_file(shipped / "sd/unet/diffusion_pytorch_model.safetensors")
    assert unet.dtype == torch.float32 and len(weights) == len(unet.state_dict())
    for key, value in weights.items():
        torch.testing.assert_close(unet.state_dict()[key], value.float(), rtol=0, atol=0)
    manifest = json.loads((shipped / "manifest.json").read_text())
    record = json.loads((out / "clip/pneumoclip_source.json").read_text())
    assert record == {"source": "tiny", "revision": "main",
                      "pretrain_images_sha256": manifest["images_sha256"]}


def test_tiny_without_shipped_bases_says_how_to_make_them(tmp_path):
    params = dataclasses.replace(shipped_params(), out_dir=str(tmp_path / "base"),
                                 tiny_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="pneumoclip pretrain"):
        build_base_models(params)
    assert not (tmp_path / "base").exists()
