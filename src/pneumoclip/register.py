"""`register` stage: register the best classifier in the MLflow Model Registry.

The best variant is chosen by validation macro-F1, never by test. The `champion` alias moves
to the new version only if it beats the current champion on that same validation metric
(a tie keeps the old one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pneumoclip import tracking
from pneumoclip.classifier import META_FILE
from pneumoclip.config import RegisterParams
from pneumoclip.evaluate import DETAILS

SELECTION_METRIC = "val_macro_f1"


class RegistryError(RuntimeError):
    """Nothing to register, or the registry is missing what was asked for."""


def candidates(params: RegisterParams) -> list[dict]:
    """Every trained variant with its validation and test metrics and its MLflow model."""
    found = []
    for variant in params.variants:
        folder = Path(params.models_dir) / variant
        try:
            val = json.loads((folder / "val_metrics.json").read_text())
            run = json.loads((folder / "mlflow_run.json").read_text())
        except FileNotFoundError as err:
            raise RegistryError(f"variant {variant}: {err.filename} is missing; "
                                f"run `dvc repro train_clip@{variant}`") from err
        test_file = Path(params.metrics_dir) / variant / DETAILS
        test = json.loads(test_file.read_text())["test"] if test_file.is_file() else {}
        synthetic = json.loads((folder / META_FILE).read_text()).get("synthetic") or {}
        found.append({"variant": variant, "val": val, "test": test, "run": run,
                      "synthetic_md5": synthetic.get("dvc_md5", "none"),
                      "synthetic_manifest_sha256": synthetic.get("manifest_sha256", "none")})
    if not found:
        raise RegistryError("register.variants is empty: nothing to register")
    return found


def version_tags(best: dict) -> dict[str, str]:
    val, test = best["val"], best["test"]
    tags = {
        "variant": best["variant"],
        SELECTION_METRIC: f"{val['val_macro_f1']:.6f}",
        "val_accuracy": f"{val['val_accuracy']:.6f}",
        "git_commit": tracking.git_commit(),
        "data_dvc_md5": tracking.dvc_hash(),
        "synthetic_dvc_md5": best.get("synthetic_md5", "none"),
        "synthetic_manifest_sha256": best.get("synthetic_manifest_sha256", "none"),
        "run_id": best["run"]["run_id"],
    }
    for key in ("accuracy", "macro_f1", "balanced_accuracy"):
        if key in test:
            tags[f"test_{key}"] = f"{test[key]:.6f}"
    return tags


def current_champion(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register(params: RegisterParams) -> dict:
    """Register the best variant; move the alias if it wins. Returns what happened."""
    from mlflow import MlflowClient

    mlflow = tracking.setup(tracking.CLASSIFIER_EXPERIMENT)
    client = MlflowClient()
    found = candidates(params)
    best = max(found, key=lambda c: c["val"]["val_macro_f1"])  # first wins a tie
    try:
        client.get_run(best["run"]["run_id"])
    except Exception as err:
        raise RegistryError(
            f"run {best['run']['run_id']} of variant {best['variant']} is not in the tracking "
            f"store {tracking.tracking_uri()} (it was logged to {best['run']['tracking_uri']}); "
            "retrain or set MLFLOW_TRACKING_URI"
        ) from err
    tags = version_tags(best)
    version = mlflow.register_model(best["run"]["model_uri"], params.model_name, tags=tags)
    for _ in range(60):  # a remote registry may still be copying files
        status = client.get_model_version(params.model_name, version.version).status
        if status == "READY":
            break
        time.sleep(1)
    old = current_champion(client, params.model_name, params.alias)
    new_score = float(tags[SELECTION_METRIC])  # as stored, so a rerun ties with itself
    old_score = float(old.tags.get(SELECTION_METRIC, "-inf")) if old else None
    promoted = old is None or new_score > old_score
    if promoted:
        client.set_registered_model_alias(params.model_name, params.alias, version.version)
        reason = (f"no {params.alias} yet" if old is None else
                  f"{SELECTION_METRIC} {new_score:.4f} beats version {old.version}'s "
                  f"{old_score:.4f}")
    else:
        reason = (f"{SELECTION_METRIC} {new_score:.4f} does not beat version {old.version}'s "
                  f"{old_score:.4f}; {params.alias} stays")
    result = {
        "model_name": params.model_name, "version": int(version.version),
        "variant": best["variant"], SELECTION_METRIC: new_score, "promoted": promoted,
        "alias": params.alias,
        "champion_version": int(version.version) if promoted else int(old.version),
        "reason": reason, "tracking_uri": tracking.tracking_uri(),
        "candidates": {c["variant"]: c["val"]["val_macro_f1"] for c in found},
    }
    out = Path(params.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def show(name: str) -> list[dict]:
    """Every version of the registered model, newest first, with aliases and metric tags."""
    from mlflow import MlflowClient

    tracking.setup(tracking.CLASSIFIER_EXPERIMENT)
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise RegistryError(f"no registered model {name!r} in {tracking.tracking_uri()}")
    aliases: dict[str, list[str]] = {}  # search results leave aliases out; ask the model
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        rows.append({
            "version": int(v.version), "aliases": ",".join(aliases.get(str(v.version), [])) or "-",
            "variant": v.tags.get("variant", "?"),
            SELECTION_METRIC: v.tags.get(SELECTION_METRIC, "?"),
            "test_accuracy": v.tags.get("test_accuracy", "?"),
            "test_macro_f1": v.tags.get("test_macro_f1", "?"),
            "git_commit": v.tags.get("git_commit", "?")[:12],
        })
    return rows
