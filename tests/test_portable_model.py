"""The logged MLflow model is self-contained: it loads and predicts in a Python that cannot
import pneumoclip, offline, with the base folder it was trained on gone (issue 13, item 6)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE

SRC = ROOT / "src"
PACKAGE = SRC / "pneumoclip"
MODEL_NAME = "portable-classifier"
HUB_ID = "openai/clip-vit-large-patch14"  # what the meta claims: never fetched here

# Run with `python -c SCRIPT SRC MODEL_URI IMAGE`: hide the project's source (the editable
# install's .pth entry, and a setuptools editable finder if there is one), prove that
# pneumoclip cannot be imported, then load the model and predict one image.
BLOCKED_LOAD = """
import json, sys
from pathlib import Path

src = Path(sys.argv[1]).resolve()
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != src]
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks
                     if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
try:
    import pneumoclip
except ImportError:
    pass
else:
    raise SystemExit(f"pneumoclip is importable here: {list(pneumoclip.__path__)}")

import mlflow.pyfunc
import pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[2])
out = model.predict(pd.DataFrame({"image": [Path(sys.argv[3]).read_bytes()]}))
import pneumoclip.classifier

print("RESULT " + json.dumps({
    "label": out["label"][0],
    "probs": {c.removeprefix("prob_"): float(out[c][0]) for c in out.columns if c != "label"},
    "classifier": pneumoclip.classifier.__file__,
}))
"""


def dir_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A model folder on a 'hub' base (a tiny random CLIP saved where models/base/clip would
    be, whose meta names a hub id), with a random (non-identity) LoRA adapter, logged with
    `log_classifier` to a SQLite store and registered as @champion; plus the in-process
    prediction on one sample image."""
    import mlflow
    from mlflow import MlflowClient
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPModel, CLIPProcessor

    from pneumoclip import tracking
    from pneumoclip.base_models import build_tiny_clip
    from pneumoclip.classifier import META_FILE, ClipClassifier, read_image
    from pneumoclip.config import load_section

    root = tmp_path_factory.mktemp("portable")
    base = root / "base" / "clip"
    build_tiny_clip(load_section("base_models", ROOT / "params.yaml").tiny_clip, 0, base)
    source = {"source": HUB_ID, "revision": "0123456789abcdef0123456789abcdef01234567"}
    (base / "pneumoclip_source.json").write_text(json.dumps(source))

    model_dir = root / "clip-lora" / "real"
    torch.manual_seed(7)  # init_lora_weights=False: a random, non-identity adapter
    lora = get_peft_model(CLIPModel.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(model_dir)
    CLIPProcessor.from_pretrained(base).save_pretrained(model_dir)
    prompts = load_section("train_clip", ROOT / "params.yaml").prompts
    classes = list(prompts)
    meta = {"classes": classes, "prompts": prompts, "base": str(base),
            "base_source": source["source"], "base_revision": source["revision"],
            "base_is_tiny": False, "temperature": 1.0, "variant": "real"}
    (model_dir / META_FILE).write_text(json.dumps(meta))

    image = root / "xray.png"
    image.write_bytes(tracking.image_bytes(sorted(SAMPLE.rglob("*.jpeg"))[0]))
    expected = ClipClassifier.load(model_dir).predict([read_image(image.read_bytes())])[0]

    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the experiment's artifacts go to root/mlartifacts
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        try:
            ml = tracking.setup("portable")
            path = list(sys.path)
            with ml.start_run():
                info = tracking.log_classifier(ml, model_dir, image.read_bytes(), classes)
            path_after = list(sys.path)
            client = MlflowClient(uri)
            version = ml.register_model(info.model_uri, MODEL_NAME)
            client.set_registered_model_alias(MODEL_NAME, "champion", version.version)
        finally:
            mlflow.set_tracking_uri(previous)  # None: back to MLflow's default
    (saved,) = (root / "mlartifacts").rglob("MLmodel")
    return {"root": root, "base": base, "uri": uri, "image": image, "expected": expected,
            "saved": saved.parent, "sys_path": (path, path_after)}


def load_blocked(logged, tmp_path: Path) -> dict:
    """Load models:/...@champion and predict, in a Python that cannot import pneumoclip."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HOME")}
    env |= {"MLFLOW_TRACKING_URI": logged["uri"], "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}  # empty cache
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_LOAD, str(SRC), f"models:/{MODEL_NAME}@champion",
         str(logged["image"])],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def assert_same(found: dict, expected: dict) -> None:
    assert found["label"] == expected["label"]
    assert found["probs"].keys() == expected["probabilities"].keys()
    np.testing.assert_allclose(list(found["probs"].values()),
                               list(expected["probabilities"].values()), atol=1e-5)


def test_the_model_loads_and_predicts_where_pneumoclip_cannot_be_imported(logged, tmp_path):
    found = load_blocked(logged, tmp_path)
    assert_same(found, logged["expected"])
    carried = Path(found["classifier"])  # the model's own copy of the package
    assert carried.parts[-3:] == ("code", "pneumoclip", "classifier.py")
    assert not carried.resolve().is_relative_to(SRC.resolve())


def test_the_model_carries_its_hub_base_and_loads_offline_without_it(logged, tmp_path):
    base = logged["base"]
    moved = base.with_name("clip-moved")
    base.rename(moved)
    try:
        found = load_blocked(logged, tmp_path)
    finally:
        moved.rename(base)
    assert_same(found, logged["expected"])


def test_the_logged_model_holds_the_package_source_and_the_base_files(logged):
    before, after = logged["sys_path"]
    assert after == before  # the check of the input example left no code/ folder on it
    saved = logged["saved"]
    for name in ("classifier.py", "tracking.py"):
        assert (saved / "code" / "pneumoclip" / name).is_file(), name
    carried_base = saved / "artifacts" / "classifier" / "base"
    assert {p.name for p in logged["base"].iterdir()} <= {p.name for p in carried_base.iterdir()}
    assert dir_size(carried_base) == dir_size(logged["base"])
    code_kb = dir_size(saved / "code") / 1e3
    print(f"logged model: {dir_size(saved) / 1e6:.2f} MB (base "
          f"{dir_size(carried_base) / 1e6:.2f} MB, code {code_kb:.0f} kB)")


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (at module level or in a function),
    less the standard library and pneumoclip."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "pneumoclip"}


def normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_the_requirements_pin_every_package_the_carried_code_imports(logged):
    from importlib.metadata import packages_distributions, version

    from pneumoclip import tracking

    pinned = dict(r.split("==") for r in tracking.requirements())
    pinned = {normal(n): v for n, v in pinned.items()}
    distributions = packages_distributions()
    for module in ("classifier.py", "tracking.py"):
        for name in third_party_imports(PACKAGE / module):
            dists = {normal(d) for d in distributions[name]}  # mlflow: three of them
            assert dists & pinned.keys(), f"{module} imports {name} ({', '.join(dists)}), " \
                                          "which requirements() leaves out"
    for dist, pin in pinned.items():
        assert pin == version(dist).split("+")[0], dist
    logged_reqs = (logged["saved"] / "requirements.txt").read_text().split()
    assert sorted(logged_reqs) == sorted(tracking.requirements())
