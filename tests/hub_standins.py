"""Hub-format stand-ins: tiny random models in the folder layout and config shape of the hub
repos that the `hub` profile names, so that profile runs end to end offline.

- `sd21_base`: stabilityai/stable-diffusion-2-1-base (epsilon, 512 px in the real one)
- `sd21`: stabilityai/stable-diffusion-2-1 (v_prediction, 768 px in the real one)
- `clip_vit_b16`: openai/clip-vit-base-patch16 (224 px processor, patch 16)

Each writes what the real repo holds, file by file (`model_index.json` with the real class
names, a PNDM scheduler config as the repo has it, the OpenCLIP-H text encoder's config keys,
a UNet with `use_linear_projection` and a per-block `attention_head_dim`, a 224 px feature
extractor, CLIP's mean and std), with the sizes shrunk and real tokenizers built offline by
`pneumoclip.base_models.build_tokenizer`. Each loads with the same `from_pretrained(path)`
call as the hub id. The real repos' pickled `.bin` weights are written as safetensors here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pneumoclip.base_models import build_tokenizer, token_ids

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
SD21 = "stabilityai/stable-diffusion-2-1"
CLIP_B16 = "openai/clip-vit-base-patch16"

# OpenAI CLIP's normalisation, as in every CLIP preprocessor_config.json on the hub
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The SD 2.x VAE has four blocks: 8x downsampling, latents = pixels / 8. The real 2-1-base is
# 512 px (64 latents) and 2-1 is 768 px (96 latents); the stand-ins keep the 2:3 ratio.
SD21_BASE_RESOLUTION = 64
SD21_RESOLUTION = 96
CLIP_IMAGE_SIZE = 224  # the real processor's, kept: the tower's patch grid is 14 x 14
TEXT_LEN = 77  # both repos' max_position_embeddings and tokenizer model_max_length


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _feature_extractor_config(size: int) -> dict:
    """preprocessor_config.json as the hub's CLIP repos and SD's feature_extractor/ have it."""
    return {
        "crop_size": size, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3, "size": size,
    }


def _tokenizer(out: Path):
    tokenizer = build_tokenizer(out, TEXT_LEN)
    return tokenizer


def stable_diffusion_2(out: Path, *, prediction_type: str, resolution: int,
                       seed: int = 0) -> Path:
    """An SD 2.x repo folder: model_index.json, scheduler/, text_encoder/, tokenizer/, unet/,
    vae/, feature_extractor/ (no safety checker, as in stabilityai's 2.x repos)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(out / "tokenizer")
    text_hidden = 32  # 1024 in OpenCLIP ViT-H
    _write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.10.0.dev0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    _write_json(out / "scheduler/scheduler_config.json", {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.10.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    })
    _write_json(out / "feature_extractor/preprocessor_config.json",
                _feature_extractor_config(224))
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        hidden_act="gelu",  # OpenCLIP-H's; OpenAI CLIP uses quick_gelu
        hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TEXT_LEN, projection_dim=text_hidden,
        initializer_factor=1.0, layer_norm_eps=1e-5, torch_dtype="float32",
        **token_ids(tokenizer),  # the pooling pitfall: the tokenizer's own bos/eos/pad ids
    ))
    text.save_pretrained(out / "text_encoder")
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4,
        act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
        freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1,
        attention_head_dim=[2, 4],  # a list per block, as SD 2.x's [5, 10, 20, 20]
        cross_attention_dim=text_hidden, use_linear_projection=True,
        dual_cross_attention=False, only_cross_attention=False,
    )
    unet.save_pretrained(out / "unet")
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, act_fn="silu",
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=resolution,
    )
    vae.save_pretrained(out / "vae")
    return out


def sd21_base(out: Path, seed: int = 0) -> Path:
    """stabilityai/stable-diffusion-2-1-base: epsilon prediction."""
    return stable_diffusion_2(out, prediction_type="epsilon", resolution=SD21_BASE_RESOLUTION,
                              seed=seed)


def sd21(out: Path, seed: int = 0) -> Path:
    """stabilityai/stable-diffusion-2-1: v_prediction, 1.5x the base's size."""
    return stable_diffusion_2(out, prediction_type="v_prediction", resolution=SD21_RESOLUTION,
                              seed=seed)


def clip_vit_b16(out: Path, seed: int = 0) -> Path:
    """openai/clip-vit-base-patch16: config.json (CLIPModel, quick_gelu towers), weights,
    preprocessor_config.json (224 px, CLIP's mean and std) and the tokenizer files."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "_tok"
    tokenizer = _tokenizer(work)
    text = CLIPTextConfig(
        hidden_act="quick_gelu", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TEXT_LEN, projection_dim=32,
        **token_ids(tokenizer),
    )
    vision = CLIPVisionConfig(
        hidden_act="quick_gelu", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, image_size=CLIP_IMAGE_SIZE, patch_size=16, projection_dim=32,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=32, logit_scale_init_value=2.6592)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out)
    for f in work.iterdir():  # the tokenizer's files sit beside the model, as on the hub
        shutil.move(str(f), out / f.name)
    work.rmdir()
    _write_json(out / "preprocessor_config.json", _feature_extractor_config(CLIP_IMAGE_SIZE))
    return out


STANDINS = {SD21_BASE: sd21_base, SD21: sd21, CLIP_B16: clip_vit_b16}
