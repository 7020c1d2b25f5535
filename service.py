"""The Bento: serves the classifier that `models:/pneumoclip-classifier@champion` points to.

Two BentoML services in one Bento:

- `Pneumoclip` (the HTTP API) checks and decodes uploads, turns each into the model's pixel
  tensor, and answers 4xx with a reason for anything it cannot read.
- `ClipModel` holds the model and runs only the image tower: the class text embeddings are
  computed once at start-up. Its one API is batchable, so BentoML's adaptive batching merges
  the images of concurrent requests into one forward pass.

`pneumoclip bento build` imports the champion into the BentoML model store (labels keep the
MLflow name and version) and builds this Bento.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from bentoml.validators import ContentType

HERE = Path(__file__).resolve().parent
if (HERE / "src" / "pneumoclip").is_dir():  # inside the Bento or a checkout: use that code
    sys.path.insert(0, str(HERE / "src"))

from pneumoclip.classifier import ImageError, read_image  # noqa: E402
from pneumoclip.config import load_section  # noqa: E402
from pneumoclip.serving import UploadGuard, champion_model, load_classifier  # noqa: E402

SETTINGS = load_section("serve", os.environ.get("PNEUMOCLIP_PARAMS", HERE / "params.yaml"))
MODEL = champion_model(SETTINGS)


def check_image(raw: bytes):
    """Bytes of one upload to an RGB PIL image, or a 400 that says what is wrong."""
    if len(raw) > SETTINGS.max_bytes:
        raise InvalidArgument(
            f"upload of {len(raw):,} bytes is over the limit of {SETTINGS.max_bytes:,}"
        )
    try:
        return read_image(raw, max_pixels=SETTINGS.max_pixels)
    except ImageError as err:
        raise InvalidArgument(str(err)) from err


@bentoml.service(name="clip_model", workers=1, traffic={"timeout": 60})
class ClipModel:
    model = MODEL

    def __init__(self) -> None:
        self.classifier = load_classifier(self.model)

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        logits = self.classifier.logits_from_pixels(torch.from_numpy(pixels))
        return torch.softmax(logits, dim=-1).numpy()


@bentoml.service(name="pneumoclip", workers=1, traffic={"timeout": 60})
class Pneumoclip:
    clip_model = bentoml.depends(ClipModel)
    model = MODEL

    def __init__(self) -> None:
        info = self.model.info
        self.model_name = info.labels.get("mlflow_name", info.tag.name)
        self.model_version = info.labels.get("mlflow_version", "?")
        self.variant = info.labels.get("variant", "?")
        self.processor, self.classes = load_classifier(self.model, processor_only=True)

    def answer(self, probs: np.ndarray) -> dict:
        return {
            "label": self.classes[int(probs.argmax())],
            "probabilities": {
                c: round(float(p), 6) for c, p in zip(self.classes, probs, strict=True)
            },
            "model": self.model_name,
            "model_version": self.model_version,
        }

    def pixels(self, images: list) -> np.ndarray:
        return self.processor(images=images, return_tensors="np")["pixel_values"]

    async def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Ask the model service; retry what BentoML's internal client drops under load
        (a reset connection or an overloaded dispatcher), so a client never sees it."""
        import aiohttp
        from bentoml.exceptions import ServiceUnavailable

        for attempt in range(SETTINGS.internal_retries + 1):
            try:
                return await self.clip_model.to_async.probabilities(pixels)
            except (aiohttp.ClientError, ServiceUnavailable):
                if attempt == SETTINGS.internal_retries:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)  # let the batch queue drain
        raise AssertionError("unreachable")

    @bentoml.api(route="/classify")
    async def classify(self, image: Annotated[Path, ContentType("image/*")]) -> dict:
        """Classify one uploaded X-ray (multipart field `image`, PNG or JPEG, any mode)."""
        pil = check_image(Path(image).read_bytes())
        probs = await self.probabilities(self.pixels([pil]))
        return self.answer(probs[0])

    @bentoml.api(route="/classify_batch")
    async def classify_batch(
        self, images: list[Annotated[Path, ContentType("image/*")]]
    ) -> list[dict]:
        """Classify several uploads (repeated multipart field `images`), in order."""
        if not images:
            raise InvalidArgument("no images in the request (repeat the multipart field `images`)")
        if len(images) > SETTINGS.max_batch_images:
            raise InvalidArgument(
                f"{len(images)} images in one request; the limit is {SETTINGS.max_batch_images}"
            )
        pils = []
        for i, path in enumerate(images):
            try:
                pils.append(check_image(Path(path).read_bytes()))
            except InvalidArgument as err:
                raise InvalidArgument(f"image {i + 1} of {len(images)}: {err}") from err
        probs = await self.probabilities(self.pixels(pils))
        return [self.answer(p) for p in probs]

    @bentoml.api(route="/ready")
    def ready(self) -> dict:
        """Readiness: which model and version this service answers with."""
        return {"ready": True, "model": self.model_name, "model_version": self.model_version,
                "variant": self.variant, "classes": self.classes}


Pneumoclip.add_asgi_middleware(
    UploadGuard, fields={"/classify": "image", "/classify_batch": "images"},
    max_body=SETTINGS.max_request_bytes,
)
