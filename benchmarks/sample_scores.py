"""Benchmark: the tiny profile's scores on the bundled sample, and their spread over seeds.

    python benchmarks/sample_scores.py [--seeds 0 1 2] [--work DIR]

Every variant's test scores (with 95% patient-bootstrap intervals), the pretrained base's
zero-shot row and the majority row come from the project's `metrics/`, the committed run of
the README's main command. Then `real` is trained and evaluated again with each seed
(`train_clip.seed`) on the same bases and split, each in its own project folder and MLflow
store, so the spread over seeds can be read next to the variants' differences. Writes
benchmarks/results/sample-scores.json and prints the tables (also rendered by
benchmarks/tables.py as "sample-scores" and "sample-seeds").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]
from augmentation import variant_table  # noqa: E402 - one table of variants
from conftest import project_params, sharing_project  # noqa: E402 - the tests' helpers

OUT = ROOT / "benchmarks/results/sample-scores.json"


def pneumoclip(*args: str, db: Path) -> None:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{db}", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-m", "pneumoclip.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pneumoclip {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def committed_run() -> dict:
    """metrics/VARIANT/details.json of the committed main-command run, per variant, and the
    synthetic images each variant added."""
    import yaml

    variants = yaml.safe_load((ROOT / "params.yaml").read_text())["variants"]
    kept = json.loads((ROOT / "metrics/synthetic.json").read_text())["kept"]  # a count
    return {"variants": {v: json.loads((ROOT / f"metrics/{v}/details.json").read_text())
                         for v in variants},
            "synthetic_images": {v: kept if not s["train_data"].endswith(".csv")
                                 else 0 for v, s in variants.items()}}


def seed_run(work: Path, seed: int) -> dict:
    """`real` trained and evaluated with `seed` on the bases and split built in `work`."""
    params = sharing_project(work, f"seed{seed}", train_clip={"seed": seed})
    db = work / f"seed{seed}.db"
    pneumoclip("train-clip", "--params", str(params), "--variant", "real", db=db)
    pneumoclip("evaluate", "--params", str(params), "--variant", "real", db=db)
    details = json.loads((params.parent / "metrics/real/details.json").read_text())
    val = json.loads((params.parent / "models/clip-lora/real/val_metrics.json").read_text())
    return {"seed": seed, "test": details["test"], "val_macro_f1": val["val_macro_f1"],
            "best_epoch": val["best_epoch"], "epochs_run": val["epochs_run"]}


def table(results: dict) -> str:
    """The variants' test figures (augmentation.py's table), then the reference rows."""
    first = next(iter(results["variants"].values()))
    z, m = first["zero_shot"], first["majority_baseline"]
    return "\n".join([
        variant_table(results),
        f"| zero-shot pretrained base, same prompts | | {z['accuracy']:.3f} | "
        f"{z['macro_f1']:.3f} | | |",
        f"| always {m['label']} | | {m['accuracy']:.3f} | | | |"])


def seeds_table(results: dict) -> str:
    lines = ["| `real`, train_clip.seed | test accuracy | test macro-F1 | val macro-F1 | "
             "best epoch / run |", "| --- | ---: | ---: | ---: | --- |"]
    for r in results["seeds"]:
        lines.append(f"| {r['seed']} | {r['test']['accuracy']:.3f} | "
                     f"{r['test']['macro_f1']:.3f} | {r['val_macro_f1']:.3f} | "
                     f"{r['best_epoch']} / {r['epochs_run']} |")
    accs = [r["test"]["accuracy"] for r in results["seeds"]]
    lines.append(f"| spread (max - min) | {max(accs) - min(accs):.3f} | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="pneumoclip-seeds-"))).resolve()
    params = project_params(work)  # the bases and the prepared sample, shared by the seeds
    pneumoclip("base-models", "--params", str(params), db=work / "mlflow.db")
    pneumoclip("prepare", "--params", str(params), db=work / "mlflow.db")
    results = {"profile": "tiny CPU", **committed_run(), "seeds": []}
    for seed in args.seeds:
        results["seeds"].append(seed_run(work, seed))
        print(f"seed {seed}: test accuracy {results['seeds'][-1]['test']['accuracy']:.3f}",
              flush=True)
    print(table(results), seeds_table(results), sep="\n\n")
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {OUT}")


if __name__ == "__main__":
    main()
