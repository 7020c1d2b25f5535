"""The Bento: serves the classifier that `models:/pneumoclip-classifier@champion` points to.

One BentoML service, `Pneumoclip`: it checks and decodes uploads, answers 4xx with a reason
for anything it cannot read, and runs only the image tower (the class text embeddings are
computed once at start-up). Concurrent requests share forward passes through an in-process
micro-batcher: while one pass runs, new requests queue, and the next pass takes them all.
(BentoML's adaptive batching needs a second service and an HTTP hop per request; on the
tiny model that hop cost 3x the forward pass. docs/serving.md has both.)

`pneumoclip bento build` imports the champion into the BentoML model store (labels keep the
MLflow name and version) and builds this Bento.
"""

from __future__ import annotations

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
from pneumoclip.serving import (  # noqa: E402
    MicroBatcher,
    UploadGuard,
    champion_model,
    load_classifier,
)

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


@bentoml.service(name="pneumoclip", workers=SETTINGS.workers, traffic={"timeout": 60})
class Pneumoclip:
    model = MODEL

    def __init__(self) -> None:
        import torch

        if SETTINGS.torch_threads:
            torch.set_num_threads(SETTINGS.torch_threads)
        info = self.model.info
        self.model_name = info.labels.get("mlflow_name", info.tag.name)
        self.model_version = info.labels.get("mlflow_version", "?")
        self.variant = info.labels.get("variant", "?")
        # the GPU Bento (deploy/bentofile-gpu.yaml) runs on the container's GPU
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.classifier = load_classifier(self.model, self.device)
        self.classes = self.classifier.classes

        def forward(pixels: np.ndarray) -> np.ndarray:
            logits = self.classifier.logits_from_pixels(torch.from_numpy(pixels).to(self.device))
            return torch.softmax(logits, dim=-1).cpu().numpy()

        self.probabilities = MicroBatcher(forward, SETTINGS.max_batch_size)

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
        return self.classifier.pixel_values(images).numpy()

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
                "variant": self.variant, "classes": self.classes, "device": self.device}


Pneumoclip.add_asgi_middleware(
    UploadGuard, fields={"/classify": "image", "/classify_batch": "images"},
    max_body=SETTINGS.max_request_bytes,
)
