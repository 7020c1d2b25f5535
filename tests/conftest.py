from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample"
BIN = Path(sys.executable).parent  # the venv's console scripts: pneumoclip, dvc, mlflow

os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_MININTERVAL", "5")  # keep progress bars from flooding logs


# A test that needs one of these trains models or starts servers: it runs in the full suite
# only, not in the fast lane (`pytest -m "not slow"`).
SLOW_FIXTURES = {"trained", "sd", "synthetic", "project", "bento", "mlflow_server",
                 "postgres"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


def write_xray(path: Path, seed: int, size: int = 32) -> Path:
    """A small real JPEG (random grayscale pixels) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path, format="JPEG")
    return path


@pytest.fixture
def kermany(tmp_path: Path):
    """Build a tiny Kermany-layout dataset: kermany({"train/NORMAL/IM-0001-0001.jpeg": 1, ...})."""

    def build(files: dict[str, int], root: Path | None = None) -> Path:
        root = root or tmp_path / "data"
        for rel, seed in files.items():
            write_xray(root / "chest_xray" / rel, seed)
        return root

    return build


def many_patients(split: str = "train", per_class: int = 12, start: int = 0) -> dict[str, int]:
    """Two images each for `per_class` patients of every class, with distinct pixels."""
    files = {}
    for i in range(start, start + per_class):
        for k in (1, 2):
            files[f"{split}/NORMAL/IM-{i:04d}-000{k}.jpeg"] = 10_000 + 10 * i + k
            files[f"{split}/PNEUMONIA/person{i}_bacteria_{k}.jpeg"] = 20_000 + 10 * i + k
            files[f"{split}/PNEUMONIA/person{1000 + i}_virus_{k}.jpeg"] = 30_000 + 10 * i + k
    return files


@pytest.fixture
def sample_copy(tmp_path: Path) -> Path:
    """A private copy of the bundled sample (Kermany layout)."""
    dest = tmp_path / "sample"
    shutil.copytree(SAMPLE, dest)
    return dest


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc=None) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


# MLflow's job runner (GenAI trace jobs, on by default with a database store) would start
# eight more processes; training and the registry do not use it
SERVER_ENV = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")


def postgres_bin() -> Path:
    """The folder of Debian's PostgreSQL server programs (initdb, postgres, pg_isready)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = str(found[-1]) if found else shutil.which("initdb")
    if not initdb:
        pytest.fail("no PostgreSQL server: `bash scripts/setup.sh --dev` installs it with apt")
    return Path(initdb).parent


def stop(proc, timeout: float = 15) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on 127.0.0.1 with its own data folder and port, run as a
    non-root user (the server refuses root); yields the URI of an empty `mlflow` database."""
    import subprocess
    import tempfile
    import time

    pg = postgres_bin()
    # pytest's own temp folders are root-only: the server's user could not enter them
    root = Path(tempfile.mkdtemp(prefix="pneumoclip-pg-"))
    as_user = {}
    if os.geteuid() == 0:
        as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
        shutil.chown(root, "postgres", "postgres")
    password, port = "mlflow-test-pw", free_port()
    (root / "pw").write_text(password)
    if as_user:
        shutil.chown(root / "pw", "postgres", "postgres")
    env = dict(os.environ, PGPASSWORD=password, LC_ALL="C")

    def run(*args: str) -> None:
        out = subprocess.run([str(pg / args[0]), *args[1:]], cwd=root, env=env,
                             capture_output=True, text=True, **as_user)
        assert out.returncode == 0, f"{args[0]}: {out.stdout}{out.stderr}"

    run("initdb", "-D", str(root / "data"), "-U", "mlflow", "--pwfile", str(root / "pw"),
        "--auth", "scram-sha-256", "-E", "UTF8", "--no-sync")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(pg / "postgres"), "-D", str(root / "data"), "-h", "127.0.0.1", "-p", str(port),
         "-k", str(root), "-c", "fsync=off"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, **as_user)
    deadline = time.monotonic() + 60
    while subprocess.run([str(pg / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                         env=env).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((root / "server.log").read_text()[-3000:])
        time.sleep(0.2)
    run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
    yield f"postgresql://mlflow:{password}@127.0.0.1:{port}/mlflow"
    stop(proc)
    log.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, postgres):
    """A real MLflow tracking server on 127.0.0.1 as a team runs it: a PostgreSQL backend
    store and a proxied artifact store (`--artifacts-destination`).

    MLFLOW_TRACKING_URI points at it for the whole session, so nothing lands in the repo.
    (tests/test_pipeline.py serves the SQLite store that the main command writes.)
    """
    import subprocess

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", postgres,
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=SERVER_ENV,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 120, proc)
    except Exception:
        proc.kill()
        raise RuntimeError((root / "server.log").read_text()[-3000:]) from None
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    stop(proc)
    log.close()


def project_params(root: Path, **sections) -> Path:
    """The project's params.yaml relocated under `root` (outputs stay there), on the bundled
    sample; `sections` override keys, nested mappings merged: {"train_clip": {"epochs": 2}}."""
    from pneumoclip.config import write_relocated

    sections["prepare"] = {"data_dir": str(SAMPLE)} | sections.get("prepare", {})
    # the shipped pretrained tiny bases stay where they are: an input, never written
    sections["base_models"] = ({"tiny_dir": str(ROOT / "bases/tiny")}
                               | sections.get("base_models", {}))
    return write_relocated(root, ROOT / "params.yaml", **sections)


def copy_project(dest: Path, files: list[str]) -> None:
    """The project's `files` (and its DVC config) in `dest`: a fresh clone in miniature."""
    import shutil

    for rel in files:
        src = ROOT / rel
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dest / rel)
    (dest / ".dvc").mkdir()
    for rel in (".dvc/config", ".dvc/.gitignore"):
        shutil.copyfile(ROOT / rel, dest / rel)


def sharing_project(bases: Path, name: str, **sections) -> Path:
    """`project_params` under `bases/name`, reading the bases and the prepared index that a
    project at `bases` built (so several runs share one `base_models` and `prepare`) and
    writing its own outputs."""
    import yaml

    root = bases / name
    params = project_params(root, **sections)
    data = yaml.safe_load(params.read_text())
    for section in ("train_clip", "sd_lora", "synthesize", "evaluate"):
        for key in ("base_dir", "index"):
            if key in data[section]:
                data[section][key] = data[section][key].replace(str(root), str(bases))
    for variant in data["variants"].values():
        variant["train_data"] = variant["train_data"].replace(str(root), str(bases))
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    return params


EPOCHS = 4  # enough to see the loss fall on the sample, quick on a CPU


def cli(*args: str, check: bool = True, **kw):
    """Run the real `pneumoclip` console script from the project root."""
    import subprocess

    proc = subprocess.run(["pneumoclip", *args], cwd=ROOT, capture_output=True, text=True, **kw)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mlflow_server):
    """Base models, the prepared sample and a `real` model trained for a few epochs and
    evaluated, all logged to the session's MLflow server."""
    root = tmp_path_factory.mktemp("clf")
    params = project_params(
        root, train_clip={"epochs": EPOCHS, "patience": 10}, evaluate={"bootstrap": 200},
        register={"models_dir": str(root / "models/clip-lora"),
                  "metrics_dir": str(root / "metrics"), "variants": ["real"],
                  "out": str(root / "registry.json")},
    )
    cli("base-models", "--params", str(params))
    cli("prepare", "--params", str(params))
    out = cli("train-clip", "--params", str(params), "--variant", "real")
    return {"root": root, "params": params, "model": root / "models/clip-lora/real",
            "log": out.stdout + out.stderr, "uri": mlflow_server}


def dicom_bytes(image: Image.Image, *, photometric: str = "MONOCHROME2", bits: int = 8,
                window: tuple[float, float] | None = None, compress: str | None = None) -> bytes:
    """A DICOM file (preamble, file meta, a DX image) of `image`'s gray pixels, via pydicom.

    It displays as `image`'s grayscale: MONOCHROME1 stores the inverted values; bits=16
    stores 12-bit values 16 * v + 8 that its Rescale Slope 0.0625 and Intercept -0.5 bring
    back to v. `window` (center, width) is written as given (in those 0-255 units).
    `compress`, a transfer syntax UID: pydicom encodes it when it can (RLE Lossless
    natively); otherwise the uncompressed bytes are only labelled with it, a file that no
    decoder reads (for refusal tests).
    """
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_encoder
    from pydicom.uid import UID, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

    gray = np.asarray(image.convert("L"))
    if bits == 8:
        stored, depth = gray.copy(), 8
    elif bits == 16:
        stored, depth = gray.astype(np.uint16) * 16 + 8, 12
    else:
        raise ValueError(f"bits must be 8 or 16, not {bits}")
    if photometric == "MONOCHROME1":
        stored = (2**depth - 1) - stored
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, depth, depth - 1
    ds.PixelRepresentation = 0
    if bits == 16:
        ds.RescaleSlope, ds.RescaleIntercept = "0.0625", "-0.5"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = (f"{v:g}" for v in window)
    ds.PixelData = stored.tobytes()
    if compress is not None:
        try:
            encodable = get_encoder(compress).is_available
        except NotImplementedError:
            encodable = False
        if encodable:
            ds.compress(compress, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = UID(compress)
            ds.PixelData = encapsulate([stored.tobytes()])
            ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
