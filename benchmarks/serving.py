"""Benchmark: the Bento over HTTP on loopback, against `mlflow models serve` and in-process.

    pneumoclip bento build                      # after `dvc repro` (the champion exists)
    python benchmarks/serving.py                # starts both servers, writes the results
    python benchmarks/serving.py --smoke        # a short check; writes to a temp file

It starts the built Bento (`bentoml serve pneumoclip:latest`) and MLflow's scoring server on
the same champion (`mlflow models serve -m models:/pneumoclip-classifier@champion --env-manager
local`, the tool a user reaches for first), each on 127.0.0.1 with `serve.workers` processes
of `serve.torch_threads` torch threads, so both get the same processes and cores. It checks
that both give the same answers for the bundled sample's images, then sends those images from
this second process at concurrency 1, 8 and 32 (bounded in count and time; the two servers
take turns at each level, so a slow spell on the machine hits both), and prints for each
side p50/p95/p99 latency, throughput and errors, their throughput ratios, the in-process time
of one forward pass (decode, preprocess and model, the same work for one image), and each
server's memory (all its processes) before and after 2,000 more requests.

The Bento gets `POST /classify`, a multipart upload of the image file. MLflow's server gets
`POST /invocations` with the pyfunc's input: `{"dataframe_split": {"columns": ["image"],
"data": [[<base64 of the same bytes>]]}}` (its scoring server base64-decodes a column that
the signature types `binary`). Both bodies are encoded once, before the clock starts, so the
client does the same work for both.
"""

from __future__ import annotations

import argparse
import base64
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
import urllib3
import yaml

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (1, 8, 32)
BENTO, PEER = "bento", "mlflow"  # the sides, as results keys
NAMES = {BENTO: "BentoML", PEER: "mlflow models serve"}
PEER_COMMAND = "mlflow models serve --env-manager local"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(name: str, argv: list[str], probe: str, env: dict | None = None,
           method: str = "get") -> tuple[subprocess.Popen, str]:
    """Start a server on a free loopback port and wait (at most 180 s) until `probe` is 200."""
    port = free_port()
    log = open(Path(tempfile.gettempdir()) / f"pneumoclip-bench-{name}.log", "w")
    proc = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited; see {log.name}")
        try:
            if getattr(requests, method)(f"{url}{probe}", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:  # not listening yet, or still starting
            pass
        time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"{name} did not become ready in 180 s; see {log.name}")


def start(target: str) -> tuple[subprocess.Popen, str]:
    return launch("bento", [str(Path(sys.executable).parent / "bentoml"), "serve", target],
                  "/readyz")


def start_peer(model_uri: str, workers: int, threads: int,
               tracking_uri: str | None) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` in this environment (it runs `uvicorn` from the venv's bin)."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if threads:  # torch reads these at import: the Bento's workers x threads
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return launch("mlflow", [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", model_uri,
                             "--env-manager", "local", "--workers", str(workers)], "/ping",
                  env=env)


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server, then whatever it started that outlives it (MLflow's CLI runs
    uvicorn in a shell; its workers must not be left behind)."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
    _, alive = psutil.wait_procs(tree, timeout=10)
    for child in alive:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=20)
    for child in alive:
        child.kill()


def server_rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


class Target:
    """One server: where to POST, and each image's body, encoded once."""

    def __init__(self, name: str, url: str, path: str, bodies: list[tuple[bytes, str]],
                 proc: subprocess.Popen | None) -> None:
        self.name, self.url, self.path, self.bodies, self.proc = name, url, path, bodies, proc

    def post(self, session: requests.Session, i: int) -> requests.Response:
        body, content_type = self.bodies[i % len(self.bodies)]
        return session.post(f"{self.url}{self.path}", data=body, timeout=60,
                            headers={"Content-Type": content_type})

    def rss_mb(self) -> float | None:
        return server_rss_mb(self.proc.pid) if self.proc else None


def bento_bodies(images: list[bytes]) -> list[tuple[bytes, str]]:
    return [urllib3.encode_multipart_formdata({"image": ("x.jpeg", data, "image/jpeg")})
            for data in images]


def peer_bodies(images: list[bytes]) -> list[tuple[bytes, str]]:
    return [(json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(data).decode("ascii")]]}}).encode(), "application/json")
        for data in images]


def answers(target: Target, count: int) -> list[dict[str, float]]:
    """Class probabilities for the first `count` images, from either server's reply."""
    out = []
    with requests.Session() as session:
        for i in range(count):
            reply = target.post(session, i)
            reply.raise_for_status()
            body = reply.json()
            if "predictions" in body:  # MLflow: one row, label and prob_<CLASS> columns
                row = body["predictions"][0]
                out.append({k.removeprefix("prob_"): v for k, v in row.items()
                            if k.startswith("prob_")})
            else:
                out.append(body["probabilities"])
    return out


def load(target: Target, concurrency: int, count: int, seconds: float) -> dict:
    """Send up to `count` requests (stopping after `seconds`) with `concurrency` clients."""
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    errors = 0

    def client(worker: int) -> None:
        nonlocal errors
        session = requests.Session()
        i = worker
        while i < count and time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                ok = target.post(session, i).status_code == 200
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
    classifier = load_classifier(model, "cpu")  # the serving benchmark runs on this CPU
    torch.set_num_threads(os.cpu_count() or 1)
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        classifier.predict_proba([read_image(images[i % len(images)])])
        times.append(time.perf_counter() - started)
    return statistics.median(times[10:]) * 1000


def peer_model(target: str, serve: dict) -> tuple[str, str | None, str]:
    """The MLflow model for `mlflow models serve`: models:/NAME@ALIAS, as a user types it, when
    the project's registry has it and it is the model inside the Bento; otherwise the Bento's
    own copy of it (an MLflow model folder), so both servers always run the same model.
    Returns (model URI, tracking URI or None, why)."""
    import bentoml

    info = bentoml.get(target).info
    tag = [*(m.tag for s in info.services for m in s.models), *(m.tag for m in info.models)][0]
    folder = Path(bentoml.models.get(tag).path) / "mlflow_model"
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    uri = f"models:/{serve['model_name']}@{serve['alias']}"
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking and (ROOT / "mlflow.db").is_file():  # never create an empty store
        tracking = "sqlite:///mlflow.db"
    if not tracking:
        return str(folder), None, f"no MLflow store here; the Bento's copy of {tag}"
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    cwd = os.getcwd()
    os.chdir(ROOT)  # a relative sqlite path is the project's
    try:
        version = MlflowClient(tracking_uri=tracking).get_model_version_by_alias(
            serve["model_name"], serve["alias"])
    except MlflowException as err:
        return str(folder), None, f"{uri} not found ({err.message}); the Bento's copy of {tag}"
    finally:
        os.chdir(cwd)
    # a version registered from models:/<model id> names it in its source (model_id is unset)
    ids = {getattr(version, "model_id", None), version.source.removeprefix("models:/")
           if version.source.startswith("models:/") else None} - {None}
    same = (mlmodel.get("model_id") in ids if ids and mlmodel.get("model_id")
            else mlmodel.get("run_id") == version.run_id)
    if not same:
        return (str(folder), None, f"{uri} is v{version.version} ({version.source}), not the "
                f"model in the Bento (rebuild it); the Bento's copy of {tag}")
    return uri, tracking, f"v{version.version}, the model in the Bento"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running Bento; default: start pneumoclip:latest")
    parser.add_argument("--target", default="pneumoclip:latest")
    parser.add_argument("--mlflow-url", help="a running `mlflow models serve` of the same model")
    parser.add_argument("--mlflow-model", help="MLflow model URI or folder to serve; default:"
                        " models:/NAME@ALIAS when it is the Bento's model, else the Bento's copy")
    parser.add_argument("--mlflow-threads", type=int,
                        help="torch threads per MLflow worker; default: serve.torch_threads "
                        "(0: torch's default, every core)")
    parser.add_argument("--no-mlflow", action="store_true", help="benchmark the Bento alone")
    parser.add_argument("--requests", type=int, default=400, help="per concurrency level")
    parser.add_argument("--seconds", type=float, default=90, help="per concurrency level")
    parser.add_argument("--soak", type=int, default=2000, help="requests for the memory check")
    parser.add_argument("--smoke", action="store_true",
                        help="40 requests a level, a 200-request soak, results to a temp file")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.soak, args.seconds = 40, 200, 30
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "pneumoclip-serving-smoke.json" if args.smoke
                    else ROOT / "benchmarks/results/serving.json")

    serve = yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]
    threads = serve["torch_threads"] if args.mlflow_threads is None else args.mlflow_threads
    images = [p.read_bytes() for p in sorted((ROOT / "sample/chest_xray").rglob("*.jpeg"))]
    procs: list[subprocess.Popen] = []
    peer_info = None
    try:
        proc, url = (None, args.url) if args.url else start(args.target)
        procs += [proc] if proc else []
        bento = Target(BENTO, url, "/classify", bento_bodies(images), proc)
        ready = requests.post(f"{url}/ready", timeout=30).json()
        targets = [bento]
        if not args.no_mlflow:
            proc, uri, why = None, args.mlflow_model, "given"
            if args.mlflow_url:
                url = args.mlflow_url
            else:
                tracking = None
                if uri is None:
                    uri, tracking, why = peer_model(args.target, serve)
                print(f"{PEER_COMMAND}: -m {uri} ({why}), {serve['workers']} workers x {threads} "
                      "torch threads", flush=True)
                proc, url = start_peer(uri, serve["workers"], threads, tracking)
                procs.append(proc)
            peer = Target(PEER, url, "/invocations", peer_bodies(images), proc)
            targets.append(peer)
            mine, theirs = answers(bento, 8), answers(peer, 8)
            diff = max(abs(a[k] - b[k]) for a, b in zip(mine, theirs, strict=True)
                       for k in a)
            if diff > 1e-3:
                raise SystemExit(f"the two servers disagree (max probability difference "
                                 f"{diff:.4f}): not the same model")
            peer_info = {"server": PEER_COMMAND, "model_uri": uri, "model_source": why,
                         "mlflow": requests.get(f"{url}/version", timeout=10).text.strip('"'),
                         "workers": serve["workers"], "torch_threads": threads,
                         "same_answers": {"images": len(mine), "max_abs_diff": diff}}
        for target in targets:
            load(target, 4, 40, 30)  # warm-up
        forward = in_process_ms(images)
        rows: dict[str, list[dict]] = {t.name: [] for t in targets}
        for c in LEVELS:  # take turns, so a slow spell on the machine hits both sides
            for target in targets:
                rows[target.name].append(load(target, c, args.requests, args.seconds))
        soaks = {}
        for target in targets:
            before = target.rss_mb()
            soak = load(target, 8, args.soak, 600)
            soaks[target.name] = (before, soak, target.rss_mb())
    finally:
        for proc in procs:
            stop(proc)

    before, soak, after = soaks[BENTO]
    results = {"profile": "tiny CPU", "cores": os.cpu_count(), "target": args.target,
               "model_version": ready["model_version"], "rows": rows[BENTO],
               "in_process_ms": forward, "rss_mb": [before, after], "soak": soak,
               "workers": serve["workers"], "torch_threads": serve["torch_threads"],
               PEER: None}
    if peer_info is not None:
        before, soak, after = soaks[PEER]
        results[PEER] = {**peer_info, "rows": rows[PEER], "rss_mb": [before, after],
                         "soak": soak}
    results["ratios"] = ratios(results)
    results["goals"] = [{k: v for k, v in g.items() if k != "shown"} for g in goals(results)]

    print(f"\nmodel {ready['model']} v{ready['model_version']} ({ready['variant']}), tiny CPU "
          f"profile, {os.cpu_count()} cores, loopback")
    print(f"\n{NAMES[BENTO]} ({args.target}, POST /classify, {serve['workers']} workers x "
          f"{serve['torch_threads']} torch threads):\n")
    print(side_table(results["rows"]))
    if results[PEER]:
        p = results[PEER]
        print(f"\n{PEER_COMMAND} (-m {p['model_uri']}, POST /invocations, dataframe_split "
              f"JSON with the image base64, {p['workers']} workers x {p['torch_threads']} "
              "torch threads):\n")
        print(side_table(p["rows"]))
        print(f"\nsame answers on {p['same_answers']['images']} images (max probability "
              f"difference {p['same_answers']['max_abs_diff']:.1e})")
    r = results["ratios"]
    print("\nthroughput, BentoML / MLflow: " + ", ".join(
        f"c={c}: {fmt_x(x)}" for c, x in r["bento_over_mlflow"].items()))
    print("throughput at 32 / at 1: " + ", ".join(
        f"{NAMES[side]} {fmt_x(x)}" for side, x in r["scale_32_over_1"].items()))
    print(f"in-process, one image (decode + preprocess + forward): {forward:.1f} ms; p50 at "
          "concurrency 1 / in-process: " + ", ".join(
              f"{NAMES[side]} {fmt_x(x)}" for side, x in r["p50_1_over_in_process"].items()))
    for side, (before, soak, after) in soaks.items():
        if before is not None:
            print(f"{NAMES[side]} memory (all processes): {before:,.0f} MB before, "
                  f"{after:,.0f} MB after {soak['requests']:,} more requests "
                  f"({soak['errors']} errors): {(after - before) / before:+.1%}")
    print("\ngoals (reported, not asserted):\n")
    print(goals_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {args.out}")


# ---------------------------------------------------------------- figures and tables


def fmt_x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def ratios(results: dict) -> dict:
    """BentoML / MLflow throughput at each concurrency; each side's throughput at 32 over at
    1; each side's p50 at concurrency 1 over the in-process time. None where MLflow's figures
    are missing (a results file from before the comparison)."""
    sides = {BENTO: results["rows"]}
    if results.get(PEER):
        sides[PEER] = results[PEER]["rows"]
    rate = {side: {r["concurrency"]: r["throughput"] for r in rows}
            for side, rows in sides.items()}
    theirs = rate.get(PEER, {})
    return {
        "bento_over_mlflow": {str(c): (x / theirs[c] if c in theirs else None)
                              for c, x in rate[BENTO].items()},
        "scale_32_over_1": {side: r[32] / r[1] for side, r in rate.items()},
        "p50_1_over_in_process": {side: rows[0]["p50"] / results["in_process_ms"]
                                  for side, rows in sides.items()},
    }


def goals(results: dict) -> list[dict]:
    """This project's serving goals for the Bento: each one's target, the measured value and
    whether it was met (None: not measured, or the run was too short to tell)."""
    rows, forward, soak = results["rows"], results["in_process_ms"], results["soak"]
    r = ratios(results)
    limit = 1.5 * forward + 5
    scale = r["scale_32_over_1"][BENTO]
    vs_peer = r["bento_over_mlflow"]["32"]
    theirs = "" if vs_peer is None else f" (MLflow: {fmt_x(r['scale_32_over_1'][PEER])})"
    runs = [*rows, soak]
    sent, errors = sum(x["requests"] for x in runs), sum(x["errors"] for x in runs)
    before, after = results["rss_mb"]
    growth = None if before is None else (after - before) / before
    return [
        {"goal": "p50 at concurrency 1 <= 1.5 x in-process + 5 ms",
         "target": f"<= 1.5 x {forward:.1f} + 5 = {limit:.1f} ms", "value": rows[0]["p50"],
         "shown": f"{rows[0]['p50']:.1f} ms", "met": rows[0]["p50"] <= limit},
        {"goal": "throughput at concurrency 32 >= 3 x at 1", "target": ">= 3x",
         "value": scale, "shown": fmt_x(scale) + theirs, "met": scale >= 3},
        {"goal": "throughput at concurrency 32 >= 2 x `mlflow models serve`'s",
         "target": ">= 2x", "value": vs_peer, "shown": fmt_x(vs_peer),
         "met": None if vs_peer is None else vs_peer >= 2},
        {"goal": "no errors over 2,000 requests", "target": "0 in >= 2,000", "value": errors,
         "shown": f"{errors} in {sent:,}", "met": errors == 0 if sent >= 2000 else None},
        {"goal": "memory flat within 5% over 2,000 more requests", "target": "within 5%",
         "value": growth, "shown": "–" if growth is None
         else f"{growth:+.1%} over {soak['requests']:,}",
         "met": None if growth is None or soak["requests"] < 2000 else abs(growth) <= 0.05},
    ]


def side_table(rows: list[dict]) -> str:
    """One server's rows, as the script prints them."""
    lines = ["| concurrency | requests | errors | p50 ms | p95 ms | p99 ms | throughput req/s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50']:.1f} | "
              f"{r['p95']:.1f} | {r['p99']:.1f} | {r['throughput']:.1f} |" for r in rows]
    return "\n".join(lines)


def table(results: dict) -> str:
    """Both servers side by side (each cell `BentoML / MLflow`) and the throughput ratios."""
    peer = results.get(PEER) or {}
    theirs = {r["concurrency"]: r for r in peer.get("rows", [])}
    r = ratios(results)

    def pair(a: dict, b: dict | None, key: str, spec: str) -> str:
        return f"{a[key]:{spec}} / " + ("–" if b is None else f"{b[key]:{spec}}")

    lines = ["| concurrency | requests | errors | p50 ms | p95 ms | p99 ms | throughput req/s "
             "| throughput BentoML / MLflow |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for a in results["rows"]:
        c, b = a["concurrency"], theirs.get(a["concurrency"])
        cells = [pair(a, b, key, spec) for key, spec in (
            ("requests", "d"), ("errors", "d"), ("p50", ".1f"), ("p95", ".1f"), ("p99", ".1f"),
            ("throughput", ".1f"))]
        lines.append(f"| {c} | {' | '.join(cells)} | {fmt_x(r['bento_over_mlflow'][str(c)])} |")
    mine = f"{results['workers']} x {results['torch_threads']}"
    other = f"{peer['workers']} x {peer['torch_threads']}" if peer else mine
    sides = f"{mine} on both sides" if other == mine else f"{mine} / {other}"
    lines += ["", f"Each cell: BentoML / `{PEER_COMMAND}`;",
              f"workers x torch threads: {sides}."]
    if not peer:
        lines += ["The MLflow figures are missing: these results are from before the",
                  "comparison, and the next full run of the benchmark fills them in."]
    return "\n".join(lines)


def goals_table(results: dict) -> str:
    verdict = {True: "yes", False: "no", None: "not measured"}
    lines = ["| goal | target | measured | met |", "| --- | --- | ---: | --- |"]
    lines += [f"| {g['goal']} | {g['target']} | {g['shown']} | {verdict[g['met']]} |"
              for g in goals(results)]
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
