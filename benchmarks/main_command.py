"""Time the README's main command in a fresh clone, stage by stage.

    python benchmarks/main_command.py [--clone DIR]

Clones the committed HEAD into DIR (default: a new temp folder), runs the README's first
command there exactly as written (setup included), stamps every line of its output, and
writes `benchmarks/results/main-command.json`: the total, the time before the first stage
(setup, the sample, `dvc add`), each stage's seconds (from one "Running stage" line to the
next), the seconds a second `dvc repro` takes to find nothing to do, and the 1-minute load
average at the start and the end, since a busy machine makes every figure longer. The
clone's `dvc.lock` is the one to commit after a change to a stage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results/main-command.json"


def main_command() -> str:
    """The README's first command: the first line of its first bash block (a comment aside)."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return next(line for line in block.splitlines() if line and not line.startswith("#"))


def run(command: str, cwd: Path, log) -> tuple[float, list[tuple[float, str]], int]:
    """Run `command` with bash in `cwd`; (seconds, stamped lines, exit status)."""
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append((time.perf_counter() - started, line.rstrip("\n")))
        log.write(f"{lines[-1][0]:8.1f} {line}")
        log.flush()
    return time.perf_counter() - started, lines, proc.wait()


def stage_seconds(lines: list[tuple[float, str]], total: float) -> dict[str, float]:
    starts = [(t, m.group(1)) for t, line in lines
              if (m := re.match(r"Running stage '([^']+)'", line))]
    ends = [t for t, _ in starts[1:]] + [total]
    return {name: round(end - start, 1) for (start, name), end in zip(starts, ends, strict=True)}


def versus(cpu: dict, gpu: dict) -> str:
    """Markdown: each stage's seconds on this CPU (the main command) and on the GPU run
    (benchmarks/devices.py's results), where both have it."""
    gpu_stages = {s["stage"]: s for s in gpu["stages"]}
    rows = [f"| stage | CPU, 2 cores (main command) | {gpu['device_name']}, bf16 | CPU / GPU |",
            "| --- | ---: | ---: | ---: |"]
    for name, seconds in cpu["stages"].items():
        g = gpu_stages.get(name)
        if g is None or g["rc"] != 0:
            rows.append(f"| {name} | {seconds:.0f} s | not reached | |")
            continue
        rows.append(f"| {name} | {seconds:.0f} s | {g['seconds']:.0f} s | "
                    f"{seconds / g['seconds']:.1f}x |")
    return "\n".join(rows)


def table(result: dict) -> str:
    """Markdown: the main command's time, setup and stage by stage."""
    rows = ["| step | seconds |", "| --- | ---: |",
            f"| setup, sample, `dvc add` | {result['before_first_stage_seconds']:.0f} |"]
    rows += [f"| {name} | {seconds:.0f} |" for name, seconds in result["stages"].items()]
    rows.append(f"| **total** | **{result['total_seconds']:.0f}** "
                f"({result['total_seconds'] / 60:.1f} min) |")
    if result.get("noop_repro_seconds") is not None:
        rows.append(f"| then a second `dvc repro` (nothing to do) | "
                    f"{result['noop_repro_seconds']:.1f} |")
    return "\n".join(rows) + (
        f"\n\n{result['cpu_count']} CPUs; 1-minute load average "
        f"{result['load_average_start']:.1f} at the start, {result['load_average_end']:.1f} "
        f"at the end; exit status {result['exit']}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clone", type=Path, help="where to clone (must not exist)")
    args = parser.parse_args()
    clone = args.clone or Path(tempfile.mkdtemp(prefix="pneumoclip-main-")) / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    command = main_command()
    load_start = os.getloadavg()[0]
    with open(clone.parent / "main-command.log", "w") as log:
        total, lines, status = run(command, clone, log)
    stages = stage_seconds(lines, total)
    noop = None
    if status == 0:  # a second `dvc repro` has nothing to do: how long does it take to see that?
        with open(clone.parent / "noop-repro.log", "w") as log:
            noop, noop_lines, noop_status = run(". .venv/bin/activate && dvc repro", clone, log)
        if noop_status != 0 or any(line.startswith("Running stage") for _, line in noop_lines):
            sys.exit(f"the second dvc repro was not a no-op; see {clone.parent}/noop-repro.log")
    first = next((t for t, line in lines if line.startswith("Running stage")), total)
    results = {
        "command": command, "exit": status, "total_seconds": round(total, 1),
        "before_first_stage_seconds": round(first, 1), "stages": stages,
        "noop_repro_seconds": round(noop, 1) if noop is not None else None,
        "cpu_count": os.cpu_count(), "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0],
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True,
                                 text=True).stdout.strip(),
        "clone": str(clone),
    }
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "stages"}, indent=2))
    for name, seconds in stages.items():
        print(f"{name:28s} {seconds:8.1f} s")
    sys.exit(status)


if __name__ == "__main__":
    main()
