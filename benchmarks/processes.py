"""Benchmark: train_clip and sd_lora on 1 process against 2 processes at the same global batch.

    python benchmarks/processes.py [--sd-scale 0.1] [--work DIR]

On the bundled sample, in a temporary work folder: the tiny bases are built and the sample
prepared once; then `train_clip@real` runs with params.yaml's own `train_clip` section on 1
process at its `batch_size` (32) and on 2 processes (torchrun, accelerate MULTI_CPU over
gloo) at half of it each, and `sd_lora` the same at 64 and 32 each. The full default sd_lora
is scaled by `--sd-scale` (its `epochs`; samples off); the scale is recorded.

Each launcher runs with its natural thread setting, as a user gets it: torchrun sets
OMP_NUM_THREADS=1 per process, a plain process keeps torch's default (every core). Each run
has its own MLflow SQLite store. Records wall seconds, the stage's own `train_seconds`, the
best validation macro-F1 (train_clip) or final losses (sd_lora), and the largest absolute
difference between the 1- and 2-process adapter weights. Writes
benchmarks/results/processes.json and prints the table (`table(results)`, also rendered by
benchmarks/tables.py as "processes").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import sharing_project  # noqa: E402 - the tests' project helper, shared

OUT = ROOT / "benchmarks/results/processes.json"

ONE = [sys.executable, "-m", "pneumoclip.cli"]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
       "-m", "pneumoclip.cli"]
LAUNCHERS = {1: ONE, 2: TWO}
THREAD_PROBE = "import torch; print(torch.get_num_threads())"


def natural_env(db: Path | None = None) -> dict:
    """The caller's environment without a thread setting, so each launcher uses its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_MININTERVAL": "30",
            "TQDM_DISABLE": "1"}
    if db is not None:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    return env


def stage(launcher: list[str], params: Path, *args: str, db: Path, log: Path,
          threads: int | None = None) -> float:
    """Run one stage command; its wall seconds. The output goes to `log`. `threads` sets
    OMP_NUM_THREADS (the control run); None leaves the launcher's own setting."""
    env = natural_env(db) | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    started = time.perf_counter()
    proc = subprocess.run([*launcher, *args, "--params", str(params)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    return seconds


def threads(n: int) -> list[int]:
    """torch.get_num_threads() in each process a launcher starts (its natural setting)."""
    cmd = ([sys.executable, "-c", THREAD_PROBE] if n == 1 else
           [*TWO[:-2], "--no-python", sys.executable, "-c", THREAD_PROBE])
    proc = subprocess.run(cmd, cwd=ROOT, env=natural_env(), capture_output=True, text=True,
                          timeout=300)
    return [int(line) for line in proc.stdout.split() if line.strip().isdigit()]


def adapter_weights(folder: Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for file in sorted(folder.rglob("*.safetensors")):
        out |= {f"{file.relative_to(folder)}:{k}": v for k, v in load_file(file).items()}
    return out


def largest_difference(a: dict, b: dict) -> float | None:
    import numpy as np

    if not a or a.keys() != b.keys():
        return None
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def train_rows(bases: Path) -> dict:
    import csv

    with open(bases / "artifacts/prepared/index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}


def run_clip(bases: Path, n: int, batch: int, threads: int | None = None) -> dict:
    name = f"clip-{n}p" + (f"-{threads}t" if threads else "")
    params = sharing_project(bases, name, train_clip={"batch_size": batch})
    wall = stage(LAUNCHERS[n], params, "train-clip", "--variant", "real",
                 db=bases / f"{name}.db", log=bases / f"{name}.log", threads=threads)
    out = params.parent / "models/clip-lora/real"
    summary = json.loads((out / "val_metrics.json").read_text())
    return {"processes": n, "batch_per_process": batch, "global_batch": n * batch,
            "wall_seconds": round(wall, 1), "train_seconds": round(summary["train_seconds"], 1),
            "epochs_run": summary["epochs_run"], "best_epoch": summary["best_epoch"],
            "val_macro_f1": summary["val_macro_f1"], "val_accuracy": summary["val_accuracy"],
            "images_per_epoch": images_per_epoch(train_rows(bases)["train"], n, batch),
            "_out": str(out)}


def sd_settings(scale: float) -> dict:
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["sd_lora"]
    return {"epochs": section["epochs"] * scale, "sample_every": 0}


def run_sd(bases: Path, n: int, batch: int, settings: dict, threads: int | None = None) -> dict:
    name = f"sd-{n}p" + (f"-{threads}t" if threads else "")
    params = sharing_project(bases, name, sd_lora=settings | {"batch_size": batch})
    wall = stage(LAUNCHERS[n], params, "sd-lora", db=bases / f"{name}.db",
                 log=bases / f"{name}.log", threads=threads)
    out = params.parent / "models/sd-lora"
    summary = json.loads((out / "sd_lora.json").read_text())
    return {"processes": n, "batch_per_process": batch, "global_batch": n * batch,
            "wall_seconds": round(wall, 1),
            "train_seconds": round(summary["train_seconds"], 1)
            if "train_seconds" in summary else None,
            "final_loss": summary.get("final_loss"), "final_losses": summary.get("final_losses"),
            "_out": str(out)}


def compare(rows: list[dict]) -> float | None:
    one, two = (adapter_weights(Path(r.pop("_out"))) for r in rows)
    return largest_difference(one, two)


def images_per_epoch(rows: int, n: int, batch: int) -> int:
    """Images a train_clip epoch feeds on n processes at `batch` each: whole global batches
    (train_clip.loader drops the last partial one whenever there is a whole global batch)."""
    return rows if rows < n * batch else rows // (n * batch) * n * batch


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def per_epoch(r: dict) -> float | None:
    """Train seconds per epoch (train_clip: the runs may stop at other epochs), or per run
    (sd_lora: a fixed number of steps)."""
    if not r.get("train_seconds"):
        return None
    return r["train_seconds"] / r.get("epochs_run", 1)


def table(results: dict) -> str:
    """The markdown table of a results file."""
    lines = ["| stage | processes | batch / process (global) | threads / process | wall s | "
             "train s | speed-up (train s per epoch; sd: per run) | epochs run (best) | "
             "val macro-F1 | val acc | final loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, stage_ in results["stages"].items():
        rows = stage_["runs"]
        control = stage_.get("control_1_process_1_thread")
        rows = [*rows, control | {"control": True}] if control else rows
        base = per_epoch(rows[0])
        for r in rows:
            speed = f"{base / per_epoch(r):.2f}x" if base and per_epoch(r) else "–"
            th = [1] if r.get("control") else results["threads"].get(str(r["processes"]), [])
            epochs = f"{r['epochs_run']} ({r['best_epoch']})" if "epochs_run" in r else "–"
            label = f"{r['processes']} (control)" if r.get("control") else r["processes"]
            lines.append(
                f"| {name} | {label} | {r['batch_per_process']} ({r['global_batch']}) "
                f"| {th[0] if th else '–'} | {r['wall_seconds']:.0f} | "
                f"{fmt(r.get('train_seconds'), 0)} | {speed} | {epochs} | "
                f"{fmt(r.get('val_macro_f1'))} | {fmt(r.get('val_accuracy'))} | "
                f"{fmt(r.get('final_loss'), 4)} |")
    m, load = results["machine"], results["load_average"]
    notes = [f"{m['cpus']} CPUs, torch {m['torch']}; 1-min load average {load['start']:.2f} "
             f"at start, {load['end']:.2f} at end"
             + (f" ({load['control_start']:.2f} and {load['control_end']:.2f} around the "
                "train_clip control)" if "control_start" in load else "") + "."]
    for name, stage_ in results["stages"].items():
        if "kept_from" in stage_:
            kept = stage_["kept_from"]["load_average"]
            notes.append(f"{name} is kept from an earlier run of the script (load average "
                         f"{kept['start']:.2f} at its start, {kept['end']:.2f} after it).")
    train = results.get("sample_rows", {}).get("train")
    clip = results["stages"].get("train_clip@real")
    if train and clip:
        seen = [(images_per_epoch(train, r["processes"], r["batch_per_process"]), r["processes"])
                for r in clip["runs"]]
        if len({s for s, _ in seen}) > 1:
            fed = " vs ".join(f"{s} ({n} p)" for s, n in seen)
            notes.append(f"train_clip: of {train} train images an epoch feeds {fed}, so the "
                         "two runs are not the same training.")
        else:
            notes.append(f"train_clip: both feed {seen[0][0]} of {train} train images an epoch "
                         "(the last partial global batch dropped).")
    for name, stage_ in results["stages"].items():
        notes.append(f"{name}: {stage_['params']}.")
        notes.append(f"{name}: largest |weight difference| 1 vs 2 processes "
                     f"{fmt(stage_['max_weight_difference'], 6)}"
                     + (f"; {stage_['note']}" if stage_.get("note") else "") + ".")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def add_control(work: Path, which: str = "train_clip") -> None:
    """The stage on 1 process at 1 thread, the thread setting torchrun gives each of its
    processes: separates what the second process brings from what the threads cost."""
    results = json.loads(OUT.read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    load = os.getloadavg()[0]
    if which == "train_clip":
        name, run = "train_clip@real", run_clip(work, 1, params["train_clip"]["batch_size"], 1)
        results["load_average"]["control_start"] = load
        results["load_average"]["control_end"] = os.getloadavg()[0]
    else:
        name = "sd_lora"
        run = run_sd(work, 1, params["sd_lora"]["batch_size"],
                     results["stages"]["sd_lora"]["settings"], threads=1)
        run["load_average"] = {"start": load, "end": os.getloadavg()[0]}
    run.pop("_out")
    results["stages"][name]["control_1_process_1_thread"] = run
    results["command"] += f" && python benchmarks/processes.py --control {which} --work WORK"
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(run, flush=True)
    print(table(results), flush=True)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd-scale", type=float, default=0.1,
                        help="fraction of sd_lora's default epochs")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--skip", choices=["train_clip", "sd_lora"], action="append",
                        default=[], help="do not run this stage; keep its figures from the "
                                         "existing results file, if it has them")
    parser.add_argument("--control", choices=["train_clip", "sd_lora"],
                        help="only add a control to an existing results file: the stage on "
                             "1 process at OMP_NUM_THREADS=1, in the --work folder of that run")
    args = parser.parse_args()
    if args.control:
        add_control(args.work, args.control)
        return

    load_start = os.getloadavg()[0]
    work = args.work or Path(tempfile.mkdtemp(prefix="pneumoclip-processes-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; load average {load_start:.2f}", flush=True)
    results = {
        "command": "python " + " ".join(["benchmarks/processes.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform()},
        "env": {"OMP_NUM_THREADS (caller, removed for the runs)":
                os.environ.get("OMP_NUM_THREADS"),
                "1 process": "torch's default (no OMP_NUM_THREADS)",
                "2 processes": "torchrun's OMP_NUM_THREADS=1 per process"},
        "threads": {str(n): threads(n) for n in (1, 2)},
        "load_average": {"start": load_start},
        "stages": {},
    }
    print(f"threads per process: {results['threads']}", flush=True)
    previous = json.loads(OUT.read_text()) if OUT.is_file() else {"stages": {}}
    for name, kept in previous["stages"].items():
        if name.split("@")[0] in args.skip:
            results["stages"][name] = kept | {"kept_from": {
                "command": previous.get("command"), "load_average": previous["load_average"]}}

    base_params = sharing_project(work, ".")
    db = work / "base.db"
    started = time.perf_counter()
    stage(ONE, base_params, "base-models", db=db, log=work / "base-models.log")
    stage(ONE, base_params, "prepare", db=db, log=work / "prepare.log")
    results["setup_seconds"] = round(time.perf_counter() - started, 1)
    results["sample_rows"] = train_rows(work)
    print(f"bases and prepare: {results['setup_seconds']} s; rows {results['sample_rows']}",
          flush=True)

    def save() -> None:
        results["load_average"]["end"] = os.getloadavg()[0]
        OUT.parent.mkdir(parents=True, exist_ok=True)
        clean = json.loads(json.dumps(results, default=str))
        for s in clean["stages"].values():
            for r in s["runs"]:
                r.pop("_out", None)
        OUT.write_text(json.dumps(clean, indent=2) + "\n")

    clip_batch = yaml.safe_load((ROOT / "params.yaml").read_text())["train_clip"]["batch_size"]
    if "train_clip" not in args.skip:
        runs = []
        for n in (1, 2):
            runs.append(run_clip(work, n, clip_batch // n))
            print(f"train_clip@real {n}p: {runs[-1]}", flush=True)
        results["stages"]["train_clip@real"] = {
            "params": "params.yaml train_clip (defaults), global batch " + str(clip_batch),
            "runs": runs, "max_weight_difference": compare(runs)}
        save()

    sd_batch = yaml.safe_load((ROOT / "params.yaml").read_text())["sd_lora"]["batch_size"]
    if "sd_lora" not in args.skip:
        settings = sd_settings(args.sd_scale)
        runs = []
        for n in (1, 2):
            runs.append(run_sd(work, n, sd_batch // n, settings))
            print(f"sd_lora {n}p: {runs[-1]}", flush=True)
        results["stages"]["sd_lora"] = {
            "params": f"params.yaml sd_lora scaled by --sd-scale {args.sd_scale}: {settings}, "
                      f"global batch {sd_batch}",
            "sd_scale": args.sd_scale, "settings": settings,
            "runs": runs, "max_weight_difference": compare(runs)}
    save()
    print(table(json.loads(OUT.read_text())), flush=True)
    print(f"wrote {OUT.relative_to(ROOT)}", flush=True)


if __name__ == "__main__":
    main()
