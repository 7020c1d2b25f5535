"""The shift benchmark's parts: fixed, deterministic perturbations, the label-shift subset,
and recall intervals that agree with the point estimate."""

from __future__ import annotations

import sys

import numpy as np
from conftest import ROOT, SAMPLE
from PIL import Image

sys.path.insert(0, str(ROOT / "benchmarks"))
import shift  # noqa: E402

XRAY = sorted((SAMPLE / "chest_xray/train/NORMAL").glob("*.jpeg"))[0]


def test_each_perturbation_is_deterministic_keeps_the_size_and_changes_the_image():
    image = Image.open(XRAY).convert("L")
    names = [p.name for p in shift.PERTURBATIONS]
    assert len(set(names)) == len(names) and names[0] == "none"
    for p in shift.PERTURBATIONS:
        a, b = p.apply(image, "ab" * 32), p.apply(image, "ab" * 32)
        assert np.array_equal(np.asarray(a), np.asarray(b)), p.name
        if p.fn is None:
            assert a is image
            continue
        assert a.mode == "L", p.name
        assert not np.array_equal(np.asarray(a), np.asarray(image)), p.name
        if p.name != "crop-0.8":
            assert a.size == image.size, p.name
    # the noise is seeded by the image: another image hash draws another noise
    noise = next(p for p in shift.PERTURBATIONS if p.name == "noise")
    assert not np.array_equal(np.asarray(noise.apply(image, "ab" * 32)),
                              np.asarray(noise.apply(image, "cd" * 32)))


def test_towards_normal_keeps_whole_patients_and_reaches_the_share():
    rows = ([{"patient_id": f"n{i}", "label": "NORMAL"} for i in range(30)]
            + [{"patient_id": f"b{i // 2}", "label": "BACTERIA"} for i in range(60)]
            + [{"patient_id": f"v{i}", "label": "VIRUS"} for i in range(30)])
    kept = shift.towards_normal(rows, 0.5, seed=0)
    assert kept == sorted(kept)
    labels = [rows[i]["label"] for i in kept]
    assert labels.count("NORMAL") == 30 and labels.count("NORMAL") / len(labels) >= 0.5
    assert len(labels) > 50  # it fills up to the share, not just the NORMAL images
    patients = {rows[i]["patient_id"] for i in kept}
    assert all(i in kept for i, r in enumerate(rows) if r["patient_id"] in patients)
    assert kept == shift.towards_normal(rows, 0.5, seed=0)


def test_recall_intervals_bracket_the_recall():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 3, 300))
    groups = [f"p{i // 2}" for i in range(300)]
    intervals = shift.recall_ci(y, pred, groups, 3, 200, seed=0)
    for c, (low, high) in enumerate(intervals):
        recall = np.mean(pred[y == c] == c)
        assert low <= recall <= high and high - low < 0.3


def test_the_benchmark_scores_a_trained_model_and_compares_its_runs(trained, tmp_path):
    """The command end to end on a trained model: every set is scored with and without EM,
    the run records the model's validation macro-F1, and a second run under another name
    keeps the first and shows up side by side."""
    import json
    import subprocess

    root, out = trained["root"], tmp_path / "shift.json"

    def bench(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "benchmarks/shift.py"), "--model", str(trained["model"]),
             "--index", str(root / "artifacts/prepared/index.csv"), "--name", name,
             "--limit", "12", "--out", str(out), "--params", str(trained["params"])],
            capture_output=True, text=True, check=True)

    bench("first")
    second = bench("second")
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["first", "second"]
    val = json.loads((trained["model"] / "val_metrics.json").read_text())["val_macro_f1"]
    names = [p.name for p in shift.PERTURBATIONS] + [shift.LABEL_SHIFT["name"]]
    for run in runs.values():
        assert run["val_macro_f1"] == val
        assert [s["name"] for s in run["sets"]] == names
        for s in run["sets"][:-1]:
            assert s["n"] == 12 and 0 <= s["plain"]["macro_f1"] <= 1
            assert s["em"]["priors"] and abs(sum(s["em"]["priors"].values()) - 1) < 1e-6
    assert runs["first"]["sets"][0]["plain"] == runs["second"]["sets"][0]["plain"]
    assert "| set | first | second |" in second.stdout
    assert f"**validation macro-F1** (picks) | **{val:.3f}** | **{val:.3f}** |" in second.stdout
