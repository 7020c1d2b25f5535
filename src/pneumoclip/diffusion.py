"""Stable Diffusion inference pieces that `sd_lora` (sample grids) and `synthesize` share.

Loading the adapters a `sd_lora` output holds, drawing images with per-image seeds, grids and
adapter hashes live here, so that synthesis does not depend on the training code.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pneumoclip.fsutil import sha256_file

SD_EXPERIMENT = "pneumoclip-sd"
LORA_FILE = "pytorch_lora_weights.safetensors"
META_FILE = "sd_lora.json"
SHARED = "default"  # the adapter name of the one shared LoRA


def lora_file(adapter: str) -> str:
    return LORA_FILE if adapter == SHARED else f"lora_{adapter}.safetensors"


def lora_sha256(folder: str | Path, files) -> str:
    """The file's sha256 for one adapter; a digest of every file's for several."""
    files = sorted(set(files))
    if len(files) == 1:
        return sha256_file(Path(folder) / files[0])
    lines = "".join(f"{f}:{sha256_file(Path(folder) / f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def load_adapters(pipe, lora_dir: str | Path, meta: dict) -> dict[str, str]:
    """Load a `sd_lora` output's adapters into a pipeline; returns class -> adapter name."""
    names = {}
    with warnings.catch_warnings():  # "multiple adapters in the model": one per class, yes
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for cls, file in meta["adapters"].items():
            name = Path(file).stem
            if name not in names.values():
                pipe.load_lora_weights(str(lora_dir), weight_name=file, adapter_name=name)
            names[cls] = name
    return names


def sample_pipeline(vae, text_encoder, tokenizer, unet, scheduler_config):
    """A pipeline around the parts being trained, with a fast deterministic sampler built
    from the base's scheduler config (its betas, timesteps and prediction type)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
             resolution: int, negative: list[str] | None = None) -> list[Image.Image]:
    """One grayscale image per (prompt, seed); each image has its own CPU generator.

    `negative` prompts replace the empty caption that guidance steers away from."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        out = pipe(prompt=prompts, negative_prompt=negative if any(negative or []) else None,
                   generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                   height=resolution, width=resolution, output_type="np").images
    return [Image.fromarray((im.mean(axis=-1) * 255).round().astype(np.uint8), mode="L")
            for im in out]


def make_grid(rows: list[list[Image.Image]], labels: list[str] | None = None,
              cell: int = 64) -> Image.Image:
    """Rows of images side by side (one row per class), with an optional label per row."""
    from PIL import ImageDraw

    margin = 90 if labels else 0
    width = margin + cell * max(len(r) for r in rows)
    grid = Image.new("L", (width, cell * len(rows)), 255)
    draw = ImageDraw.Draw(grid)
    for y, row in enumerate(rows):
        if labels:
            draw.text((4, y * cell + cell // 2 - 6), labels[y], fill=0)
        for x, image in enumerate(row):
            grid.paste(image.convert("L").resize((cell, cell)), (margin + x * cell, y * cell))
    return grid
