"""Benchmark: does synthetic data help? The SD path and the ablation on the shared images.

    python benchmarks/augmentation.py --data ../shared/data

Makes a work copy of the project (dvc.yaml, the package source it depends on, the shipped
tiny bases, params.yaml with `prepare.data_dir` pointing at the data) and runs the real
pipeline there with `dvc repro`: no stage order is coded here. Prints test accuracy and
macro-F1 with 95% patient-bootstrap intervals per variant, per-class recall, the class
consistency of the synthetic images, the real-vs-synthetic AUROC and the wall time of each
stage (from the timestamps of DVC's "Running stage" lines), and writes the figures as JSON
to `--out`.

A rerun in the same work folder reuses what DVC finds up to date; `-S KEY=VALUE` changes a
param of the work copy first (as `dvc exp run -S` does), so only what depends on it reruns.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("NORMAL", "BACTERIA", "VIRUS")


def work_copy(work: Path, data: Path, params: Path, sets: list[str]) -> None:
    """The project's pipeline in `work`, as a DVC repo of its own, on `data`."""
    work.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copytree(ROOT / "src", work / "src", dirs_exist_ok=True)
    shutil.copytree(ROOT / "bases", work / "bases", dirs_exist_ok=True)
    raw = yaml.safe_load(params.read_text())
    raw["prepare"]["data_dir"] = str(data)
    for item in sets:  # a.b.c=value, the value parsed as YAML
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = yaml.safe_load(value)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if not (work / ".dvc").is_dir():
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=work, check=True)


def repro(work: Path) -> dict[str, float]:
    """`dvc repro` in the work copy; returns each stage's wall time in seconds."""
    log = open(work / "repro.log", "w")
    # the stages run the source copied into `work`, not an editable install's live checkout
    # (which may change while this runs): work/src goes first on the path
    path = os.pathsep.join(filter(None, [str(work / "src"), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(["dvc", "repro"], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=path))
    timings, current, started = {}, None, time.perf_counter()
    for line in proc.stdout:
        log.write(line)
        if line.startswith("Running stage '"):
            now = time.perf_counter()
            if current:
                timings[current] = now - started
            current, started = line.split("'")[1], now
            print(line.strip(), flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"dvc repro failed; see {work / 'repro.log'}")
    if current:
        timings[current] = time.perf_counter() - started
    return timings


def ci(metric: dict, key: str) -> str:
    low, high = metric[f"{key}_ci95"]
    return f"{metric[key]:.3f} [{low:.3f}, {high:.3f}]"


def variant_table(results: dict) -> str:
    """The variants' test figures, from the JSON this script writes."""
    lines = ["| variant | synthetic train images | test accuracy [95% CI] | "
             "test macro-F1 [95% CI] | recall NORMAL / BACTERIA / VIRUS | val macro-F1 |",
             "| --- | ---: | --- | --- | --- | ---: |"]
    for variant, metrics in results["variants"].items():
        test = metrics["test"]
        recall = " / ".join(f"{test['per_class'][c]['recall']:.2f}" for c in CLASSES)
        lines.append(f"| {variant} | {results['synthetic_images'].get(variant, 0):,} | "
                     f"{ci(test, 'accuracy')} | {ci(test, 'macro_f1')} | {recall} | "
                     f"{metrics['val']['macro_f1']:.3f} |")
    return "\n".join(lines)


def quality_table(results: dict) -> str:
    """The synthetic set's quality per class, from the JSON this script writes."""
    quality = results["synthetic"]
    lines = ["| synthetic class | drawn | class consistency | same judge on real val images "
             "| mean own-class prob | dropped by filter |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for cls, q in quality["per_class"].items():
        real = q.get("real_consistency")
        lines.append(f"| {cls} | {q['generated']:,} | {q['consistency']:.3f} | "
                     f"{'n/a' if real is None else f'{real:.3f}'} | "
                     f"{q['mean_own_prob']:.3f} | {q['dropped']} |")
    auroc = quality["two_sample_auroc"]
    lines += ["", f"Real-vs-synthetic AUROC: {auroc:.3f} (0.5: the `real` model's embeddings "
              "cannot tell them apart)." if auroc is not None else "AUROC: too few images."]
    seconds = results["stage_seconds"]
    if "sd_lora" in seconds and "synthesize" in seconds:
        lines.append(f"SD path (`sd_lora` + `synthesize`): "
                     f"{(seconds['sd_lora'] + seconds['synthesize']) / 60:.1f} min.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pneumoclip-augmentation"))
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("-S", "--set", dest="sets", action="append", default=[],
                        help="KEY=VALUE: change a param of the work copy (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/augmentation.json")
    args = parser.parse_args()
    work = args.work.resolve()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    work_copy(work, args.data.resolve(), args.params.resolve(), args.sets)
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    timings |= repro(work)  # stages DVC skipped keep the time of the run that built them
    from pneumoclip.pretrain import check_unseen  # the bases never saw this val or test

    check_unseen(work / "bases/tiny", work / "artifacts/prepared/index.csv")
    timings_file.write_text(json.dumps(timings, indent=2))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\nTiny CPU profile; peak RSS of any stage process: {peak:,.0f} MB\n")
    variants = yaml.safe_load((work / "params.yaml").read_text())["variants"]
    results = {
        "profile": "tiny CPU", "sets": args.sets,
        "variants": {v: json.loads((work / f"metrics/{v}/details.json").read_text())
                     for v in variants},
        "synthetic_images": {v: (json.loads((work / f"models/clip-lora/{v}/pneumoclip.json")
                                            .read_text()).get("synthetic") or {}).get("images", 0)
                             for v in variants},
        "synthetic": json.loads((work / "metrics/synthetic.json").read_text()),
        "stage_seconds": timings,
    }
    print(variant_table(results), quality_table(results), sep="\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {args.out}; sample grid: {work / 'artifacts/synthetic/grid.png'}")


if __name__ == "__main__":
    main()
