"""`register` stage: register the best classifier in the MLflow Model Registry.

The best variant is chosen by validation macro-F1, never by test. Then `@champion` is set to
the best eligible version in the registry, by the same validation metric, where eligible means:
a finite score (NaN never wins and never blocks), validated on the same data (the
`data_dvc_md5` tag; scores on other data are not comparable, so a champion validated on other
data is replaced by the best version on this data, and the log and registry.json say so), and
not tagged `champion_eligible=false` (how to retire a version). A tie goes to the older version.

Promotion cannot be raced: each run sets the alias to the best it sees, then reads the
registry again until the alias is the best there; two concurrent runs end with the better
version as champion (every version is registered before its run first reads).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from pneumoclip import tracking
from pneumoclip.classifier import META_FILE
from pneumoclip.config import RegisterParams
from pneumoclip.evaluate import DETAILS
from pneumoclip.fsutil import write_json

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


def score(version) -> float:
    """A version's stored validation score; NaN where missing or unreadable."""
    try:
        return float(version.tags.get(SELECTION_METRIC, "nan"))
    except ValueError:
        return math.nan


def best_version(client, name: str, data_md5: str):
    """The best eligible version of `name` on the validation data `data_md5` (module doc)."""
    eligible = [v for v in client.search_model_versions(f"name = '{name}'")
                if math.isfinite(score(v)) and v.tags.get("data_dvc_md5") == data_md5
                and v.tags.get("champion_eligible", "true") != "false"]
    return min(eligible, key=lambda v: (-score(v), int(v.version)), default=None)


def promote(client, name: str, alias: str, data_md5: str, attempts: int = 20):
    """Point `alias` at the best eligible version; repeat until a fresh read agrees."""
    for _ in range(attempts):
        best = best_version(client, name, data_md5)
        champion = current_champion(client, name, alias)
        if best is None or (champion is not None and champion.version == best.version):
            return best
        client.set_registered_model_alias(name, alias, best.version)
    raise RegistryError(f"@{alias} of {name} kept moving under {attempts} promotions; "
                        "is another register running in a loop?")


def rule_applied(old, new_version, new_score: float, winner, data_md5: str,
                 alias: str) -> str:
    if old is None:
        return f"no {alias} yet"
    old_score = score(old)
    if old.tags.get("data_dvc_md5") != data_md5:
        return (f"{alias} version {old.version} was validated on other data "
                f"({old.tags.get('data_dvc_md5', 'untagged')}, this run {data_md5}): its "
                f"{SELECTION_METRIC} is not comparable, so {alias} is the best version on "
                f"this data, version {winner.version} ({score(winner):.4f})")
    if not math.isfinite(old_score):
        return (f"{alias} version {old.version} has no finite {SELECTION_METRIC}; "
                f"version {winner.version} ({score(winner):.4f}) takes it")
    if winner.version == new_version:
        return (f"{SELECTION_METRIC} {new_score:.4f} beats version {old.version}'s "
                f"{old_score:.4f}")
    if winner.version == old.version:
        return (f"{SELECTION_METRIC} {new_score:.4f} does not beat version {old.version}'s "
                f"{old_score:.4f}; {alias} stays")
    return (f"version {winner.version} ({score(winner):.4f}) is the best version on this "
            f"data; {alias} moves there from version {old.version} ({old_score:.4f})")


def register(params: RegisterParams) -> dict:
    """Register the best variant; move the alias if it wins. Returns what happened."""
    from mlflow import MlflowClient

    mlflow = tracking.setup(tracking.CLASSIFIER_EXPERIMENT)
    client = MlflowClient()
    found = candidates(params)
    finite = [c for c in found if math.isfinite(c["val"]["val_macro_f1"])]
    if not finite:
        raise RegistryError("no variant has a finite val_macro_f1: "
                            + ", ".join(f"{c['variant']} {c['val']['val_macro_f1']}"
                                        for c in found))
    best = max(finite, key=lambda c: c["val"]["val_macro_f1"])  # first wins a tie
    try:
        client.get_run(best["run"]["run_id"])
    except Exception as err:
        raise RegistryError(
            f"run {best['run']['run_id']} of variant {best['variant']} is not in the tracking "
            f"store {tracking.public_uri()} (it was logged to "
            f"{tracking.public_uri(best['run']['tracking_uri'])}); retrain or set "
            "MLFLOW_TRACKING_URI"
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
    winner = promote(client, params.model_name, params.alias, tags["data_dvc_md5"])
    result = {
        "model_name": params.model_name, "version": int(version.version),
        "variant": best["variant"], SELECTION_METRIC: new_score,
        "promoted": winner.version == version.version, "alias": params.alias,
        "champion_version": int(winner.version),
        "reason": rule_applied(old, version.version, new_score, winner, tags["data_dvc_md5"],
                               params.alias),
        "data_dvc_md5": tags["data_dvc_md5"], "tracking_uri": tracking.public_uri(),
        "candidates": {c["variant"]: c["val"]["val_macro_f1"] for c in found},
    }
    write_json(params.out, result)
    return result


def show(name: str) -> list[dict]:
    """Every version of the registered model, newest first, with aliases and metric tags."""
    from mlflow import MlflowClient

    tracking.setup(tracking.CLASSIFIER_EXPERIMENT)
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise RegistryError(f"no registered model {name!r} in {tracking.public_uri()}")
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
