"""Benchmark: does synthetic data help? The SD path and the ablation on the shared images.

    python benchmarks/augmentation.py --data ../shared/data

Runs the real stage commands (`pneumoclip ...`) with the project's params on the 5,206
shared images, in a work folder: prepare (patient-grouped train/val/test), base models,
`train_clip@real`, then the SD path (`sd_lora`, `synthesize`, timed together), then
`control` and `augmented`, and `evaluate` for all three. Prints test accuracy and macro-F1
with 95% patient-bootstrap intervals per variant, per-class recall, the class consistency of
the synthetic images, the real-vs-synthetic AUROC, wall time and peak memory per stage, and
writes `grid.png` (real next to synthetic, per class) into the work folder.

`--from STAGE` reuses the work folder's earlier results and runs from that stage on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("NORMAL", "BACTERIA", "VIRUS")
STAGES = [
    ("prepare", ["prepare"]),
    ("base_models", ["base-models"]),
    ("train_clip@real", ["train-clip", "--variant", "real"]),
    ("sd_lora", ["sd-lora"]),
    ("synthesize", ["synthesize"]),
    ("train_clip@control", ["train-clip", "--variant", "control"]),
    ("train_clip@augmented", ["train-clip", "--variant", "augmented"]),
    ("evaluate@real", ["evaluate", "--variant", "real"]),
    ("evaluate@control", ["evaluate", "--variant", "control"]),
    ("evaluate@augmented", ["evaluate", "--variant", "augmented"]),
]


def work_params(source: Path, data: Path, work: Path) -> Path:
    """The project's params with every path moved into the work folder."""
    raw = yaml.safe_load(source.read_text())
    index = str(work / "prepared/index.csv")
    base = work / "models/base"
    raw["base_models"]["out_dir"] = str(base)
    raw["prepare"] |= {"data_dir": str(data), "out_dir": str(work / "prepared")}
    raw["sd_lora"] |= {"base_dir": str(base / "sd"), "index": index,
                       "out_dir": str(work / "models/sd-lora"),
                       "checkpoint_dir": str(work / "checkpoints/sd_lora")}
    raw["synthesize"] |= {"base_dir": str(base / "sd"), "lora_dir": str(work / "models/sd-lora"),
                          "index": index, "classifier_dir": str(work / "models/clip-lora/real"),
                          "out_dir": str(work / "synthetic"),
                          "work_dir": str(work / "checkpoints/synthesize"),
                          "metrics": str(work / "metrics/synthetic.json")}
    raw["train_clip"] |= {"base_dir": str(base / "clip"), "index": index,
                          "out_dir": str(work / "models/clip-lora")}
    for variant in raw["train_clip"]["variants"].values():
        variant["train_data"] = index if variant["train_data"].endswith(".csv") else str(
            work / "synthetic")
    raw["evaluate"] |= {"models_dir": str(work / "models/clip-lora"), "index": index,
                        "base_dir": str(base / "clip"), "out_dir": str(work / "metrics")}
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_stage(name: str, args: list[str], params: Path, work: Path) -> dict:
    """One stage in its own process: wall time and that process's peak RSS."""
    log = open(work / "logs" / f"{name}.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen(["pneumoclip", *args, "--params", str(params)], cwd=work,
                            stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    log.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed; see {work / 'logs' / name}.log")
    print(f"{name}: {seconds / 60:.1f} min, peak {usage.ru_maxrss / 1024:,.0f} MB", flush=True)
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024}


def ci(metric: dict, key: str) -> str:
    low, high = metric[f"{key}_ci95"]
    return f"{metric[key]:.3f} [{low:.3f}, {high:.3f}]"


def report(work: Path, timings: dict) -> str:
    lines = ["| variant | train images (synthetic) | test accuracy [95% CI] | "
             "test macro-F1 [95% CI] | recall NORMAL / BACTERIA / VIRUS | val macro-F1 |",
             "| --- | ---: | --- | --- | --- | ---: |"]
    for variant in ("real", "control", "augmented"):
        metrics = json.loads((work / f"metrics/{variant}.json").read_text())
        meta = json.loads((work / f"models/clip-lora/{variant}/pneumoclip.json").read_text())
        test = metrics["test"]
        recall = " / ".join(f"{test['per_class'][c]['recall']:.2f}" for c in CLASSES)
        synthetic = (meta.get("synthetic") or {}).get("images", 0)
        lines.append(f"| {variant} | {synthetic} | {ci(test, 'accuracy')} | "
                     f"{ci(test, 'macro_f1')} | {recall} | {metrics['val']['macro_f1']:.3f} |")
    quality = json.loads((work / "metrics/synthetic.json").read_text())
    lines += ["", "| synthetic class | drawn | class consistency | same judge on real val images "
              "| mean own-class prob | dropped by filter |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for cls, q in quality["per_class"].items():
        real = q.get("real_consistency")
        lines.append(f"| {cls} | {q['generated']} | {q['consistency']:.3f} | "
                     f"{'n/a' if real is None else f'{real:.3f}'} | "
                     f"{q['mean_own_prob']:.3f} | {q['dropped']} |")
    auroc = quality["two_sample_auroc"]
    lines += ["", f"real-vs-synthetic AUROC (logistic regression on the real model's "
              f"embeddings, 5-fold): {auroc:.3f} (0.5 = indistinguishable)" if auroc is not None
              else "real-vs-synthetic AUROC: too few images"]
    sd = [timings[s] for s in ("sd_lora", "synthesize") if s in timings]
    if len(sd) == 2:
        lines.append(f"SD path (sd_lora + synthesize): {sum(t['seconds'] for t in sd) / 60:.1f}"
                     f" min, peak {max(t['peak_mb'] for t in sd):,.0f} MB")
    lines += ["", "| stage | wall time | peak RSS |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {t['seconds'] / 60:.1f} min | {t['peak_mb']:,.0f} MB |"
              for name, t in timings.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pneumoclip-augmentation"))
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--from", dest="start", choices=[s for s, _ in STAGES],
                        help="reuse the work folder's results before this stage")
    args = parser.parse_args()
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    os.environ.setdefault("TQDM_MININTERVAL", "30")
    params = work_params(args.params.resolve(), args.data.resolve(), work)
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text()) if args.start and timings_file.is_file() \
        else {}
    names = [s for s, _ in STAGES]
    first = names.index(args.start) if args.start else 0
    for name, cmd in STAGES[first:]:
        timings[name] = run_stage(name, cmd, params, work)
        timings_file.write_text(json.dumps(timings, indent=2))
    shutil.copyfile(work / "synthetic/grid.png", work / "grid.png")
    print("\nTiny CPU profile (random-init bases built offline, 2 cores):\n")
    print(report(work, timings))
    print(f"\nsample grid: {work / 'grid.png'}")


if __name__ == "__main__":
    main()
