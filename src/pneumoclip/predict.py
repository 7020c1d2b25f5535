"""`pneumoclip predict`: classify image files with a trained folder or an MLflow model."""

from __future__ import annotations

from pathlib import Path

import yaml

from pneumoclip.classifier import ClipClassifier, ImageError, read_image

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:", "file:")


def load(model_ref: str) -> ClipClassifier:
    """A models/clip-lora/VARIANT folder, or an MLflow model URI (downloaded first)."""
    if model_ref.startswith(MLFLOW_SCHEMES):
        import mlflow

        from pneumoclip import tracking
        from pneumoclip.tracking import PYFUNC_ARTIFACT

        mlflow.set_tracking_uri(tracking.tracking_uri())
        local = Path(mlflow.artifacts.download_artifacts(model_ref))
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        return ClipClassifier.load(local / flavor["artifacts"][PYFUNC_ARTIFACT]["path"])
    if not Path(model_ref).is_dir():
        raise ValueError(f"no such model folder {model_ref}")
    return ClipClassifier.load(model_ref)


def predict_files(paths: list[str], model: str | ClipClassifier,
                  adapt_priors: bool = False) -> list[dict]:
    """One result per path, in order: label and probabilities, or an error message. With
    `adapt_priors`, the readable images are one batch from one source: their probabilities
    are re-estimated under the batch's class shares (pneumoclip.priors), which each result
    carries as `priors`. `model`: a loaded classifier, or what `load` takes."""
    classifier = load(model) if isinstance(model, str) else model
    images, results = [], []
    for path in paths:
        try:
            images.append(read_image(path))
            results.append({"file": path})
        except ImageError as err:
            results.append({"file": path, "error": str(err)})
    ok = [r for r in results if "error" not in r]
    for row, prediction in zip(ok, classifier.predict(images, adapt_priors), strict=True):
        row.update(prediction)
    return results
