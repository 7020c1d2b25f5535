"""The Bento: serves the classifier that `models:/pneumoclip-classifier@champion` pointed to
when `pneumoclip bento build` pinned it (deploy/champion.json).

One BentoML service, `Pneumoclip`. The upload routes are answered by
`serving.UploadRoutes` before BentoML's own multipart handling: it reads only uploaded
files, each body once, admits requests by bytes in flight (503 + Retry-After past
`serve.max_in_flight_bytes`), and answers 4xx with a reason for anything it cannot read.
Decoding runs in `serve.decode_threads` threads; the model runs only the image tower (the
class text embeddings are computed once at start-up), and concurrent requests share forward
passes through an in-process micro-batcher. (BentoML's adaptive batching needs a second
service and an HTTP hop per request; on the tiny model that hop cost 3x the forward pass.
docs/serving.md has both.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.validators import ContentType

HERE = Path(__file__).resolve().parent
if (HERE / "src" / "pneumoclip").is_dir():  # inside the Bento or a checkout: use that code
    sys.path.insert(0, str(HERE / "src"))

from pneumoclip.classifier import ImageError, UnsupportedFormat, read_image  # noqa: E402
from pneumoclip.config import load_section  # noqa: E402
from pneumoclip.serving import (  # noqa: E402
    MicroBatcher,
    Refused,
    UploadRoutes,
    champion_model,
    load_classifier,
)

SETTINGS = load_section("serve", os.environ.get("PNEUMOCLIP_PARAMS", HERE / "params.yaml"))
MODEL = champion_model(SETTINGS, HERE)
ROUTES = {"/classify": ("image", False), "/classify_batch": ("images", True)}
RUNNING: dict[str, Pneumoclip] = {}  # this worker's service instance, for UploadRoutes


def check_image(raw: bytes):
    """Bytes of one upload to an RGB PIL image, or a refusal that says what is wrong:
    415 for a format other than PNG, JPEG or DICOM, 400 for anything else unreadable."""
    try:
        return read_image(raw, max_pixels=SETTINGS.max_pixels)
    except UnsupportedFormat as err:
        raise Refused(415, str(err)) from err
    except ImageError as err:
        raise Refused(400, str(err)) from err


@bentoml.service(name="pneumoclip", workers=SETTINGS.workers, traffic={"timeout": 60})
class Pneumoclip:
    model = MODEL

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import torch
        from prometheus_client import Histogram

        if SETTINGS.torch_threads:
            torch.set_num_threads(SETTINGS.torch_threads)
        info = self.model.info
        self.model_name = info.labels.get("mlflow_name", info.tag.name)
        self.model_version = info.labels.get("mlflow_version", "?")
        self.variant = info.labels.get("variant", "?")
        # the GPU Bento (deploy/bentofile-gpu.yaml) runs on the container's GPU
        self.device = torch.accelerator.current_accelerator() or torch.device("cpu")
        self.classifier = load_classifier(self.model, self.device)
        self.classes = self.classifier.classes
        self.decoders = ThreadPoolExecutor(SETTINGS.decode_threads, "decode")

        def forward(pixels: np.ndarray) -> np.ndarray:
            logits = self.classifier.logits_from_pixels(torch.from_numpy(pixels))
            return torch.softmax(logits, dim=-1).cpu().numpy()

        sizes = Histogram("pneumoclip_batch_size", "Images per forward pass of the micro-batcher",
                          buckets=(1, 2, 4, 8, 16, 32, 64))
        self.probabilities = MicroBatcher(forward, SETTINGS.max_batch_size, sizes.observe)
        RUNNING["service"] = self

    def answer(self, probs: np.ndarray) -> dict:
        return {
            "label": self.classes[int(probs.argmax())],
            "probabilities": {
                c: round(float(p), 6) for c, p in zip(self.classes, probs, strict=True)
            },
            "model": self.model_name,
            "model_version": self.model_version,
        }

    def adapted_answers(self, probs: np.ndarray) -> list[dict]:
        """The batch's answers under its own EM-estimated class shares, each carrying them
        as `priors` (a 400 when the batch is too small to estimate them)."""
        try:
            probs, priors = self.classifier.adapt_priors(probs)
        except ValueError as err:
            raise Refused(400, f"adapt_priors: {err}") from None
        shares = {c: round(float(p), 6) for c, p in zip(self.classes, priors, strict=True)}
        return [self.answer(p) | {"priors": shares} for p in probs]

    def pixels(self, raw: bytes, where: str) -> np.ndarray:
        """One upload to the model's input, in a decoder thread; the decoded image is
        dropped at once, so a worker holds at most `decode_threads` of them."""
        try:
            image = check_image(raw)
        except Refused as refused:
            raise Refused(refused.status, f"{where}{refused}") from None
        return self.classifier.pixel_values([image]).numpy()

    async def classify_files(self, files: list[bytes], many: bool, adapt_priors: bool = False):
        """The answer for the uploaded files of one request (UploadRoutes calls this)."""
        import asyncio

        if not files:
            raise Refused(400, "no images in the request (repeat the multipart field `images`)"
                          if many else "Field required: send the image as field `image`")
        if not many and len(files) > 1:
            raise Refused(400, f"{len(files)} files in field `image`: /classify takes one; "
                               "send several to /classify_batch as field `images`")
        if len(files) > SETTINGS.max_batch_images:
            raise Refused(400, f"{len(files)} images in one request; the limit is "
                               f"{SETTINGS.max_batch_images}")
        loop = asyncio.get_running_loop()
        pixels = []
        for i in range(len(files)):
            where = f"image {i + 1} of {len(files)}: " if many else ""
            pixels.append(await loop.run_in_executor(self.decoders, self.pixels, files[i], where))
            files[i] = b""  # the raw bytes are not needed any more
        probs = await self.probabilities(np.concatenate(pixels))
        answers = self.adapted_answers(probs) if adapt_priors else [self.answer(p) for p in probs]
        return answers if many else answers[0]

    # The two routes below are what the OpenAPI page shows; over HTTP, UploadRoutes answers
    # them (same fields, same answers) before BentoML's own multipart parsing.
    @bentoml.api(route="/classify")
    async def classify(self, image: Annotated[Path, ContentType("image/*")]) -> dict:
        """Classify one uploaded X-ray (multipart file field `image`: PNG, JPEG or DICOM)."""
        return await self.classify_files([Path(image).read_bytes()], many=False)

    @bentoml.api(route="/classify_batch")
    async def classify_batch(
        self, images: list[Annotated[Path, ContentType("image/*")]]
    ) -> list[dict]:
        """Classify several uploads (repeated multipart file field `images`), in order.
        `?adapt_priors=true`: the images are one batch from one source (at least 30); their
        probabilities are adjusted to the batch's EM-estimated class shares (`priors` in each
        answer). Off by default; docs/robustness.md says when to use it."""
        return await self.classify_files([Path(p).read_bytes() for p in images], many=True)

    @bentoml.api(route="/ready")
    def ready(self) -> dict:
        """Readiness: which model and version this service answers with."""
        return {"ready": True, "model": self.model_name, "model_version": self.model_version,
                "variant": self.variant, "classes": self.classes, "device": str(self.device)}


def running_handler():
    service = RUNNING.get("service")
    return service.classify_files if service else None


Pneumoclip.add_asgi_middleware(UploadRoutes, routes=ROUTES, handler=running_handler,
                               settings=SETTINGS)
