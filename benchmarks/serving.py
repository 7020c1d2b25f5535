"""Benchmark: the Bento over HTTP on loopback, against the in-process model.

    pneumoclip bento build                      # after `dvc repro` (the champion exists)
    python benchmarks/serving.py                # starts `bentoml serve pneumoclip:latest`

It starts the built Bento on 127.0.0.1 (or uses --url), sends POST /classify requests of the
bundled sample's images from this second process at concurrency 1, 8 and 32 (bounded in
count and time), and prints p50/p95/p99 latency, throughput and errors, the in-process time
of one forward pass (decode, preprocess and model, the same work for one image), their
ratio, and the server's memory (all its processes) before and after a 2,000-request run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(target: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(Path(tempfile.gettempdir()) / "pneumoclip-bench-serve.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--host", "127.0.0.1",
         "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bentoml serve exited; see {log.name}")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:  # not listening yet, or still starting
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the Bento did not become ready in 180 s")


def server_rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def load(url: str, images: list[bytes], concurrency: int, count: int, seconds: float) -> dict:
    """Send up to `count` requests (stopping after `seconds`) with `concurrency` clients."""
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    errors = 0

    def client(worker: int) -> None:
        nonlocal errors
        session = requests.Session()
        i = worker
        while i < count and time.monotonic() < deadline:
            data = images[i % len(images)]
            started = time.perf_counter()
            try:
                answer = session.post(f"{url}/classify", timeout=60,
                                      files={"image": ("x.jpeg", data, "image/jpeg")})
                ok = answer.status_code == 200
            except requests.RequestException:
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += not ok
            i += concurrency

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(ms), "errors": errors,
            "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "throughput": len(ms) / wall}


def in_process_ms(images: list[bytes], repeats: int = 100) -> float:
    """Median time to classify one image in this process: decode, preprocess, forward."""
    import bentoml
    import torch

    from pneumoclip.classifier import read_image
    from pneumoclip.config import load_section
    from pneumoclip.serving import load_classifier

    settings = load_section("serve", ROOT / "params.yaml")
    model = bentoml.models.get(f"{settings.model_name}:latest")
    classifier = load_classifier(model)
    torch.set_num_threads(os.cpu_count() or 1)
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        classifier.predict_proba([read_image(images[i % len(images)])])
        times.append(time.perf_counter() - started)
    return statistics.median(times[10:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running Bento; default: start pneumoclip:latest")
    parser.add_argument("--target", default="pneumoclip:latest")
    parser.add_argument("--requests", type=int, default=400, help="per concurrency level")
    parser.add_argument("--seconds", type=float, default=90, help="per concurrency level")
    parser.add_argument("--soak", type=int, default=2000, help="requests for the memory check")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serving.json")
    args = parser.parse_args()

    images = [p.read_bytes() for p in sorted((ROOT / "sample/chest_xray").rglob("*.jpeg"))]
    proc = None
    url = args.url
    if url is None:
        proc, url = start(args.target)
    try:
        ready = requests.post(f"{url}/ready", timeout=30).json()
        load(url, images, 4, 40, 30)  # warm-up
        forward = in_process_ms(images)
        rows = [load(url, images, c, args.requests, args.seconds) for c in (1, 8, 32)]
        before = server_rss_mb(proc.pid) if proc else None
        soak = load(url, images, 8, args.soak, 600)
        after = server_rss_mb(proc.pid) if proc else None
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)

    print(f"\nBento {args.target}, model {ready['model']} v{ready['model_version']} "
          f"({ready['variant']}), tiny CPU profile, {os.cpu_count()} cores, loopback:\n")
    serve = yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]
    results = {"profile": "tiny CPU", "cores": os.cpu_count(), "target": args.target,
               "model_version": ready["model_version"], "rows": rows, "in_process_ms": forward,
               "rss_mb": [before, after], "soak": soak, "workers": serve["workers"],
               "torch_threads": serve["torch_threads"]}
    print(table(results))
    one = rows[0]
    print(f"\nin-process, one image (decode + preprocess + forward): {forward:.1f} ms")
    print(f"HTTP p50 at concurrency 1 / in-process: {one['p50'] / forward:.2f}x "
          f"(goal: p50 <= 1.5 x {forward:.1f} + 5 = {1.5 * forward + 5:.1f} ms)")
    print(f"throughput at 32 / at 1: {rows[2]['throughput'] / one['throughput']:.2f}x")
    if before is not None:
        print(f"server memory (all processes): {before:,.0f} MB before, {after:,.0f} MB after "
              f"{soak['requests']:,} more requests ({soak['errors']} errors): "
              f"{(after - before) / before:+.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {args.out}")


def table(results: dict) -> str:
    lines = ["| concurrency | requests | errors | p50 ms | p95 ms | p99 ms | throughput req/s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50']:.1f} | "
              f"{r['p95']:.1f} | {r['p99']:.1f} | {r['throughput']:.1f} |"
              for r in results["rows"]]
    return "\n".join(lines)



def replica_table(results: dict) -> str:
    """What one replica (one `bentoml serve`, all its processes) needs and gives."""
    before, after = results["rss_mb"]
    top = results["rows"][-1]
    return "\n".join([
        "| workers x torch threads | memory (all processes) | after more requests | "
        "throughput at concurrency 32 |",
        "| --- | ---: | ---: | ---: |",
        f"| {results['workers']} x {results['torch_threads']} | {before:,.0f} MB | "
        f"{after:,.0f} MB (+{results['soak']['requests']:,}, {results['soak']['errors']} errors)"
        f" | {top['throughput']:.0f} req/s |",
    ])


if __name__ == "__main__":
    main()
