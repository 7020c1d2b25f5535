"""The CLIP prompt classifier shared by training, evaluation, prediction and serving.

An image is scored against each class by the scaled cosine similarity between its CLIP
image embedding and the class's text embedding (the normalised mean over the class's prompt
templates). Softmax over the classes gives probabilities.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

META_FILE = "pneumoclip.json"


class ImageError(ValueError):
    """The bytes or file are not an image this classifier can read."""


# ---------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, RGB, RGBA, P, I;16, I, F) to 8-bit grayscale replicated to RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    elif image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("L").convert("RGB")


def read_image(source: str | Path | bytes, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image from a path or bytes; raise ImageError if unusable."""
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as err:
        raise ImageError(f"cannot read {source}: {err.strerror}") from err
    if not raw:
        raise ImageError("empty image (0 bytes)")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageError(
                    f"image of {image.width}x{image.height} pixels is over the limit of "
                    f"{max_pixels:,} pixels"
                )
            image.load()
            return to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"image too large: {err}") from err
    except Image.UnidentifiedImageError as err:
        raise ImageError("not a readable image: not PNG, JPEG or another known format") from err
    except Exception as err:  # PIL raises many types for broken data
        raise ImageError(f"not a readable image: {err}") from err


# ---------------------------------------------------------------- embeddings


def tokenize_prompts(tokenizer, prompts: dict[str, list[str]], device=None) -> list[dict]:
    """One batch of token tensors per class (its prompt templates)."""
    batches = [
        tokenizer(t, padding=True, truncation=True, return_tensors="pt") for t in prompts.values()
    ]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def class_text_embeddings(clip, tokens: list[dict]) -> torch.Tensor:
    """(classes, dim): per class, the normalised mean of its normalised prompt embeddings."""
    rows = []
    for batch in tokens:
        pooled = clip.text_model(**batch).pooler_output
        embeds = F.normalize(clip.text_projection(pooled), dim=-1)
        rows.append(F.normalize(embeds.mean(dim=0), dim=-1))
    return torch.stack(rows)


def image_embeddings(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
    return F.normalize(clip.visual_projection(pooled), dim=-1)


def prompt_logits(clip, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    return clip.logit_scale.exp() * image_embeds @ text_embeds.T


# ---------------------------------------------------------------- the trained classifier


@dataclass
class ClipClassifier:
    """A (LoRA-merged) CLIP, its processor and the class text embeddings, ready to predict."""

    clip: object
    processor: object
    classes: list[str]
    text_embeds: torch.Tensor
    temperature: float = 1.0
    batch_size: int = 64

    @classmethod
    def load(cls, model_dir: str | Path, base_dir: str | Path | None = None) -> ClipClassifier:
        """Load `models/clip-lora/VARIANT` (or the same folder inside an MLflow model).

        The base comes from `base_dir`, else from `model_dir/base` when the folder carries a
        copy (tiny bases do), else from the path or hub id recorded at training time.
        """
        from peft import PeftModel
        from transformers import CLIPModel, CLIPProcessor

        model_dir = Path(model_dir)
        meta = json.loads((model_dir / META_FILE).read_text())
        revision = None
        if base_dir is None:
            if (model_dir / "base").is_dir():
                base_dir = model_dir / "base"
            elif Path(meta["base"]).is_dir():
                base_dir = meta["base"]
            elif not meta["base_is_tiny"]:  # a hub base: fetch it by id and revision
                base_dir, revision = meta["base_source"], meta["base_revision"]
            else:
                raise FileNotFoundError(f"the tiny base {meta['base']} of {model_dir} is gone; "
                                        "rebuild it with `dvc repro base_models`")
        clip = CLIPModel.from_pretrained(str(base_dir), revision=revision)
        if (model_dir / "adapter_config.json").is_file():
            clip = PeftModel.from_pretrained(clip, str(model_dir)).merge_and_unload()
        clip.eval()
        processor = CLIPProcessor.from_pretrained(str(model_dir))
        return cls.from_parts(clip, processor, meta["prompts"], meta.get("temperature", 1.0))

    @classmethod
    def from_parts(cls, clip, processor, prompts: dict[str, list[str]], temperature: float = 1.0):
        with torch.no_grad():
            tokens = tokenize_prompts(processor.tokenizer, prompts, clip.device)
            text_embeds = class_text_embeddings(clip, tokens)
        return cls(clip, processor, list(prompts), text_embeds, temperature)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def logits_from_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = image_embeddings(self.clip, pixel_values)
        return prompt_logits(self.clip, embeds, self.text_embeds) / self.temperature

    def predict_proba(self, images: list[Image.Image]) -> np.ndarray:
        """Class probabilities (n, classes) for RGB/any-mode PIL images."""
        images = [to_rgb(im) for im in images]
        out = [
            torch.softmax(self.logits_from_pixels(self.pixel_values(chunk)), dim=-1)
            for chunk in (
                images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size)
            )
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)))

    def predict(self, images: list[Image.Image]) -> list[dict]:
        return [
            {"label": self.classes[int(p.argmax())],
             "probabilities": {c: float(v) for c, v in zip(self.classes, p, strict=True)}}
            for p in self.predict_proba(images)
        ]
