"""Serving glue: import the @champion from MLflow into BentoML, build and load the Bento."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from pneumoclip import tracking
from pneumoclip.config import ServeParams


class ServingError(RuntimeError):
    """No champion to serve, or the Bento cannot be built."""


def champion_version(settings: ServeParams):
    """The MLflow model version that the alias points to; fails naming the alias."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking.setup(tracking.CLASSIFIER_EXPERIMENT)
    try:
        return MlflowClient().get_model_version_by_alias(settings.model_name, settings.alias)
    except MlflowException as err:
        raise ServingError(
            f"no @{settings.alias} for registered model {settings.model_name!r} in "
            f"{tracking.public_uri()}: run `dvc repro register` first ({err.message})"
        ) from err


def import_champion(settings: ServeParams):
    """Copy models:/NAME@ALIAS into the BentoML model store; labels keep the MLflow version."""
    import bentoml

    version = champion_version(settings)
    uri = f"models:/{settings.model_name}/{version.version}"
    return bentoml.mlflow.import_model(
        settings.model_name.replace("_", "-"), uri,
        labels={"mlflow_name": settings.model_name, "mlflow_version": str(version.version),
                "variant": version.tags.get("variant", "?"), "alias": settings.alias},
        metadata={"mlflow_uri": uri, "tracking_uri": tracking.public_uri(),
                  "val_macro_f1": version.tags.get("val_macro_f1", "?")},
    )


def build_bento(settings: ServeParams, bentofile: Path = Path("bentofile.yaml"),
                project: Path = Path(".")) -> str:
    """Import the champion, then `bentoml build` with `bentofile`; returns the Bento tag."""
    model = import_champion(settings)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "bentoml"), "build", "--output", "tag",
         "-f", str(bentofile), str(project)], capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise ServingError(f"bentoml build failed:\n{proc.stdout}\n{proc.stderr}")
    tag = proc.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    return f"{tag} (model {model.tag})"


def champion_model(settings: ServeParams):
    """The BentoML model the service serves; fails fast, naming the alias, if absent."""
    import bentoml
    from bentoml.exceptions import NotFound

    name = settings.model_name.replace("_", "-")
    try:
        bentoml.models.get(f"{name}:latest")
    except NotFound as err:
        raise ServingError(
            f"no {name!r} in the BentoML model store: import models:/{settings.model_name}"
            f"@{settings.alias} with `pneumoclip bento build` (register a champion first with "
            "`dvc repro register`)"
        ) from err
    return bentoml.models.BentoModel(f"{name}:latest")


def model_dir(bento_model) -> Path:
    """The classifier folder inside the imported MLflow model."""
    root = Path(bento_model.path) / "mlflow_model"
    flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
    return root / flavor["artifacts"][tracking.PYFUNC_ARTIFACT]["path"]


def load_classifier(bento_model, device: str = "cpu"):
    """The ClipClassifier on `device`, with its class text embeddings computed once."""
    from pneumoclip.classifier import ClipClassifier

    classifier = ClipClassifier.load(model_dir(bento_model))
    classifier.clip.to(device)
    classifier.text_embeds = classifier.text_embeds.to(device)
    return classifier


class MicroBatcher:
    """Greedy in-process batching: while one forward pass runs, new requests queue up, and
    the next pass takes them all (up to `max_batch` images). An idle model runs a request
    at once, so a lone client never waits for a batch to fill.

    `forward` (images array -> per-image rows) runs in a worker thread, one call at a time;
    torch releases the GIL, so the event loop keeps accepting requests meanwhile.
    """

    def __init__(self, forward, max_batch: int) -> None:
        from collections import deque

        self.forward, self.max_batch = forward, max_batch
        self.pending: deque[tuple[object, object]] = deque()  # (array, future)
        self.running = False

    async def __call__(self, pixels):
        import asyncio

        future = asyncio.get_running_loop().create_future()
        self.pending.append((pixels, future))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self.drain())
        return await future

    async def drain(self) -> None:
        import asyncio

        import numpy as np

        try:
            while self.pending:
                batch, size = [], 0
                while self.pending and (not batch or size + len(self.pending[0][0])
                                        <= self.max_batch):
                    batch.append(self.pending.popleft())
                    size += len(batch[-1][0])
                try:
                    out = await asyncio.to_thread(
                        self.forward, np.concatenate([x for x, _ in batch]))
                except Exception as err:  # every caller of this batch gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                start = 0
                for x, future in batch:
                    if not future.done():  # a caller that went away is skipped
                        future.set_result(out[start : start + len(x)])
                    start += len(x)
        finally:
            self.running = False


class UploadGuard:
    """ASGI middleware in front of the upload routes: a bounded body (413 past the limit)
    and only the expected multipart field (400 otherwise). BentoML itself answers an
    unexpected binary field with a 500, so this check runs first."""

    def __init__(self, app, fields: dict[str, str], max_body: int) -> None:
        self.app, self.fields, self.max_body = app, fields, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.fields:
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                await reply(send, 413, f"request body over the limit of {self.max_body:,} bytes")
                return
        body = b"".join(chunks)
        problem = await self.check_fields(scope, body)
        if problem:
            await reply(send, 400, problem)
            return
        replayed = False

        async def receive_again():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, receive_again, send)

    async def check_fields(self, scope, body: bytes) -> str | None:
        from starlette.datastructures import Headers
        from starlette.requests import Request

        if not Headers(scope=scope).get("content-type", "").startswith("multipart/form-data"):
            return None  # BentoML answers other bodies with its own 400
        expected = self.fields[scope["path"]]

        async def once():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(scope, once).form()
        except Exception as err:  # a malformed multipart body
            return f"malformed multipart body: {err}"
        unknown = sorted(set(form.keys()) - {expected})
        await form.close()
        if unknown:
            return (f"unexpected multipart field {unknown[0]!r}; "
                    f"send the image as field {expected!r}")
        return None


async def reply(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
