"""The SD LoRA recipe on a real-shaped base: the loss follows the scheduler's prediction type
as diffusers' own training script computes it, the sampler keeps the base's scheduler, the
resolution must be the base's, and no stage pins the CPU."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from hub_standins import SD21_RESOLUTION, sd21

from pneumoclip.config import load_section
from pneumoclip.sd_lora import SdLoraError, diffusion_loss, load_parts


@pytest.fixture(scope="module")
def v_base(tmp_path_factory) -> Path:
    """The SD 2.1 stand-in: prediction_type v_prediction, as the 768 px hub repo."""
    return sd21(tmp_path_factory.mktemp("sd21") / "sd21")


def diffusers_recipe(unet, scheduler, latents, text, gamma: float, seed: int) -> torch.Tensor:
    """The loss of diffusers' examples/text_to_image/train_text_to_image_lora.py, transcribed
    (its noise and timesteps drawn in pneumoclip's order from the same generator)."""
    from diffusers.training_utils import compute_snr

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(latents),),
                              generator=gen)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    model_pred = unet(noisy, timesteps, text, return_dict=False)[0]
    snr = compute_snr(scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean()


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_the_loss_is_diffusers_recipe_for_the_base_prediction_type(v_base, prediction_type):
    parts = load_parts(v_base, SD21_RESOLUTION, "cpu")
    scheduler = parts.noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"  # the stand-in's own
    if prediction_type != "v_prediction":
        scheduler.register_to_config(prediction_type=prediction_type)
    params = dataclasses.replace(load_section("sd_lora", ROOT / "params.yaml"), snr_gamma=5.0,
                                 noise_offset=0.0)
    torch.manual_seed(0)
    size = SD21_RESOLUTION // 8
    latents = torch.randn(4, parts.unet.config.in_channels, size, size)
    text = torch.randn(4, 7, parts.unet.config.cross_attention_dim)
    with torch.no_grad():
        ours = diffusion_loss(parts.unet, scheduler, latents, text, params,
                              torch.Generator().manual_seed(3))
        theirs = diffusers_recipe(parts.unet, scheduler, latents, text, 5.0, seed=3)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    if prediction_type == "v_prediction":  # and an epsilon target would be another loss
        scheduler.register_to_config(prediction_type="epsilon")
        with torch.no_grad():
            epsilon = diffusion_loss(parts.unet, scheduler, latents, text, params,
                                     torch.Generator().manual_seed(3))
        assert abs(float(epsilon) - float(theirs)) > 1e-3


def test_an_unknown_prediction_type_is_refused(v_base):
    parts = load_parts(v_base, SD21_RESOLUTION, "cpu")
    parts.noise_scheduler.register_to_config(prediction_type="flow")
    params = load_section("sd_lora", ROOT / "params.yaml")
    size = SD21_RESOLUTION // 8
    with pytest.raises(SdLoraError, match="prediction_type 'flow'"):
        diffusion_loss(parts.unet, parts.noise_scheduler, torch.randn(2, 4, size, size),
                       torch.randn(2, 7, parts.unet.config.cross_attention_dim), params,
                       torch.Generator().manual_seed(0))


def test_a_resolution_other_than_the_base_fails_naming_the_key(v_base):
    with pytest.raises(SdLoraError, match=r"sd_lora.resolution is 64 .* set sd_lora.resolution "
                                          rf"to {SD21_RESOLUTION}"):
        load_parts(v_base, 64, "cpu")


def test_sample_grids_use_the_base_scheduler(v_base):
    from pneumoclip.diffusion import sample_pipeline

    parts = load_parts(v_base, SD21_RESOLUTION, "cpu")
    pipe = sample_pipeline(parts.vae, parts.text_encoder, parts.tokenizer, parts.unet,
                           parts.noise_scheduler.config)
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction"
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                "steps_offset"):
        assert config[key] == parts.noise_scheduler.config[key], key


DEVICE_FOLLOWING = ["train_clip", "sd_lora", "synthesize", "diffusion", "classifier",
                    "evaluate", "serving", "distributed"]


@pytest.mark.parametrize("module", DEVICE_FOLLOWING)
def test_no_stage_pins_the_cpu(module):
    """Every tensor and model follows the accelerator's device: no "cpu" device string.
    (fsutil loads checkpoints with map_location="cpu", and the test's own calls pass one.)"""
    tree = ast.parse((ROOT / f"src/pneumoclip/{module}.py").read_text())
    found = [node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and (node.value == "cpu" or node.value.startswith("cpu:"))]
    assert not found, f"{module}.py pins the CPU at lines {found}"
