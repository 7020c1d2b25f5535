"""What a cluster deploy is made of, checked without a cluster: the Bento's pinned package
set, the GPU variant of the bentofile, and the Kubernetes manifests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

BENTOFILE = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
GPU_BENTOFILE = yaml.safe_load((ROOT / "deploy/bentofile-gpu.yaml").read_text())
MANIFESTS = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/pneumoclip.yaml").read_text()))
BENTO_PORT = 3000  # BentoML's serving port, EXPOSEd by the generated Dockerfile


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {k.lower(): v for k, v in (line.split("==") for line in lines if "==" in line)}


def requirement_lines(path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_the_serving_requirements_are_the_pinned_closure_of_what_the_service_imports():
    out = subprocess.run([sys.executable, "scripts/serving_requirements.py", "--check"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    constraints = pins()
    cpu, gpu = (requirement_lines(ROOT / f"deploy/requirements-{k}.txt") for k in ("cpu", "gpu"))
    assert [r for r in cpu if not r.startswith(("torch==", "--"))] == [
        r for r in gpu if not r.startswith("torch==")]  # the same set, torch aside
    assert len(cpu) > 100  # the whole closure, not the dozen direct dependencies
    names = set()
    for line in cpu[2:]:
        name, version = line.split("==")
        names.add(name.lower())
        assert constraints.get(name.lower(), version) == version, line
    for needed in ("bentoml", "mlflow", "transformers", "peft", "starlette", "uvicorn",
                   "pydantic", "numpy", "pillow"):
        assert needed in names, needed
    assert not names & {"torch", "dvc", "pytest", "diffusers", "ruff", "psycopg"}


@pytest.mark.parametrize(("bentofile", "torch_lines"), [
    (BENTOFILE, ["--extra-index-url https://download.pytorch.org/whl/cpu",
                 f"torch=={pins()['torch']}+cpu"]),
    (GPU_BENTOFILE, [f"torch=={pins()['torch']}"]),
])
def test_each_bentofile_pins_python_and_its_torch_build(bentofile, torch_lines):
    assert bentofile["docker"]["python_version"] == "3.11"
    assert bentofile["python"]["lock_packages"] is False  # the file is already the lock
    lines = requirement_lines(ROOT / bentofile["python"]["requirements_txt"])
    assert lines[:len(torch_lines)] == torch_lines
    assert all("==" in line for line in lines[len(torch_lines) - 1:]), lines


def test_the_gpu_bentofile_differs_only_in_the_cuda_image_and_torch_build():
    cpu, gpu = json.loads(json.dumps(BENTOFILE)), json.loads(json.dumps(GPU_BENTOFILE))
    assert gpu["docker"].pop("cuda_version") == "12.8"
    assert "cuda_version" not in cpu["docker"]
    assert cpu["python"].pop("requirements_txt") == "deploy/requirements-cpu.txt"
    assert gpu["python"].pop("requirements_txt") == "deploy/requirements-gpu.txt"
    assert [e["name"] for e in cpu.pop("envs")] == ["UV_INDEX_STRATEGY"]  # two indexes
    assert cpu == gpu


def manifest(kind: str) -> dict:
    (found,) = [m for m in MANIFESTS if m["kind"] == kind]
    return found


def test_the_kubernetes_deployment_probes_and_sizes_the_bento():
    deployment, service = manifest("Deployment"), manifest("Service")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"][
        "labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["image"].rsplit("/", 1)[-1].split(":")[0] == BENTOFILE["name"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": BENTO_PORT}
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "livenessProbe",
                                                    "readinessProbe")}
    assert probes["readinessProbe"] == {"path": "/readyz", "port": "http"}
    assert probes["livenessProbe"] == probes["startupProbe"] == {"path": "/livez",
                                                                 "port": "http"}
    # the Service routes to the pods' named port
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    # memory: the request covers the serving benchmark's peak, the limit leaves headroom
    serving = json.loads((ROOT / "benchmarks/results/serving.json").read_text())
    peak_mb = max(serving["rss_mb"])
    request = mebibytes(container["resources"]["requests"]["memory"])
    limit = mebibytes(container["resources"]["limits"]["memory"])
    assert peak_mb * 1.1 <= request < limit
    # the limit also holds a burst: per worker the admitted bodies, one file being joined and
    # the images being decoded, as tests/test_serving.py's burst test bounds them
    serve = yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]
    assert peak_mb + burst_bound(serve) / 2**20 <= limit
    # one CPU per serve worker (each runs one torch thread)
    workers = serve["workers"]
    assert float(container["resources"]["requests"]["cpu"]) == workers


def burst_bound(serve: dict) -> float:
    """Bytes a burst of uploads may add to a server at rest: per worker the admitted bodies
    (serve.max_in_flight_bytes), one more file while a part's bytes are joined, and
    `decode_threads` images being decoded (80 MB each at most, at 4,000,000 pixels; measured
    in the burst test), with 10% for the allocator."""
    return 1.1 * serve["workers"] * (serve["max_in_flight_bytes"] + serve["max_bytes"]
                                     + serve["decode_threads"] * 80e6)


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]
