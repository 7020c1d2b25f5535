"""`evaluate@VARIANT` stage: test-split metrics, the zero-shot reference, plots, MLflow.

The test split is only ever reported here, never used to choose anything.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)
from tqdm import tqdm

from pneumoclip import tracking
from pneumoclip.classifier import ClipClassifier, read_image
from pneumoclip.config import EvaluateParams
from pneumoclip.distributed import processes
from pneumoclip.fsutil import atomic_write, write_json
from pneumoclip.prepare import read_index

# metrics/VARIANT.json holds the headline numbers, metrics/VARIANT/details.json everything
DETAILS = "details.json"


class EvaluateError(RuntimeError):
    """Evaluation cannot run (no trained model, no test rows)."""


# ---------------------------------------------------------------- metrics


def reliability_bins(y: np.ndarray, probs: np.ndarray, bins: int) -> list[dict]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (the ECE's terms,
    and the reliability diagram's points)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            out.append({"confidence": float(confidence[inside].mean()),
                        "accuracy": float(correct[inside].mean()), "count": int(inside.sum())})
    return out


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int) -> float:
    """Top-label ECE: mean |accuracy - confidence| over equal-width confidence bins."""
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(y, probs, bins)) / len(y))


def bootstrap_ci(
    y: np.ndarray, pred: np.ndarray, groups: list[str], n: int, seed: int
) -> dict[str, list[float]]:
    """95% intervals for accuracy and macro-F1, resampling whole patients (not images),
    since images of one child are not independent."""
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    members = [np.array(v) for v in by_group.values()]
    acc, f1 = [], []
    for _ in range(n):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        acc.append(accuracy_score(y[idx], pred[idx]))
        f1.append(f1_score(y[idx], pred[idx], average="macro", zero_division=0))
    return {
        "accuracy_ci95": [float(np.percentile(acc, 2.5)), float(np.percentile(acc, 97.5))],
        "macro_f1_ci95": [float(np.percentile(f1, 2.5)), float(np.percentile(f1, 97.5))],
    }


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, classes: list[str], groups: list[str],
    params: EvaluateParams,
) -> dict:
    pred = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    per_class = {}
    for i, name in enumerate(classes):
        positives = y == i
        auroc = (
            float(roc_auc_score(positives, probs[:, i]))
            if 0 < positives.sum() < len(y) else None
        )
        per_class[name] = {
            "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
            "auroc": auroc, "support": int(support[i]),
        }
    return {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "ece": expected_calibration_error(y, probs, params.ece_bins),
        **bootstrap_ci(y, pred, groups, params.bootstrap, params.seed),
        "per_class": per_class,
    }


# ---------------------------------------------------------------- plots


def write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write(path, buffer.getvalue())


def write_plots(out: Path, y: np.ndarray, probs: np.ndarray, classes: list[str], title: str,
                history: list[dict], bins: int):
    """DVC plot data (CSV: confusion, one ROC file per class, reliability, training curves)
    and the same figures as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    pred = probs.argmax(axis=1)
    write_csv(out / "confusion.csv", [{"actual": classes[a], "predicted": classes[p]}
                                      for a, p in zip(y, pred, strict=True)])
    shutil.rmtree(out / "roc", ignore_errors=True)
    curves = {}
    for i, name in enumerate(classes):
        if 0 < (y == i).sum() < len(y):
            fpr, tpr, _ = roc_curve(y == i, probs[:, i])
            curves[name] = (fpr, tpr, roc_auc_score(y == i, probs[:, i]))
            write_csv(out / "roc" / f"{name}.csv", [{"fpr": round(float(a), 5),
                                                     "tpr": round(float(b), 5)}
                                                    for a, b in zip(fpr, tpr, strict=True)])
    reliability = reliability_bins(y, probs, bins)
    write_csv(out / "reliability.csv", reliability)
    write_csv(out / "training.csv", history)

    matrix = confusion_matrix(y, pred, labels=list(range(len(classes))))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    ax = axes[0]
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=color)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="actual", title=f"{title}: confusion (test)")
    ax = axes[1]
    for name, (fpr, tpr, auroc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"{title}: one-vs-rest ROC (test)")
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[2]
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot([b["confidence"] for b in reliability], [b["accuracy"] for b in reliability], "o-")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"{title}: reliability (test)")
    fig.tight_layout()
    save_figure(fig, out / "test.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax.plot(epochs, [h["val_macro_f1"] for h in history], label="val macro-F1")
    ax.set(xlabel="epoch", title=f"{title}: training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "training.png")
    plt.close(fig)


def headline(metrics: dict) -> dict:
    """The few numbers `dvc metrics show` lists per variant; the rest is in details.json."""
    test = metrics["test"]
    return {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
            "balanced_accuracy": test["balanced_accuracy"],
            **{f"recall_{c}": m["recall"] for c, m in test["per_class"].items()},
            "val_macro_f1": metrics["val"]["macro_f1"]}


# ---------------------------------------------------------------- the stage


def load_images(paths: list[str], desc: str) -> list:
    return [read_image(p) for p in tqdm(paths, desc=desc, unit="img", disable=None)]


def zero_shot(params: EvaluateParams, prompts: dict, images: list, y: np.ndarray) -> dict:
    """The un-tuned base with the same prompts: the reference row."""
    from transformers import CLIPModel, CLIPProcessor

    base = CLIPModel.from_pretrained(params.base_dir).eval().to(processes().device)
    processor = CLIPProcessor.from_pretrained(params.base_dir)
    pred = ClipClassifier.from_parts(base, processor, prompts).predict_proba(images).argmax(1)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
    }


def evaluate_variant(params: EvaluateParams, variant: str) -> dict:
    model_dir = Path(params.models_dir) / variant
    if not (model_dir / "pneumoclip.json").is_file():
        raise EvaluateError(
            f"no trained model in {model_dir}; run `dvc repro train_clip@{variant}`"
        )
    classifier = ClipClassifier.load(model_dir, base_dir=params.base_dir).to(processes().device)
    classes = classifier.classes
    meta = json.loads((model_dir / "pneumoclip.json").read_text())
    rows = read_index(params.index)
    test = [r for r in rows if r["split"] == "test"]
    if not test:
        raise EvaluateError(f"{params.index} has no test rows")
    images = load_images([r["path"] for r in test], f"{variant}: test images")
    y = np.array([classes.index(r["label"]) for r in test])
    probs = classifier.predict_proba(images)
    adapted = {}
    if params.adapt_priors:
        try:
            probs, priors = classifier.adapt_priors(probs)
        except ValueError as err:
            raise EvaluateError(f"evaluate.adapt_priors: {err}") from err
        adapted = {"adapted_priors": dict(zip(classes, priors.tolist(), strict=True))}

    train_labels = [r["label"] for r in rows if r["split"] == "train"]
    majority = max(classes, key=train_labels.count)  # ties: the first class wins
    val = json.loads((model_dir / "val_metrics.json").read_text())
    metrics = {
        "variant": variant,
        "test": classification_metrics(y, probs, classes, [r["patient_id"] for r in test], params)
        | adapted,
        "val": {"accuracy": val["val_accuracy"], "macro_f1": val["val_macro_f1"]},
        "zero_shot": zero_shot(params, meta["prompts"], images, y),
        "majority_baseline": {
            "label": majority, "accuracy": float(np.mean(y == classes.index(majority)))
        },
    }
    out = Path(params.out_dir)
    write_plots(out / variant, y, probs, classes, variant, val["history"], params.ece_bins)
    write_json(out / variant / DETAILS, metrics)
    write_json(out / f"{variant}.json", headline(metrics))
    log_to_run(model_dir, variant, metrics, out, test)
    return metrics


def log_to_run(model_dir: Path, variant: str, metrics: dict, out: Path,
               test_rows: list[dict]) -> None:
    """Add the test metrics and plots to the variant's training run (or a new run if the
    store no longer has it, e.g. after switching MLFLOW_TRACKING_URI)."""
    mlflow = tracking.setup(tracking.CLASSIFIER_EXPERIMENT)
    run_file = model_dir / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
    try:
        if run_id:
            mlflow.get_run(run_id)
    except Exception:  # the store does not know this run
        run_id = None
    test = metrics["test"]
    flat = {f"test_{k}": v for k, v in test.items() if isinstance(v, float)}
    flat |= {f"test_recall_{c}": m["recall"] for c, m in test["per_class"].items()}
    flat |= {"zero_shot_accuracy": metrics["zero_shot"]["accuracy"],
             "zero_shot_macro_f1": metrics["zero_shot"]["macro_f1"]}
    tags = tracking.run_tags(f"evaluate@{variant}", variant)
    with mlflow.start_run(run_id=run_id, run_name=variant if not run_id else None,
                          tags=None if run_id else tags):
        mlflow.log_metrics(flat)
        tracking.log_dataset(mlflow, test_rows, "kermany-test", tracking.dvc_hash(), "testing")
        for name in (DETAILS, "test.png", "training.png"):
            mlflow.log_artifact(str(out / variant / name), "evaluation")
