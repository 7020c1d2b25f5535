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
