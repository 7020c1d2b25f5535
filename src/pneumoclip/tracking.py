"""MLflow: where runs go, how they are tagged, and the classifier as an `mlflow.pyfunc` model."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow.pyfunc
import pandas as pd
import yaml

DEFAULT_URI = "sqlite:///mlflow.db"
CLASSIFIER_EXPERIMENT = "pneumoclip-classifier"
# MLflow 3's experiment kind: model training, so the UI opens an experiment on its runs table
# (not on the GenAI traces overview it guesses for an experiment without the tag)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PYFUNC_ARTIFACT = "model_dir"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store in the working directory.

    A user and password in an http(s) URI move to MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD, where MLflow's client reads them, and leave the URI (MLflow
    prints the URI in its "View run" lines). A database URI keeps them (its driver needs
    them): whatever is written or printed uses `public_uri`.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username or ""))
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password or ""))
        uri = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        os.environ["MLFLOW_TRACKING_URI"] = uri  # for MLflow and every child process
    return uri


SECRET_QUERY_KEYS = {"password", "passwd", "pwd", "token", "access_token", "secret"}


def public_uri(uri: str | None = None) -> str:
    """A tracking URI fit for files, tags and logs: no user, password or secret query value."""
    uri = tracking_uri() if uri is None else uri
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(
        f"{key}=***" if key.lower() in SECRET_QUERY_KEYS else f"{key}={value}" if sep else key
        for key, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    if (netloc, query) == (parts.netloc, parts.query):
        return uri
    authority = "//" if uri.startswith(f"{parts.scheme}://") else ""  # sqlite:///, postgresql:///
    return (f"{parts.scheme}:{authority}{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def setup(experiment: str):
    """Point mlflow at the store and experiment; returns the mlflow module."""
    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None
        if tracking_uri().startswith("sqlite:"):  # keep artifacts beside the store
            location = Path("mlartifacts").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_KIND)
    found = mlflow.set_experiment(experiment)
    for key, value in EXPERIMENT_KIND.items():  # experiments made before the tag existed
        if found.tags.get(key) != value:
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, key, value)
    return mlflow


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_hash(dvc_file: str | Path = "data.dvc") -> str:
    """The md5 DVC recorded for a tracked folder (what `dvc status` compares against)."""
    try:
        outs = yaml.safe_load(Path(dvc_file).read_text())["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError):
        return "untracked"


def dvc_out_hash(path: str | Path, lock: str | Path = "dvc.lock") -> str:
    """The md5 dvc.lock records for a stage output (a synthetic set, say), or 'untracked'."""
    try:
        stages = yaml.safe_load(Path(lock).read_text())["stages"]
    except (OSError, KeyError, TypeError):
        return "untracked"
    wanted = Path(path).as_posix().rstrip("/")
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path", "").rstrip("/") == wanted:
                return str(out.get("md5", "untracked"))
    return "untracked"


def log_dataset(mlflow, rows: list[dict], name: str, digest: str, context: str) -> None:
    """Log image rows (path, label, ...) as the active run's dataset input, so that the UI's
    Dataset column names what the run trained or was tested on. The digest is the DVC md5
    that versions the images, so equal digests mean the same images in both tools."""
    import mlflow.data

    frame = pd.DataFrame(rows)[["path", "label"]]
    folder = os.path.commonpath([str(Path(p).resolve()) for p in frame["path"]])
    digest = None if digest == "untracked" else digest.removesuffix(".dir")
    with warnings.catch_warnings():  # MLflow registers its local source twice, then warns
        warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=folder, name=name, digest=digest,
                                          targets="label")
    mlflow.log_input(dataset, context=context)


def run_tags(stage: str, variant: str | None = None) -> dict[str, str]:
    import getpass

    tags = {"git_commit": git_commit(), "dvc_stage": stage, "data_dvc_md5": dvc_hash(),
            # the machine's login, not MLflow's default of the tracking server's user name
            "mlflow.user": getpass.getuser()}
    if variant:
        tags["variant"] = variant
    if os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run`: the same name in both UIs
        tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
    return tags


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}, for mlflow.log_params."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): json.dumps(data) if isinstance(data, list) else str(data)}


# ---------------------------------------------------------------- the pyfunc model


class PneumoclipModel(mlflow.pyfunc.PythonModel):
    """mlflow.pyfunc model: a DataFrame with an `image` column of encoded image bytes in;
    one row per image out, with `label` and `prob_<CLASS>` columns.

    The logged pickle holds only a reference to this class. It and `pneumoclip.classifier`
    import from the package source that the model carries (see `log_classifier`), so the
    model loads where pneumoclip is not installed.
    """

    def load_context(self, context) -> None:
        from pneumoclip.classifier import ClipClassifier

        self.classifier = ClipClassifier.load(context.artifacts[PYFUNC_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from pneumoclip.classifier import read_image

        images = [read_image(bytes(b)) for b in model_input["image"]]
        probs = self.classifier.predict_proba(images)
        classes = self.classifier.classes
        out = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])
        out.insert(0, "label", [classes[i] for i in probs.argmax(axis=1)])
        return out


def log_classifier(mlflow, model_dir: Path, example_image: bytes, classes: list[str]):
    """Log models/clip-lora/VARIANT as a self-contained pyfunc model; returns its model info.

    Self-contained: it loads and predicts with no network and without pneumoclip installed,
    so a Bento or container built from it starts offline.

    - The base travels: its `save_pretrained` folder (`meta["base"]`, models/base/clip) is
      copied into the bundle's `base/` for every base, tiny or hub, and ClipClassifier.load
      prefers `model_dir/base` to the recorded path or hub id. The cost is the base's size
      in every logged version: about 1 MB for the tiny base, 1.7 GB for CLIP ViT-L/14.
    - The code travels: `code_paths` carries the pneumoclip package source as the model's
      `code/pneumoclip`. `mlflow.pyfunc.load_model` puts the model's `code/` first on
      sys.path before it unpickles the python model, so PneumoclipModel and
      pneumoclip.classifier import from that copy. `requirements()` pins the third-party
      packages the carried code imports.

    Why `code_paths` and not models-from-code: a models-from-code script would still import
    pneumoclip.classifier, so it would need `code_paths` as well; the pickled model here is
    a bare class reference (no state), and the bundle stays the `model_dir` artifact whose
    layout `serving.model_dir` reads inside a Bento.
    """
    import sys

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from pneumoclip.classifier import META_FILE

    meta = json.loads((model_dir / META_FILE).read_text())
    base = Path(meta["base"])
    if not base.is_dir():
        raise FileNotFoundError(
            f"the base {base} of {model_dir} is gone, and a logged model carries its base; "
            "rebuild it with `dvc repro base_models`"
        )
    package = Path(__file__).resolve().parent  # src/pneumoclip, carried as code/pneumoclip

    def link_or_copy(src: str, dst: str) -> str:  # no second copy of a 1.7 GB base on disk
        try:
            os.link(src, dst)
            return dst
        except OSError:
            return shutil.copy2(src, dst)

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "classifier"
        shutil.copytree(model_dir, bundle, ignore=shutil.ignore_patterns("mlflow_run.json"),
                        copy_function=link_or_copy)
        if not (bundle / "base").is_dir():
            shutil.copytree(base, bundle / "base", copy_function=link_or_copy)
        signature = ModelSignature(
            inputs=Schema([ColSpec("binary", "image")]),
            outputs=Schema(
                [ColSpec("string", "label")] + [ColSpec("double", f"prob_{c}") for c in classes]
            ),
        )
        path = list(sys.path)
        try:
            return mlflow.pyfunc.log_model(
                name="classifier",
                python_model=PneumoclipModel(),
                artifacts={PYFUNC_ARTIFACT: str(bundle)},
                code_paths=[str(package)],
                signature=signature,
                input_example=pd.DataFrame({"image": [example_image]}),
                pip_requirements=requirements(),
            )
        finally:  # log_model loads the model to check the example, which leaves the saved
            sys.path[:] = path  # copy's code/ (a deleted temp folder) first on sys.path


def requirements() -> list[str]:
    """The serving requirements, pinned to what is installed (no slow env inference).

    They are what the carried code (classifier.py and this file) imports when the model
    loads and predicts: the modules' top-level imports, ClipClassifier.load (peft,
    transformers) and read_image (pydicom, for DICOM); tests/test_portable_model.py checks
    them against those imports. pneumoclip is not among them: the model carries its source
    (`log_classifier`).
    """
    from importlib.metadata import version

    names = ["torch", "transformers", "peft", "pillow", "pandas", "numpy", "mlflow", "pyyaml",
             "pydicom"]
    return [f"{n}=={version(n).split('+')[0]}" for n in names]


def image_bytes(path: str | Path) -> bytes:
    """PNG bytes of an image file, as the pyfunc model and the service take them."""
    from PIL import Image

    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
