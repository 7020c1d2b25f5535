"""The Bento over real HTTP: `pneumoclip bento build`, then `bentoml serve` on 127.0.0.1,
with the champion registered in the session's real MLflow server."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
import test_deploy
import yaml
from conftest import BIN, ROOT, SAMPLE, cli, free_port, stop, wait_http
from PIL import Image

from pneumoclip.classifier import ClipClassifier, read_image
from pneumoclip.config import load_section

SETTINGS = load_section("serve", ROOT / "params.yaml")
XRAY = sorted((SAMPLE / "chest_xray/train/PNEUMONIA").glob("*virus*.jpeg"))[0]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def start_server(target: str, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def bento(trained, tmp_path_factory):
    """Register the trained model, build the Bento, serve it; yields its URL."""
    home = tmp_path_factory.mktemp("bentoml")
    env = dict(os.environ, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True")
    cli("register", "--params", str(trained["params"]))
    registry = json.loads(Path(trained["root"] / "registry.json").read_text())
    built = cli("bento", "build", "--params", str(trained["params"]), env=env)
    assert "built Bento pneumoclip:" in built.stdout
    proc, url = start_server("pneumoclip:latest", env, home / "serve.log")
    try:
        wait_http(f"{url}/readyz", 180, proc)
    except Exception:
        proc.kill()
        raise RuntimeError((home / "serve.log").read_text()[-4000:]) from None
    yield {"url": url, "registry": registry, "env": env, "home": home, "proc": proc}
    stop(proc, 30)


def classify(bento, data: bytes, content_type: str = "image/png", field: str = "image"):
    return requests.post(f"{bento['url']}/classify",
                         files={field: ("x.png", data, content_type)}, timeout=60)


def test_ready_reports_the_champion_name_and_version(bento):
    answer = requests.post(f"{bento['url']}/ready", timeout=30)
    assert answer.status_code == 200
    body = answer.json()
    assert body["model"] == SETTINGS.model_name
    assert body["model_version"] == str(bento["registry"]["champion_version"])
    assert body["classes"] == ["NORMAL", "BACTERIA", "VIRUS"]
    assert body["device"] == "cpu"  # "cuda" in the GPU Bento on a GPU node


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16", "JPEG"])
def test_every_image_mode_is_classified(bento, mode):
    gray = Image.open(XRAY).convert("L")
    if mode == "JPEG":
        data, content_type = XRAY.read_bytes(), "image/jpeg"
    elif mode == "I;16":
        data = png(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257))
        content_type = "image/png"
    else:
        data, content_type = png(gray.convert(mode)), "image/png"
    answer = classify(bento, data, content_type)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["label"] in {"NORMAL", "BACTERIA", "VIRUS"}
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert body["model_version"] == str(bento["registry"]["champion_version"])


def test_http_answers_equal_the_in_process_model(bento, trained):
    local = ClipClassifier.load(trained["model"])
    paths = sorted((SAMPLE / "chest_xray/train").rglob("*.jpeg"))[::40][:6]
    expected = local.predict([read_image(p) for p in paths])
    for path, want in zip(paths, expected, strict=True):
        got = classify(bento, path.read_bytes(), "image/jpeg").json()
        assert got["label"] == want["label"]
        for c, p in want["probabilities"].items():
            assert got["probabilities"][c] == pytest.approx(p, abs=1e-4)
    batch = requests.post(f"{bento['url']}/classify_batch", timeout=60, files=[
        ("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths])
    assert batch.status_code == 200, batch.text
    assert [r["label"] for r in batch.json()] == [w["label"] for w in expected]


def test_the_batch_route_adapts_priors_on_request(bento, trained):
    from pneumoclip.priors import MIN_BATCH

    paths = sorted((SAMPLE / "chest_xray/train").rglob("*.jpeg"))[:MIN_BATCH]
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    url = f"{bento['url']}/classify_batch"
    answer = requests.post(f"{url}?adapt_priors=true", files=files, timeout=120)
    assert answer.status_code == 200, answer.text
    expected = ClipClassifier.load(trained["model"]).predict(
        [read_image(p) for p in paths], adapt_priors=True)
    for got, want in zip(answer.json(), expected, strict=True):
        assert got["label"] == want["label"]
        assert got["priors"] == pytest.approx(want["priors"], abs=1e-4)
        for c, p in want["probabilities"].items():
            assert got["probabilities"][c] == pytest.approx(p, abs=1e-4)
    plain = requests.post(f"{url}?adapt_priors=false", files=files, timeout=120).json()
    assert "priors" not in plain[0]
    one = [("image", files[0][1])]
    cases = [
        (requests.post(f"{url}?adapt_priors=true", files=files[:3], timeout=60),
         f"adapt_priors: prior adaptation needs a batch of at least {MIN_BATCH} images, got 3"),
        (requests.post(f"{bento['url']}/classify?adapt_priors=true", files=one, timeout=60),
         "send the images to /classify_batch"),
        (requests.post(f"{url}?adapt_priors=maybe", files=files[:1], timeout=60),
         "adapt_priors='maybe': use true or false"),
        (requests.post(f"{url}?adapt_prior=true", files=files[:1], timeout=60),
         "unknown query parameter 'adapt_prior'"),
    ]
    for i, (refused, message) in enumerate(cases):
        assert refused.status_code == 400, (i, refused.text)
        assert message in refused.json()["error"], (i, refused.text)


def test_bad_input_gets_a_4xx_that_says_what_is_wrong(bento):
    good = XRAY.read_bytes()
    over = png(Image.new("L", (2001, 2001)))  # 4,004,001 pixels, over the 4,000,000 limit
    too_many = [("images", (f"{i}.jpeg", good, "image/jpeg"))
                for i in range(SETTINGS.max_batch_images + 1)]
    url = bento["url"]
    cases = [
        (requests.post(f"{url}/classify", timeout=30), 415, "multipart/form-data"),
        (classify(bento, b""), 400, "empty image (0 bytes)"),
        (classify(bento, b"hello, not an image"), 400, "not a readable image"),
        (classify(bento, good[: len(good) // 2], "image/jpeg"), 400, "image file is truncated"),
        (classify(bento, over), 400, "over the limit of 4,000,000 pixels"),
        (classify(bento, good, "text/plain"), 415, "content type text/plain is not accepted"),
        (classify(bento, good, field="file"), 400, "unexpected multipart field 'file'"),
        (requests.post(f"{url}/classify", json={"image": "x"}, timeout=30), 415,
         "(got application/json)"),
        (requests.post(f"{url}/classify_batch", files=too_many, timeout=60), 400,
         f"{SETTINGS.max_batch_images + 1} images in one request; the limit is "
         f"{SETTINGS.max_batch_images}"),
        (requests.post(f"{url}/classify", files=[("image", ("a.jpeg", good, "image/jpeg"))] * 2,
                       timeout=30), 400, "/classify takes one"),
        (requests.get(f"{url}/classify", timeout=30), 405, "takes POST"),
    ]
    for i, (answer, status, message) in enumerate(cases):
        assert answer.status_code == status, (i, answer.status_code, answer.text)
        assert message in answer.json()["error"], (i, answer.text)
    # nothing above hurt the worker: it still answers
    assert classify(bento, good, "image/jpeg").status_code == 200
    assert bento["proc"].poll() is None


@pytest.mark.parametrize("value", ["http://127.0.0.1:1/x.png", "https://example.com/x.png",
                                   "file:///etc/passwd", "/etc/passwd", "just a string"])
def test_a_text_value_in_a_file_field_is_refused_and_never_fetched(bento, value):
    for route, field in (("/classify", "image"), ("/classify_batch", "images")):
        # (None, value): a form part without a file name, i.e. a text value
        answer = requests.post(f"{bento['url']}{route}", files={field: (None, value)},
                               timeout=30)
        assert answer.status_code == 400, answer.text
        assert "must be an uploaded file, not a text value" in answer.json()["error"]
        urlencoded = requests.post(f"{bento['url']}{route}", data={field: value}, timeout=30)
        assert urlencoded.status_code == 415, urlencoded.text


def test_a_file_name_of_any_length_is_accepted(bento):
    for name in ("x" * 300 + ".jpeg", "../../etc/passwd", "ü" * 200, ""):
        answer = requests.post(f"{bento['url']}/classify", timeout=30,
                               files={"image": (name, XRAY.read_bytes(), "image/jpeg")})
        assert answer.status_code == 200, (name[:20], answer.text)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_formats_other_than_png_jpeg_and_dicom_get_415(bento, fmt):
    buffer = io.BytesIO()
    Image.open(XRAY).convert("L").save(buffer, format=fmt)
    answer = classify(bento, buffer.getvalue(), "image/x-anything")
    assert answer.status_code == 415, answer.text
    assert f"{fmt} images are not accepted" in answer.json()["error"]


def test_thin_and_tiny_images_are_refused_by_the_size_rule(bento):
    from pneumoclip.classifier import MIN_SIDE

    thin = png(Image.new("L", (2_000_000, 2)))  # a few KB; scaled up it would be gigabytes
    assert len(thin) < 20_000
    for data in (thin, png(Image.new("L", (MIN_SIDE - 1, MIN_SIDE - 1)))):
        answer = classify(bento, data)
        assert answer.status_code == 400, answer.text
        assert "the short side must be at least" in answer.json()["error"]
    assert bento["proc"].poll() is None


def test_exif_orientation_is_applied(bento):
    upright = Image.open(XRAY).convert("L").crop((0, 0, 224, 160))  # not square
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored pixels are rotated; a viewer turns them 90° clockwise
    upright.rotate(90, expand=True).save(buffer, format="JPEG", quality=95, exif=exif)
    plain = io.BytesIO()
    upright.save(plain, format="JPEG", quality=95)
    tagged = classify(bento, buffer.getvalue(), "image/jpeg").json()
    straight = classify(bento, plain.getvalue(), "image/jpeg").json()
    for c, p in straight["probabilities"].items():
        assert tagged["probabilities"][c] == pytest.approx(p, abs=0.02), c


def test_a_dicom_gets_the_answer_of_the_same_image_as_png(bento):
    from conftest import dicom_bytes

    gray = Image.open(XRAY).convert("L")
    as_png = classify(bento, png(gray)).json()
    # 8-bit: the very pixels; 12-bit through rescale and a full-range window: within a level
    for kind, tolerance in (({}, 1e-4), ({"photometric": "MONOCHROME1"}, 1e-4),
                            ({"bits": 16, "window": (127.5, 256)}, 5e-3)):
        data = dicom_bytes(gray, **kind)
        for content_type in ("application/dicom", "application/octet-stream"):
            answer = classify(bento, data, content_type)
            assert answer.status_code == 200, (kind, answer.text)
            assert answer.json()["label"] == as_png["label"]
            for c, p in as_png["probabilities"].items():
                assert answer.json()["probabilities"][c] == pytest.approx(p, abs=tolerance), kind
    batch = requests.post(f"{bento['url']}/classify_batch", timeout=60, files=[
        ("images", ("a.dcm", dicom_bytes(gray), "application/dicom")),
        ("images", ("b.png", png(gray), "image/png"))])
    assert batch.status_code == 200, batch.text
    assert batch.json()[0]["label"] == batch.json()[1]["label"] == as_png["label"]


def test_unreadable_dicoms_are_refused_with_a_reason(bento):
    from conftest import dicom_bytes
    from pydicom import dcmread

    gray = Image.open(XRAY).convert("L")
    jpeg_ls = dicom_bytes(gray, compress="1.2.840.10008.1.2.4.80")
    answer = classify(bento, jpeg_ls, "application/dicom")
    assert answer.status_code == 415, answer.text
    assert "1.2.840.10008.1.2.4.80" in answer.json()["error"]
    ds = dcmread(io.BytesIO(dicom_bytes(gray)))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    answer = classify(bento, buffer.getvalue(), "application/dicom")
    assert answer.status_code == 400, answer.text
    assert "DICOM has no pixel data" in answer.json()["error"]
    batch = requests.post(f"{bento['url']}/classify_batch", timeout=60, files=[
        ("images", ("a.png", png(gray), "image/png")),
        ("images", ("b.dcm", buffer.getvalue(), "application/dicom"))])
    assert batch.status_code == 400
    assert batch.json()["error"].startswith("image 2 of 2: DICOM has no pixel data")


def test_metrics_show_the_micro_batch_sizes_and_the_refusals(bento):
    from concurrent.futures import ThreadPoolExecutor

    data = XRAY.read_bytes()
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: classify(bento, data, "image/jpeg").status_code,
                              range(64)))
    assert codes == [200] * 64
    classify(bento, b"GIF89a" + b"\0" * 64, "image/gif")
    metrics = requests.get(f"{bento['url']}/metrics", timeout=30).text
    counts = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line.startswith("pneumoclip_batch_size_")}
    assert counts['pneumoclip_batch_size_count'] >= 64 / SETTINGS.max_batch_size
    # the batches hold the 64 images and more (earlier tests), at most max_batch_size each
    assert counts["pneumoclip_batch_size_sum"] >= 64
    assert any(line.startswith("pneumoclip_refused_total") for line in metrics.splitlines())


def test_a_burst_of_large_uploads_gets_503s_not_an_oom_and_memory_stays_bounded(bento):
    """128 concurrent uploads of 8.7 MB each (RGB noise, within every per-file limit; 1.1 GB
    in all) against 2 workers: past serve.max_in_flight_bytes per worker the answer is 503
    with Retry-After, and the server's memory (all its processes) stays within its resting
    size plus test_deploy.burst_bound (which the Kubernetes memory limit also covers)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    rng = np.random.default_rng(0)
    big = png(Image.fromarray(rng.integers(0, 256, (1700, 1700, 3), dtype=np.uint8)))
    assert 8_000_000 < len(big) < SETTINGS.max_bytes
    server = psutil.Process(bento["proc"].pid)

    def rss() -> int:
        total = 0
        for proc in [server, *server.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    resting, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(128) as pool:
            answers = list(pool.map(lambda _: requests.post(
                f"{bento['url']}/classify", files={"image": ("big.png", big, "image/png")},
                timeout=300), range(128)))
    finally:
        done.set()
        watcher.join()
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503}, codes
    assert 200 in codes and 503 in codes, codes
    assert all(a.headers["retry-after"] == "1" for a in answers if a.status_code == 503)
    bound = test_deploy.burst_bound(dataclasses.asdict(SETTINGS))
    print(f"burst: {codes.count(200)} answered, {codes.count(503)} told to retry; server "
          f"{resting / 1e6:,.0f} MB at rest, {peak[0] / 1e6:,.0f} MB at peak (bound "
          f"{(resting + bound) / 1e6:,.0f} MB)")
    assert peak[0] <= resting + bound
    assert classify(bento, XRAY.read_bytes(), "image/jpeg").status_code == 200


def test_bento_build_without_a_champion_fails_naming_the_alias(trained, tmp_path):
    raw = yaml.safe_load(Path(trained["params"]).read_text())
    name = f"nobody-{uuid.uuid4().hex[:6]}"
    raw["serve"]["model_name"] = name
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "home"))
    out = cli("bento", "build", "--params", str(params), check=False, env=env)
    assert out.returncode == 1
    assert f"no @champion for registered model '{name}'" in out.stderr


def test_service_start_up_without_the_model_fails_fast_naming_the_alias(tmp_path):
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "empty-home"))
    proc, _ = start_server("service:Pneumoclip", env, tmp_path / "serve.log")
    try:
        assert proc.wait(120) != 0
    finally:
        proc.kill()
    log = (tmp_path / "serve.log").read_text()
    assert "no 'pneumoclip-classifier' model" in log
    assert "models:/pneumoclip-classifier@champion" in log


def test_micro_batcher_merges_concurrent_requests_and_routes_each_answer_back():
    import asyncio
    import threading
    import time

    from pneumoclip.serving import MicroBatcher

    seen, lock = [], threading.Lock()

    def forward(x: np.ndarray) -> np.ndarray:
        with lock:
            seen.append(len(x))
        time.sleep(0.05)  # a forward pass long enough for the others to queue
        if (x < 0).any():
            raise ValueError("negative pixels")
        return x * 10

    async def main():
        batcher = MicroBatcher(forward, max_batch=8)
        alone = await batcher(np.array([[1.0]]))  # idle: runs at once, alone
        calls = [batcher(np.array([[float(i)], [float(i) + 0.5]])) for i in range(10)]
        answers = await asyncio.gather(*calls)
        bad = asyncio.gather(batcher(np.array([[-1.0]])), batcher(np.array([[2.0]])),
                             return_exceptions=True)
        return alone, answers, await bad, batcher

    alone, answers, bad, batcher = asyncio.run(main())
    assert alone.tolist() == [[10.0]]
    for i, answer in enumerate(answers):  # each caller gets its own rows back
        assert answer.tolist() == [[10.0 * i], [10.0 * i + 5]]
    assert seen[0] == 1 and max(seen) <= 8 and len(seen) < 11  # batched, within the cap
    assert sum(seen[1:-1]) == 20
    assert all(isinstance(b, ValueError) for b in bad)  # one failing batch fails its callers
    assert not batcher.running and not batcher.pending


def built_bento(bento, tag: str) -> Path:
    name, version = tag.split(":")
    return bento["home"] / "bentos" / name / version


def latest_bento(bento) -> tuple[dict, Path]:
    """`bentoml get pneumoclip:latest` (as JSON) and its folder in the store."""
    info = json.loads(subprocess.run(
        [str(BIN / "bentoml"), "get", "pneumoclip:latest", "-o", "json"], env=bento["env"],
        capture_output=True, text=True, check=True).stdout)
    return info, built_bento(bento, f"{info['name']}:{info['version']}")


def test_the_built_bento_has_a_dockerfile_with_every_package_pinned(bento):
    """What `bentoml containerize` would build (it needs a Docker daemon, absent here)."""
    info, folder = latest_bento(bento)
    dockerfile = (folder / "env/docker/Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert f"EXPOSE {test_deploy.BENTO_PORT}" in dockerfile
    # the index strategy is set before the packages are installed
    assert "ARG UV_INDEX_STRATEGY=unsafe-best-match" in dockerfile
    assert dockerfile.index("ENV UV_INDEX_STRATEGY") < dockerfile.index("pip install -r")
    assert "--mount=type=secret" not in dockerfile  # containerize needs no extra input
    requirements = test_deploy.requirement_lines(folder / "env/python/requirements.txt")
    # exactly the pinned set (BentoML may repeat its own pin), torch the CPU wheel
    assert set(requirements) == set(
        test_deploy.requirement_lines(ROOT / "deploy/requirements-cpu.txt"))
    assert "torch==2.13.0+cpu" in requirements
    # the GPU variant, built from the same model: a CUDA base image and the CUDA torch
    gpu = subprocess.run([str(BIN / "bentoml"), "build", "--output", "tag", "-f",
                          "deploy/bentofile-gpu.yaml", "."], cwd=ROOT, env=bento["env"],
                         capture_output=True, text=True)
    assert gpu.returncode == 0, gpu.stdout + gpu.stderr
    folder = built_bento(bento, gpu.stdout.strip().splitlines()[-1].removeprefix("__tag__:"))
    dockerfile = (folder / "env/docker/Dockerfile").read_text()
    assert "FROM nvidia/cuda:12.8" in dockerfile
    requirements = test_deploy.requirement_lines(folder / "env/python/requirements.txt")
    assert set(requirements) == set(
        test_deploy.requirement_lines(ROOT / "deploy/requirements-gpu.txt"))
    assert "torch==2.13.0" in requirements


def test_the_probe_paths_of_the_kubernetes_manifest_answer(bento):
    deployment = test_deploy.manifest("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert requests.get(f"{bento['url']}{path}", timeout=10).status_code == 200, probe


def test_the_bento_serves_the_pinned_champion_not_the_stores_latest(bento):
    info, folder = latest_bento(bento)
    pinned = json.loads((folder / "src/deploy/champion.json").read_text())
    assert pinned["mlflow_version"] == str(bento["registry"]["champion_version"])
    packed = {m["tag"] for service in info["services"] for m in service["models"]}
    assert packed == {pinned["bento_model"]}
    # a newer import of the model (the store's latest now) does not change what is served
    script = ("import sys, bentoml; from pathlib import Path; "
              "from pneumoclip.config import load_section; "
              "from pneumoclip.serving import champion_model, import_champion; "
              f"s = load_section('serve', {str(ROOT / 'params.yaml')!r}); "
              "newer = import_champion(s); "
              "print(newer.tag, champion_model(s, Path(sys.argv[1])).tag)")
    out = subprocess.run([sys.executable, "-c", script, str(folder / "src")], env=bento["env"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    newer, served = out.stdout.split()[-2:]
    assert newer != pinned["bento_model"] and served == pinned["bento_model"]


def test_the_documented_bentoml_endpoints_answer(bento):
    spec = requests.get(f"{bento['url']}/docs.json", timeout=30)
    assert spec.status_code == 200
    assert {"/classify", "/classify_batch", "/ready"} <= set(spec.json()["paths"])
    for path in ("/", "/livez", "/readyz", "/metrics"):
        assert requests.get(f"{bento['url']}{path}", timeout=30).status_code == 200, path
    docs = (ROOT / "docs/serving.md").read_text()
    for path in ("/docs.json", "/livez", "/readyz", "/metrics", "pneumoclip_batch_size"):
        assert f"`GET {path}`" in docs or f"`{path}`" in docs, path


def test_decoding_runs_off_the_event_loop(bento, tmp_path):
    """One worker decodes a batch of ten 4,000,000-pixel PNGs while /livez is polled: the
    event loop keeps answering. (Decoding inside the async handler blocked it for the whole
    batch, so the polls stopped for about as long as the batch took.)"""
    import threading
    import time

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["serve"]["workers"] = 1  # so the polls and the batch meet in the same process
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = dict(bento["env"], PNEUMOCLIP_PARAMS=str(params))
    proc, url = start_server("pneumoclip:latest", env, tmp_path / "serve.log")
    try:
        wait_http(f"{url}/readyz", 180, proc)
        rng = np.random.default_rng(1)
        big = png(Image.fromarray(rng.integers(0, 256, (2000, 2000), dtype=np.uint8)))
        files = [("images", (f"{i}.png", big, "image/png")) for i in range(10)]
        answered, done = [], threading.Event()

        def poll():
            with requests.Session() as session:
                while not done.is_set():
                    session.get(f"{url}/livez", timeout=30)
                    answered.append(time.monotonic())

        poller = threading.Thread(target=poll)
        poller.start()
        started = time.monotonic()
        batch = requests.post(f"{url}/classify_batch", files=files, timeout=300)
        took = time.monotonic() - started
        done.set()
        poller.join()
        assert batch.status_code == 200, batch.text
        during = [started, *(t for t in answered if started < t < started + took),
                  started + took]
        longest = max(b - a for a, b in zip(during, during[1:], strict=False))
        print(f"batch of 10 in {took:.2f} s; {len(during) - 2} /livez answers meanwhile, "
              f"the longest gap {longest:.3f} s")
        assert longest < took / 2, (longest, took, len(during))
    finally:
        stop(proc, 30)
