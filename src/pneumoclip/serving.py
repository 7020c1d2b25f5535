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


# which BentoML model the Bento serves: written by `build_bento`, packed into the Bento
CHAMPION_FILE = Path("deploy/champion.json")


def build_bento(settings: ServeParams, bentofile: Path = Path("bentofile.yaml"),
                project: Path = Path(".")) -> str:
    """Import the champion, pin it in deploy/champion.json, then `bentoml build` with
    `bentofile`; returns the Bento tag."""
    from pneumoclip.fsutil import write_json

    model = import_champion(settings)
    write_json(project / CHAMPION_FILE, {
        "bento_model": str(model.tag), "mlflow_name": settings.model_name,
        "mlflow_version": model.info.labels["mlflow_version"], "alias": settings.alias,
    })
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "bentoml"), "build", "--output", "tag",
         "-f", str(bentofile), str(project)], capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise ServingError(f"bentoml build failed:\n{proc.stdout}\n{proc.stderr}")
    tag = proc.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    return f"{tag} (model {model.tag})"


def champion_model(settings: ServeParams, project: Path):
    """The BentoML model that `pneumoclip bento build` pinned (the version @champion named
    then), not the store's latest; fails fast, naming the alias, if it is absent."""
    import json

    import bentoml
    from bentoml.exceptions import NotFound

    name = settings.model_name.replace("_", "-")
    how = (f"import models:/{settings.model_name}@{settings.alias} with `pneumoclip bento "
           "build` (register a champion first with `dvc repro register`)")
    pinned = project / CHAMPION_FILE
    if not pinned.is_file():
        raise ServingError(f"no {pinned}, so no {name!r} model is pinned: {how}")
    tag = json.loads(pinned.read_text())["bento_model"]
    try:
        bentoml.models.get(tag)
    except NotFound as err:
        raise ServingError(f"no {name!r} model {tag} in the BentoML model store: {how}") from err
    return bentoml.models.BentoModel(tag)


def model_dir(bento_model) -> Path:
    """The classifier folder inside the imported MLflow model."""
    root = Path(bento_model.path) / "mlflow_model"
    flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
    return root / flavor["artifacts"][tracking.PYFUNC_ARTIFACT]["path"]


def load_classifier(bento_model, device, dtype=None):
    """The ClipClassifier on `device` (in `dtype`), with its class text embeddings computed
    once."""
    from pneumoclip.classifier import ClipClassifier

    return ClipClassifier.load(model_dir(bento_model)).to(device, dtype)


class MicroBatcher:
    """Greedy in-process batching: while one forward pass runs, new requests queue up, and
    the next pass takes them all (up to `max_batch` images). An idle model runs a request
    at once, so a lone client never waits for a batch to fill.

    `forward` (images array -> per-image rows) runs in a worker thread, one call at a time;
    torch releases the GIL, so the event loop keeps accepting requests meanwhile.
    """

    def __init__(self, forward, max_batch: int, observe=None) -> None:
        from collections import deque

        self.forward, self.max_batch = forward, max_batch
        self.observe = observe or (lambda size: None)  # each forward pass's batch size
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
                self.observe(size)
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


class Refused(Exception):
    """A request the service answers with a 4xx (or a 503) and a reason, never a 5xx."""

    def __init__(self, status: int, message: str, headers: tuple = ()) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers


# the content types a file part may declare; the bytes decide the format (PNG, JPEG, DICOM)
UPLOAD_TYPES = ("image/", "application/dicom", "application/octet-stream")


async def read_uploads(scope, receive, field: str, max_body: int, max_file: int) -> list[bytes]:
    """The files of a multipart/form-data body, parsed once as it streams in.

    Only uploaded files in `field` are taken: a text value (a URL, a path, a bare string), a
    part without a file name, another field or a body of another type is refused, so nothing
    is ever fetched. File names are not used (any length is fine). Each file's bytes are held
    once; past `max_body` or `max_file` the answer is 413 and the rest is not read.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header
    from starlette.datastructures import Headers

    headers = Headers(scope=scope)
    kind, options = parse_options_header(headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise Refused(415, f"send the image as a file in multipart/form-data field {field!r} "
                           f"(got {kind.decode('latin-1') or 'no content type'})")
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:
        raise Refused(413, f"request body over the limit of {max_body:,} bytes")

    files: list[bytes] = []
    part: dict = {}
    problems: list[Refused] = []

    def header_field(data, start, end):
        part["field"] = part.get("field", b"") + data[start:end]

    def header_value(data, start, end):
        part["value"] = part.get("value", b"") + data[start:end]

    def header_end():
        part.setdefault("headers", {})[part.pop("field", b"").lower()] = part.pop("value", b"")

    def headers_finished():
        disposition, params = parse_options_header(
            part["headers"].get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        ctype = part["headers"].get(b"content-type", b"").decode("latin-1").lower()
        if name != field:
            problems.append(Refused(400, f"unexpected multipart field {name!r}; "
                                         f"send the image as field {field!r}"))
        elif b"filename" not in params:
            problems.append(Refused(400, f"field {field!r} must be an uploaded file, not a "
                                         "text value (URLs and paths are never fetched)"))
        elif ctype and not ctype.startswith(UPLOAD_TYPES):
            problems.append(Refused(415, f"content type {ctype} is not accepted: send "
                                         "image/png, image/jpeg or application/dicom"))
        part["chunks"], part["size"] = [], 0

    def part_data(data, start, end):
        if problems:
            return
        part["size"] += end - start
        if part["size"] > max_file:
            problems.append(Refused(413, f"upload {len(files) + 1} is over the limit of "
                                         f"{max_file:,} bytes"))
            return
        part["chunks"].append(bytes(data[start:end]))

    def part_end():
        if not problems:
            files.append(b"".join(part["chunks"]))
        part.clear()

    parser = MultipartParser(boundary, {
        "on_header_field": header_field, "on_header_value": header_value,
        "on_header_end": header_end, "on_headers_finished": headers_finished,
        "on_part_data": part_data, "on_part_end": part_end,
    })
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "the client went away before the body was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        more = message.get("more_body", False)
        if size > max_body:
            raise Refused(413, f"request body over the limit of {max_body:,} bytes")
        try:
            parser.write(chunk)
        except Exception as err:  # python-multipart raises several types for broken bodies
            raise Refused(400, f"malformed multipart body: {err}") from err
        if problems:
            raise problems[0]
    try:
        parser.finalize()
    except Exception as err:
        raise Refused(400, f"malformed multipart body: {err}") from err
    return files


class UploadRoutes:
    """ASGI middleware that answers the upload routes itself, in front of BentoML.

    BentoML's own multipart handling fetches a URL sent as a text value of a file field, uses
    the file name in a temporary file's name, and holds a body several times over; here the
    body is parsed once (`read_uploads`), and `handler()(files, many)` (the service's) decodes
    off the event loop and runs the model.

    Admission: a request is let in only while the bodies in flight in this worker, counted
    at their declared length (`max_request_bytes` when undeclared), stay within
    `serve.max_in_flight_bytes`; past that the answer is 503 with Retry-After, before the
    body is read. Every refusal is a JSON {"error": reason} with a 4xx status or 503.
    """

    def __init__(self, app, routes: dict[str, tuple[str, bool]], handler, settings) -> None:
        self.app, self.routes, self.handler, self.settings = app, routes, handler, settings
        self.in_flight = 0  # bytes

    async def __call__(self, scope, receive, send) -> None:
        from starlette.datastructures import Headers

        if scope["type"] != "http" or scope["path"] not in self.routes:
            await self.app(scope, receive, send)
            return
        field, many = self.routes[scope["path"]]
        handle, limit = self.handler(), self.settings.max_request_bytes
        options = {}
        declared = Headers(scope=scope).get("content-length", "")
        cost = min(int(declared), limit) if declared.isdigit() else limit
        try:
            if scope["method"] != "POST":
                raise Refused(405, f"{scope['path']} takes POST", ((b"allow", b"POST"),))
            options = query_options(scope, many)
            if handle is None:
                raise Refused(503, "the model is still loading", ((b"retry-after", b"5"),))
            if self.in_flight and self.in_flight + cost > self.settings.max_in_flight_bytes:
                raise Refused(503, f"busy: {self.in_flight:,} bytes of requests in flight in "
                                   "this worker (serve.max_in_flight_bytes); retry shortly",
                              ((b"retry-after", b"1"),))
        except Refused as refused:
            await answer_refusal(send, refused)
            return
        self.in_flight += cost
        try:
            files = await read_uploads(scope, receive, field, limit, self.settings.max_bytes)
            body = await handle(files, many, **options)
        except Refused as refused:
            await answer_refusal(send, refused)
            return
        finally:
            self.in_flight -= cost
        await reply(send, 200, body)


def query_options(scope, many: bool) -> dict:
    """The upload routes' one query option, `adapt_priors=true|false` (batch route only);
    a 400 for anything else, so a typo is not silently ignored."""
    from urllib.parse import parse_qs

    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    unknown = sorted(set(query) - {"adapt_priors"})
    if unknown:
        raise Refused(400, f"unknown query parameter {unknown[0]!r}; the only one is "
                           "adapt_priors (on /classify_batch)")
    if not query:
        return {}
    value = query["adapt_priors"][-1].lower()
    if value not in ("true", "false", "1", "0"):
        raise Refused(400, f"adapt_priors={value!r}: use true or false")
    if not many and value in ("true", "1"):
        raise Refused(400, "adapt_priors needs a batch from one source: send the images to "
                           "/classify_batch")
    return {"adapt_priors": value in ("true", "1")}


REFUSALS = None


def count_refusal(status: int) -> None:
    """`pneumoclip_refused_total{status}` on /metrics."""
    global REFUSALS
    if REFUSALS is None:
        from prometheus_client import Counter

        REFUSALS = Counter("pneumoclip_refused", "Requests answered with a 4xx or 503",
                           ["status"])
    REFUSALS.labels(status=str(status)).inc()


async def answer_refusal(send, refused: Refused) -> None:
    count_refusal(refused.status)
    await reply(send, refused.status, {"error": str(refused)}, refused.headers)


async def reply(send, status: int, body, headers: tuple = ()) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})
