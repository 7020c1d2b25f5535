"""Benchmark: the default CPU profile on the full shared Kermany images.

    python benchmarks/classifier.py --data ../shared/data

Prepares patient-grouped train/val/test splits of the 5,206 images, installs the shipped
pretrained tiny bases (after checking that they were pretrained on this split's train part
only: `pneumoclip pretrain --splits train` made them from it), trains and evaluates every
classifier variant of params.yaml plus a plain small CNN trained from scratch on the same
split (the reference the CLIP path must meet or beat), and prints test accuracy and macro-F1
with 95% patient-bootstrap intervals, per-class recall, training wall time and peak memory.
Each model trains in its own process, so peak memory is its own.

    python benchmarks/classifier.py --params candidate.yaml --models real --name NAME

scores a candidate (its own params, e.g. a base of its own in `base_models.tiny_dir`) as one
named run in results/classifier-candidates.json, with what it changed from params.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pneumoclip.classifier import read_image
from pneumoclip.config import load_section, write_relocated
from pneumoclip.evaluate import classification_metrics
from pneumoclip.prepare import CLASSES, read_index
from pneumoclip.train_clip import augment, scores

ROOT = Path(__file__).resolve().parents[1]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(work: Path) -> None:
    """Prepare the split and install the pretrained tiny bases, after checking that they
    were pretrained on this split's train part only (never its val or test)."""
    from pneumoclip.base_models import build_base_models
    from pneumoclip.prepare import prepare, render_report
    from pneumoclip.pretrain import check_unseen

    params = work / "params.yaml"
    report = prepare(load_section("prepare", params))
    print(render_report(report).split("\nDuplicates")[0], flush=True)
    base = load_section("base_models", params)
    checked = check_unseen(base.tiny_dir, load_section("prepare", params).out_dir + "/index.csv")
    print(f"bases: {base.tiny_dir} saw none of the {checked} val and test images", flush=True)
    build_base_models(base)


def run_clip(variant: str, work: Path) -> dict:
    from pneumoclip.evaluate import evaluate_variant
    from pneumoclip.train_clip import train_variant

    params = work / "params.yaml"
    started = time.perf_counter()
    summary = train_variant(load_section("train_clip", params), load_section("variants", params),
                            variant)
    seconds = time.perf_counter() - started
    metrics = evaluate_variant(load_section("evaluate", params), variant)
    return {"name": f"CLIP LoRA {variant}", "test": metrics["test"], "seconds": seconds,
            "train_seconds": summary["train_seconds"], "val_macro_f1": summary["val_macro_f1"],
            "epochs": f"{summary['best_epoch']}/{summary['epochs_run']}",
            "zero_shot": metrics["zero_shot"], "majority": metrics["majority_baseline"],
            "peak_mb": peak_mb()}


# ---------------------------------------------------------------- the CNN reference


class SmallCNN(nn.Module):
    def __init__(self, classes: int, width: int = 16):
        super().__init__()
        layers, channels = [], 1
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(channels, classes))

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


BLACK = torch.tensor([-2.0])  # load_gray's value of a black pixel


def load_gray(rows: list[dict], size: int) -> torch.Tensor:
    arrays = [np.asarray(read_image(r["path"]).convert("L").resize((size, size))) for r in rows]
    x = torch.from_numpy(np.stack(arrays)).float().div(255).unsqueeze(1)
    return (x - 0.5) / 0.25


def run_cnn(work: Path, size: int = 64, epochs: int = 20) -> dict:
    cfg = load_section("train_clip", work / "params.yaml")
    evaluation = load_section("evaluate", work / "params.yaml")
    torch.manual_seed(cfg.seed)
    rows = read_index(cfg.index)
    split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    x = {s: load_gray(v, size) for s, v in split.items()}
    y = {s: torch.tensor([CLASSES.index(r["label"]) for r in v]) for s, v in split.items()}
    model = SmallCNN(len(CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, 2e-3, total_steps=epochs * ((len(y["train"]) + 63) // 64)
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state = -1.0, None
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y["train"]), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(augment(x["train"][idx], cfg.augment, gen,
                                                               black=BLACK)),
                                   y["train"][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            val = scores(y["val"].numpy(), model(x["val"]))
        print(f"cnn: epoch {epoch} val macro-F1 {val['macro_f1']:.3f}", flush=True)
        if val["macro_f1"] > best:
            best = val["macro_f1"]
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = time.perf_counter() - started
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(x["test"]), -1).numpy()
    test = classification_metrics(
        y["test"].numpy(), probs, list(CLASSES), [r["patient_id"] for r in split["test"]],
        evaluation,
    )
    return {"name": f"small CNN from scratch ({size} px)", "test": test, "seconds": seconds,
            "train_seconds": seconds, "val_macro_f1": best, "epochs": str(epochs),
            "peak_mb": peak_mb()}


# ---------------------------------------------------------------- report


def table(results: list[dict]) -> str:
    lines = [
        "| model | test accuracy [95% CI] | test macro-F1 [95% CI] | recall NORMAL / BACTERIA"
        " / VIRUS | val macro-F1 | train time | peak RSS |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        t = r["test"]
        recall = " / ".join(f"{t['per_class'][c]['recall']:.2f}" for c in CLASSES)
        lines.append(
            f"| {r['name']} | {t['accuracy']:.3f} [{t['accuracy_ci95'][0]:.3f}, "
            f"{t['accuracy_ci95'][1]:.3f}] | {t['macro_f1']:.3f} [{t['macro_f1_ci95'][0]:.3f}, "
            f"{t['macro_f1_ci95'][1]:.3f}] | {recall} | {r['val_macro_f1']:.3f} | "
            f"{r['train_seconds'] / 60:.1f} min | {r['peak_mb']:,.0f} MB |"
        )
    clip = [r for r in results if "zero_shot" in r]
    if clip:
        z, m = clip[0]["zero_shot"], clip[0]["majority"]
        lines.append(f"| zero-shot base, same prompts | {z['accuracy']:.3f} | "
                     f"{z['macro_f1']:.3f} | | | | |")
        lines.append(f"| always {m['label']} | {m['accuracy']:.3f} | | | | | |")
    return "\n".join(lines)


def changed_params(params: Path) -> dict[str, str]:
    """What `params` sets differently from the project's params.yaml, the bases' location
    aside: what a named candidate run is."""
    from pneumoclip.config import read_yaml
    from pneumoclip.tracking import flatten

    mine, project = (flatten(read_yaml(p)) for p in (params, ROOT / "params.yaml"))
    return {k: mine.get(k, "(unset)") for k in sorted(set(mine) | set(project))
            if mine.get(k) != project.get(k) and k != "base_models.tiny_dir"}


def candidates_table(runs: dict) -> str:
    """Markdown: one row per named run, its first CLIP variant's scores and what it changed."""
    lines = ["| candidate | changed from params.yaml | test macro-F1 [95% CI] | recall NORMAL / "
             "BACTERIA / VIRUS | zero-shot test macro-F1 | **val macro-F1** (picks) |",
             "| --- | --- | --- | --- | ---: | ---: |"]
    for name, run in runs.items():
        r = next(x for x in run["rows"] if "zero_shot" in x)
        t = r["test"]
        changed = ", ".join(f"`{k}={v}`".replace("|", "\\|")  # a regex's | splits cells
                            for k, v in run["changed"].items()) or "nothing"
        recall = " / ".join(f"{t['per_class'][c]['recall']:.2f}" for c in CLASSES)
        lines.append(f"| {name} | {changed} | {t['macro_f1']:.3f} [{t['macro_f1_ci95'][0]:.3f}, "
                     f"{t['macro_f1_ci95'][1]:.3f}] | {recall} | "
                     f"{r['zero_shot']['macro_f1']:.3f} | **{r['val_macro_f1']:.3f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pneumoclip-bench"))
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--models", nargs="*", default=None,
                        help="variants and/or cnn to (re)run; default: every variant and cnn")
    parser.add_argument("--name", help="store this run as one named candidate in --out "
                        "(default then: results/classifier-candidates.json), with the params "
                        "it changes from params.yaml; other names' runs are kept")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the rows are written as JSON (the docs' tables read it; "
                        "default: results/classifier.json)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one model, print JSON
    args = parser.parse_args()
    args.work = args.work.resolve()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.work}/mlflow.db")
    os.environ.setdefault("TQDM_MININTERVAL", "10")

    if args.one:
        result = run_cnn(args.work) if args.one == "cnn" else run_clip(args.one, args.work)
        print("RESULT " + json.dumps(result), flush=True)
        return

    # the project's params with every path under the work folder, on the given data; the
    # bases stay where they are (the shipped ones, or candidates named by an absolute path)
    write_relocated(args.work, args.params, prepare={"data_dir": str(args.data.resolve())},
                    base_models={"tiny_dir": str(ROOT / load_section("base_models",
                                                                     args.params).tiny_dir)})
    # variants on real images only; benchmarks/augmentation.py covers the synthetic ones
    variants = [name for name, v in load_section("variants", args.params).items()
                if v.train_data.endswith(".csv")]
    models = args.models or [*variants, "cnn"]
    results_file = args.work / "results.json"
    # a partial rerun (--models cnn) keeps the other rows of the same work folder
    results = {r["key"]: r for r in json.loads(results_file.read_text())} if (
        args.models and results_file.is_file()) else {}
    if not (args.models and (args.work / "artifacts/prepared/index.csv").is_file()):
        setup(args.work)
    for name in models:
        proc = subprocess.run(
            [sys.executable, __file__, "--work", str(args.work), "--one", name],
            stdout=subprocess.PIPE, text=True, check=True,
        )
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        results[name] = json.loads(line[len("RESULT "):]) | {"key": name}
        results_file.write_text(json.dumps(list(results.values()), indent=2))
        print(f"done: {name}", flush=True)
    results = [results[k] for k in [*variants, "cnn"] if k in results]
    print("\nTiny CPU profile (the shipped pretrained tiny bases), "
          f"{torch.get_num_threads()} threads, test split of {results[0]['test']['n']} images:\n")
    print(table(results))
    record = {"profile": "tiny CPU", "threads": torch.get_num_threads(), "rows": results}
    out = args.out or ROOT / "benchmarks/results" / (
        "classifier-candidates.json" if args.name else "classifier.json")
    if args.name:
        stored = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
        stored["runs"][args.name] = record | {"changed": changed_params(args.params)}
        record = stored
        print("\n" + candidates_table(stored["runs"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten: {out}" + (f" (run {args.name!r})" if args.name else ""))


if __name__ == "__main__":
    main()
