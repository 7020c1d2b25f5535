"""Benchmark: the tiny profile's every stage on one device, then the service's model on it.

    python benchmarks/devices.py --device cuda          # on a GPU machine (bf16 training)
    python benchmarks/devices.py --device cpu --quick   # a smoke test: a few steps a stage

Runs the pipeline's stages in `dvc repro`'s order, each as its own `pneumoclip` subcommand
process (what `dvc repro` runs; DVC itself need not be installed), in a temporary copy of
the project: params.yaml relocated under a work folder (`pneumoclip.config.write_relocated`),
the bundled sample put in its data/ by `pneumoclip sample`, and a SQLite MLflow store there.
With `--device cuda` the two training stages get `mixed_precision: bf16`; the stages pick the
device themselves: this script only sets params, and with `--device cpu` it hides every GPU
(CUDA_VISIBLE_DEVICES=""). Each stage's wall time is measured around its process (imports
included, as in `dvc repro`), and on NVIDIA GPUs the GPU's mean utilisation and peak memory
while it ran (NVML), so a stage that leaves the GPU idle shows.

Then the registered @champion's model folder is loaded with `ClipClassifier.load` onto the
device, and single-image and batch-32 latencies are timed in process (the forward pass alone,
and decode + preprocess + forward as the service does them). Where BentoML is installed, the
service itself (service.py, with the champion imported into a BentoML store in the work
folder) is started with `bentoml serve` and timed over HTTP with benchmarks/serving.py's
client at concurrency 1, 8 and 32, and with batch-32 requests to /classify_batch.

It prints a table and writes JSON (device, versions, per-stage seconds, each variant's final
validation and test macro-F1, the service latencies) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample"
VARIANTS = ("real", "control", "augmented")


def stages(params: Path, data: Path) -> list[tuple[str, list[str]]]:
    """(name, pneumoclip arguments) in the order `dvc repro` runs dvc.yaml's stages."""
    p = ["--params", str(params)]
    return [
        ("sample", ["sample", str(data)]),  # the README's `pneumoclip sample data`
        ("base_models", ["base-models", *p]),
        ("prepare", ["prepare", *p]),
        ("sd_lora", ["sd-lora", *p]),
        ("train_clip@real", ["train-clip", *p, "--variant", "real"]),
        ("train_clip@control", ["train-clip", *p, "--variant", "control"]),
        ("synthesize", ["synthesize", *p]),  # judges with train_clip@real's model
        ("train_clip@augmented", ["train-clip", *p, "--variant", "augmented"]),
        *((f"evaluate@{v}", ["evaluate", *p, "--variant", v]) for v in VARIANTS),
        ("register", ["register", *p]),
    ]


def scaled(n: int, scale: float, least: int = 1) -> int:
    return max(least, round(n * scale))


def overrides(device: str, quick: bool, scale: float) -> dict[str, dict]:
    """Per-section params overrides: bf16 on CUDA, and fewer steps for --quick / --scale."""
    from pneumoclip.config import read_yaml

    raw = read_yaml(ROOT / "params.yaml")
    sd, clip = raw["sd_lora"], raw["train_clip"]
    out: dict[str, dict] = {"train_clip": {}, "sd_lora": {}, "synthesize": {}, "evaluate": {}}
    if device == "cuda":
        out["train_clip"]["mixed_precision"] = out["sd_lora"]["mixed_precision"] = "bf16"
    if quick:  # a smoke test: every code path once, a few steps each
        out["train_clip"] |= {"epochs": 2, "patience": 2}
        out["sd_lora"] |= {"epochs": 0.1, "warmup_steps": 1, "checkpoint_every": 2,
                           "sample_every": 4, "sample_per_class": 1, "sample_steps": 2}
        out["synthesize"] |= {"steps": 2, "counts": {c: 4 for c in raw["sd_lora"]["captions"]},
                              "probe_per_class": 4, "two_sample_max": 50}
        out["evaluate"] |= {"bootstrap": 50}
    elif scale != 1:  # the profile's step and epoch counts times `scale`
        out["train_clip"] |= {"epochs": scaled(clip["epochs"], scale),
                              "patience": scaled(clip["patience"], scale)}
        out["sd_lora"] |= {"epochs": sd["epochs"] * scale,
                           "warmup_steps": scaled(sd["warmup_steps"], scale),
                           "checkpoint_every": scaled(sd["checkpoint_every"], scale),
                           "sample_every": scaled(sd["sample_every"], scale)}
    return {k: v for k, v in out.items() if v}


# ---------------------------------------------------------------- the GPU while a stage runs


class GpuSampler:
    """Polls NVML (GPU 0) every 0.2 s: mean utilisation and peak memory in a time window.
    Inert where there is no NVIDIA GPU or no pynvml (nvidia-ml-py)."""

    def __init__(self, enabled: bool) -> None:
        self.handle, self.samples, self.lock = None, [], threading.Lock()
        if not enabled:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no driver, no GPU or no module: report nothing
            self.handle = None
            return
        threading.Thread(target=self.poll, daemon=True).start()

    def poll(self) -> None:
        while True:
            try:
                util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
                mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20
            except Exception:
                return
            with self.lock:
                self.samples.append((time.monotonic(), util, mem))
            time.sleep(0.2)

    def window(self, start: float, end: float) -> dict:
        if self.handle is None:
            return {}
        with self.lock:
            inside = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if not inside:
            return {}
        return {"gpu_util_mean": statistics.fmean(u for u, _ in inside),
                "gpu_mem_peak_mb": max(m for _, m in inside)}


# ---------------------------------------------------------------- the stages


def run_stage(name: str, args: list[str], work: Path, env: dict, log, sampler: GpuSampler
              ) -> dict:
    """One `pneumoclip` subcommand in `work`, its output streamed to the console and log."""
    print(f"\n=== {name}: pneumoclip {' '.join(args)}", flush=True)
    log.write(f"\n=== {name}\n")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pneumoclip.cli", *args], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        sys.stdout.write(f"  {line}")
        log.write(line)
    rc = proc.wait()
    end = time.monotonic()
    row = {"stage": name, "seconds": end - start, "rc": rc, **sampler.window(start, end)}
    print(f"=== {name}: {row['seconds']:.1f} s, exit {rc}", flush=True)
    return row


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def outcomes(params_path: Path) -> dict:
    """What the stages wrote: each variant's validation and test macro-F1, the SD LoRA
    summary, the synthetic set's quality and the registry's answer."""
    from pneumoclip.config import load_section

    train = load_section("train_clip", params_path)
    evaluate = load_section("evaluate", params_path)
    sd = load_section("sd_lora", params_path)
    synth = load_section("synthesize", params_path)
    register = load_section("register", params_path)
    variants = {}
    for v in VARIANTS:
        val = read_json(Path(train.out_dir) / v / "val_metrics.json") or {}
        test = read_json(Path(evaluate.out_dir) / f"{v}.json") or {}
        variants[v] = {"val_macro_f1": val.get("val_macro_f1"),
                       "val_accuracy": val.get("val_accuracy"),
                       "best_epoch": val.get("best_epoch"), "epochs_run": val.get("epochs_run"),
                       "train_seconds": val.get("train_seconds"),
                       "test_macro_f1": test.get("macro_f1"),
                       "test_accuracy": test.get("accuracy")}
    sd_meta = read_json(Path(sd.out_dir) / "sd_lora.json") or {}
    synthetic = read_json(Path(synth.metrics)) or {}
    return {
        "variants": variants,
        "sd_lora": {k: sd_meta.get(k) for k in ("steps", "final_loss", "train_seconds")},
        "synthetic": {"two_sample_auroc": synthetic.get("two_sample_auroc"),
                      "per_class": synthetic.get("per_class")},
        "register": read_json(Path(register.out)),
    }


# ---------------------------------------------------------------- the service's model


def champion_folder(params_path: Path) -> tuple[Path, str]:
    """The @champion's classifier folder (downloaded from the work folder's MLflow store),
    and models:/NAME@ALIAS."""
    import mlflow
    import yaml

    from pneumoclip import tracking
    from pneumoclip.config import load_section

    serve = load_section("serve", params_path)
    uri = f"models:/{serve.model_name}@{serve.alias}"
    mlflow.set_tracking_uri(tracking.tracking_uri())
    root = Path(mlflow.artifacts.download_artifacts(uri))
    flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
    return root / flavor["artifacts"][tracking.PYFUNC_ARTIFACT]["path"], uri


def timed(fn, repeats: int, sync) -> dict:
    """Median, p95 and mean of `fn` in ms over `repeats` calls after a few warm-ups."""
    for _ in range(min(5, repeats)):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"p50_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))],
            "mean_ms": statistics.fmean(times), "repeats": repeats}


def in_process(model_dir: Path, device: str, images: list[bytes], repeats: int) -> dict:
    """The champion on `device` as service.py runs it: fp32, the class text embeddings
    computed once; one image and 32 images, forward alone and decode + preprocess + forward.
    """
    import torch

    from pneumoclip.classifier import ClipClassifier, read_image

    start = time.perf_counter()
    classifier = ClipClassifier.load(model_dir)
    if hasattr(classifier, "to"):  # as pneumoclip.serving.load_classifier does
        classifier.to(device)
    else:
        classifier.clip.to(device)
        classifier.text_embeds = classifier.text_embeds.to(device)
    load_s = time.perf_counter() - start
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward(pixels: torch.Tensor):
        logits = classifier.logits_from_pixels(pixels.to(device))
        return torch.softmax(logits, dim=-1).cpu().numpy()

    def end_to_end(batch: list[bytes]):
        return forward(classifier.pixel_values([read_image(b) for b in batch]))

    batch32 = [images[i % len(images)] for i in range(32)]
    one = classifier.pixel_values([read_image(images[0])])
    many = classifier.pixel_values([read_image(b) for b in batch32])
    out = {"device": device, "load_seconds": load_s,
           "forward_1": timed(lambda: forward(one), repeats, sync),
           "forward_32": timed(lambda: forward(many), repeats, sync),
           "end_to_end_1": timed(lambda: end_to_end(images[:1]), repeats, sync),
           "end_to_end_32": timed(lambda: end_to_end(batch32), max(5, repeats // 4), sync)}
    if device == "cuda" and hasattr(classifier, "on_device"):  # the model in bf16 too
        try:
            classifier.to(device, torch.bfloat16)
            out["forward_1_bf16"] = timed(lambda: forward(one), repeats, sync)
            out["forward_32_bf16"] = timed(lambda: forward(many), repeats, sync)
        except Exception as err:
            out["bf16_error"] = repr(err)
    if device == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def bento_http(params_path: Path, work: Path, images: list[bytes], requests_per_level: int,
               seconds: float) -> dict:
    """service.py under `bentoml serve`, on the champion imported into a BentoML store in
    `work`; timed with benchmarks/serving.py's client."""
    import requests
    import urllib3

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serving as bench  # benchmarks/serving.py: launch, stop, Target, load

    from pneumoclip.config import load_section
    from pneumoclip.serving import CHAMPION_FILE, import_champion

    os.environ["BENTOML_HOME"] = str(work / "bentoml")
    settings = load_section("serve", params_path)
    model = import_champion(settings)
    service = work / "service"  # service.py beside its params.yaml, pinned champion and src/
    (service / CHAMPION_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "service.py", service / "service.py")
    shutil.copyfile(params_path, service / "params.yaml")
    (service / "src").symlink_to(ROOT / "src")
    (service / CHAMPION_FILE).write_text(json.dumps({
        "bento_model": str(model.tag), "mlflow_name": settings.model_name,
        "mlflow_version": model.info.labels["mlflow_version"], "alias": settings.alias}))
    start = time.monotonic()
    proc, url = bench.launch("bento", [sys.executable, "-m", "bentoml", "serve",
                                       "service:Pneumoclip", "--working-dir", str(service)],
                             "/readyz")
    try:
        ready_s = time.monotonic() - start
        ready = requests.post(f"{url}/ready", timeout=30).json()
        one = bench.Target("bento", url, "/classify", bench.bento_bodies(images), proc)
        fields = [("images", (f"{i}.jpeg", images[i % len(images)], "image/jpeg"))
                  for i in range(32)]
        batch = bench.Target("bento", url, "/classify_batch",
                             [urllib3.encode_multipart_formdata(fields)], proc)
        bench.load(one, 4, 40, 30)  # warm-up
        rows = [bench.load(one, c, requests_per_level, seconds) for c in bench.LEVELS]
        batch_row = bench.load(batch, 1, max(10, requests_per_level // 8), seconds)
        rss = one.rss_mb()
    finally:
        bench.stop(proc)
    return {"server": "bentoml serve service:Pneumoclip", "ready_seconds": ready_s,
            "service_device": ready.get("device"), "model_version": ready.get("model_version"),
            "workers": settings.workers, "rows": rows, "batch_32": batch_row, "rss_mb": rss}


# ---------------------------------------------------------------- output


def table(results: dict) -> str:
    lines = ["| stage | seconds | exit | GPU util % | GPU memory MB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in results["stages"]:
        util = f"{r['gpu_util_mean']:.0f}" if "gpu_util_mean" in r else "–"
        mem = f"{r['gpu_mem_peak_mb']:,.0f}" if "gpu_mem_peak_mb" in r else "–"
        lines.append(f"| {r['stage']} | {r['seconds']:.1f} | {r['rc']} | {util} | {mem} |")
    lines.append(f"| **total** | {results['stages_seconds']:.1f} | | | |")
    lines += ["", "| variant | val macro-F1 | test macro-F1 | epochs run | train s |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for v, m in (results.get("outcomes") or {}).get("variants", {}).items():
        cells = [("–" if m[k] is None else f"{m[k]:.3f}") for k in ("val_macro_f1",
                                                                      "test_macro_f1")]
        secs = "–" if m["train_seconds"] is None else f"{m['train_seconds']:.0f}"
        lines.append(f"| {v} | {cells[0]} | {cells[1]} | {m['epochs_run'] or '–'} | {secs} |")
    service = results.get("service") or {}
    local = service.get("in_process")
    if local:
        lines += ["", f"champion in process on {local['device']} (load {local['load_seconds']:.1f}"
                  " s):", "| what | p50 ms | p95 ms |", "| --- | ---: | ---: |"]
        for key in ("forward_1", "forward_32", "end_to_end_1", "end_to_end_32",
                    "forward_1_bf16", "forward_32_bf16"):
            if key in local:
                lines.append(f"| {key} | {local[key]['p50_ms']:.2f} | "
                             f"{local[key]['p95_ms']:.2f} |")
    http = service.get("bento")
    if http:
        lines += ["", f"bentoml serve ({http['workers']} workers, model on "
                  f"{http['service_device']}, ready in {http['ready_seconds']:.0f} s):",
                  "| request | concurrency | requests | errors | p50 ms | p95 ms | req/s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in [*(("/classify", r) for r in http["rows"]),
                        ("/classify_batch x32", http["batch_32"])]:
            lines.append(f"| {name} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                         f"{r['p50']:.1f} | {r['p95']:.1f} | {r['throughput']:.1f} |")
    elif service.get("bento_skipped"):
        lines += ["", f"bentoml serve: skipped ({service['bento_skipped']})"]
    return "\n".join(lines)


def environment(device: str) -> dict:
    import torch

    info = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.machine()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"device_name": props.name, "device_memory_gb": props.total_memory / 2**30,
                 "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}
    else:
        info["device_name"] = platform.processor() or platform.machine()
    for name in ("transformers", "diffusers", "peft", "accelerate", "mlflow", "bentoml"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:
            info[name] = None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/devices-DEVICE"
                        ".json (with --quick: a temp file)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 2 epochs, a few SD steps, 4 images a class")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the profile's epochs and SD steps (not with --quick)")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--no-bento", action="store_true", help="skip `bentoml serve`")
    parser.add_argument("--budget", type=float, default=0,
                        help="seconds the whole run may take (0: no limit); `bentoml serve` "
                        "is skipped when less than 2 minutes of it are left")
    args = parser.parse_args()
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / f"pneumoclip-devices-{args.device}-quick.json"
                    if args.quick else ROOT / f"benchmarks/results/devices-{args.device}.json")
    args.out = args.out.resolve()

    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TQDM_MININTERVAL", "10")  # progress bars, not a flood of them
    env.setdefault("GIT_PYTHON_REFRESH", "quiet")
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the stages pick the accelerator: hide it
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    os.environ.update(env)  # this process, and the servers it starts, likewise
    sys.path.insert(0, src)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    info = environment(args.device)
    print(json.dumps(info), flush=True)

    from pneumoclip.config import write_relocated

    work = args.work or Path(tempfile.mkdtemp(prefix=f"pneumoclip-devices-{args.device}-"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"] = \
        f"sqlite:///{work / 'mlflow.db'}"
    sections = overrides(args.device, args.quick, args.scale)
    params = write_relocated(work, ROOT / "params.yaml", **sections)
    print(f"work folder {work}; params overrides {json.dumps(sections)}", flush=True)

    sampler = GpuSampler(args.device == "cuda")
    results = {**info, "quick": args.quick, "scale": args.scale, "overrides": sections,
               "stages": [], "outcomes": None, "service": None}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every step, so a run cut short still leaves its figures
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    started = time.monotonic()
    failed = None
    with open(work / "stages.log", "w") as log:
        for name, stage_args in stages(params, work / "data"):
            row = run_stage(name, stage_args, work, env, log, sampler)
            results["stages"].append(row)
            save()
            if row["rc"] != 0:
                failed = name
                break
    results["stages_seconds"] = sum(r["seconds"] for r in results["stages"])
    results["failed_stage"] = failed
    try:
        results["outcomes"] = outcomes(params)
    except Exception as err:  # a stage failed early: report what there is
        results["outcomes_error"] = repr(err)

    if failed is None:
        images = [p.read_bytes() for p in sorted((SAMPLE / "chest_xray").rglob("*.jpeg"))]
        service: dict = {}
        results["service"] = service
        cwd = os.getcwd()
        os.chdir(work)  # MLflow and BentoML paths of the work folder's stores
        try:
            model_dir, uri = champion_folder(params)
            service["champion"] = uri
            start = time.monotonic()
            service["in_process"] = in_process(model_dir, args.device, images,
                                               20 if args.quick else 200)
            service["in_process_seconds"] = time.monotonic() - start
        except Exception as err:
            service["in_process_error"] = repr(err)
            print(f"in-process timing failed: {err!r}", flush=True)
        save()
        try:
            import bentoml  # noqa: F401
        except ImportError as err:
            service["bento_skipped"] = f"bentoml not importable: {err}"
        elapsed = time.monotonic() - started
        if args.budget and elapsed > args.budget - 120:  # a Bento's start and load: ~2 min
            service["bento_skipped"] = f"{elapsed:.0f} s gone of the --budget of {args.budget} s"
        if args.no_bento:
            service["bento_skipped"] = "--no-bento"
        if "bento_skipped" not in service:
            try:
                start = time.monotonic()
                service["bento"] = bento_http(params, work, images, 40 if args.quick else 400,
                                              30 if args.quick else 20)
                service["bento_seconds"] = time.monotonic() - start
            except (Exception, SystemExit) as err:
                service["bento_error"] = repr(err)
                print(f"bentoml serve timing failed: {err!r}", flush=True)
        os.chdir(cwd)
    results["total_seconds"] = time.monotonic() - started

    print("\n" + table(results), flush=True)
    save()
    print(f"\nwritten: {args.out}; total {results['total_seconds']:.0f} s")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        raise SystemExit(f"stage {failed} failed; see its output above")


if __name__ == "__main__":
    main()
