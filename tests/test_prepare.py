from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT, many_patients, write_xray

from pneumoclip.cli import main
from pneumoclip.config import load_section
from pneumoclip.prepare import Rejected, parse_label, patient_id, prepare, read_index


def run_prepare(data: Path, out: Path, **kw):
    shipped = load_section("prepare", ROOT / "params.yaml")
    params = dataclasses.replace(shipped, data_dir=str(data), out_dir=str(out), **kw)
    report = prepare(params)
    return report, read_index(out / "index.csv")


# ---------------------------------------------------------------- label and patient parsing


@pytest.mark.parametrize(
    ("folder", "name", "label"),
    [
        ("NORMAL", "IM-0115-0001.jpeg", "NORMAL"),
        ("NORMAL", "NORMAL2-IM-1427-0001.jpeg", "NORMAL"),
        ("PNEUMONIA", "person1_bacteria_1.jpeg", "BACTERIA"),
        ("PNEUMONIA", "person19_virus_50.jpeg", "VIRUS"),
        ("PNEUMONIA", "PERSON19_VIRUS_50.JPEG", "VIRUS"),
    ],
)
def test_label_comes_from_folder_and_file_name(folder, name, label):
    assert parse_label(folder, name) == label


@pytest.mark.parametrize(
    ("folder", "name", "why"),
    [
        ("PNEUMONIA", "person1_1.jpeg", "exactly one of _bacteria_ or _virus_"),
        ("PNEUMONIA", "person1_bacteria_virus_1.jpeg", "exactly one of"),
        ("COVID", "x_1.jpeg", "unknown class folder 'COVID'"),
    ],
)
def test_unparseable_labels_are_rejected_with_a_reason(folder, name, why):
    with pytest.raises(Rejected, match=why):
        parse_label(folder, name)


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person19_virus_50.jpeg", "person19"),
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0429-0001-0002.jpeg", "IM-0429"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
    ],
)
def test_patient_id_is_the_file_name_prefix(name, patient):
    assert patient_id(name) == patient


def test_patient_ids_and_labels_agree_with_the_sample_layout():
    rows = [p for p in (ROOT / "sample" / "chest_xray").rglob("*.jpeg")]
    assert len(rows) > 200
    labels = Counter(parse_label(p.parent.name, p.name) for p in rows)
    assert set(labels) == {"NORMAL", "BACTERIA", "VIRUS"}
    assert min(labels.values()) >= 90


# ---------------------------------------------------------------- splitting


def assert_disjoint(rows):
    for key in ("patient_id", "sha256"):
        splits_of = {}
        for row in rows:
            splits_of.setdefault(row[key], set()).add(row["split"])
        shared = {k: v for k, v in splits_of.items() if len(v) > 1}
        assert not shared, f"{key} in two splits: {list(shared.items())[:3]}"


def test_sample_splits_are_patient_disjoint_stratified_and_complete(sample_copy, tmp_path):
    report, rows = run_prepare(sample_copy, tmp_path / "out")
    assert len(rows) == 316 == report["images"]
    assert_disjoint(rows)
    counts = Counter((r["split"], r["label"]) for r in rows)
    for split in ("train", "val", "test"):
        for label in ("NORMAL", "BACTERIA", "VIRUS"):
            assert counts[(split, label)] > 0, (split, label)
    # about 15% val and 15% test, stratified: each class's share is within 8 points
    for label in ("NORMAL", "BACTERIA", "VIRUS"):
        n = sum(counts[(s, label)] for s in ("train", "val", "test"))
        for split in ("val", "test"):
            assert abs(counts[(split, label)] / n - 0.15) < 0.08
    # val/ of Kermany is merged into the pool, never kept as its own split
    val_folder = [r for r in rows if "/val/" in r["path"]]
    assert val_folder and {r["split"] for r in val_folder} <= {"train", "val", "test"}


def test_splits_are_reproducible_and_follow_the_seed(sample_copy, tmp_path):
    _, a = run_prepare(sample_copy, tmp_path / "a", seed=0)
    _, b = run_prepare(sample_copy, tmp_path / "b", seed=0)
    _, c = run_prepare(sample_copy, tmp_path / "c", seed=1)
    assert a == b
    assert [r["split"] for r in a] != [r["split"] for r in c]


def test_official_test_folder_is_kept_as_the_test_split(kermany, tmp_path):
    files = many_patients("train") | many_patients("test", per_class=3, start=500)
    data = kermany(files)
    report, rows = run_prepare(data, tmp_path / "out")
    assert {r["split"] for r in rows if "/test/" in r["path"]} == {"test"}
    assert {r["split"] for r in rows if "/train/" in r["path"]} == {"train", "val"}
    assert report["official_test_split"] is True
    assert all(r["patient_id"].startswith("test/") for r in rows if r["split"] == "test")
    assert_disjoint(rows)


def test_a_patient_never_straddles_splits_even_with_many_images(kermany, tmp_path):
    files = many_patients("train", per_class=15)
    for k in range(3, 9):  # one patient with many images
        files[f"train/PNEUMONIA/person3_bacteria_{k}.jpeg"] = 90_000 + k
    _, rows = run_prepare(kermany(files), tmp_path / "out")
    assert len({r["split"] for r in rows if r["patient_id"] == "person3"}) == 1
    assert_disjoint(rows)


# ---------------------------------------------------------------- dedupe


def test_duplicates_are_dropped_across_splits_and_test_copy_wins(kermany, tmp_path):
    files = many_patients("train") | many_patients("test", per_class=3, start=500)
    data = kermany(files)
    test_img = data / "chest_xray/test/NORMAL/IM-0500-0001.jpeg"
    copy = data / "chest_xray/train/NORMAL/IM-0900-0001.jpeg"
    shutil.copyfile(test_img, copy)
    report, rows = run_prepare(data, tmp_path / "out")
    paths = {r["path"] for r in rows}
    assert test_img.as_posix() in paths and copy.as_posix() not in paths
    (dup,) = report["duplicates_dropped"]
    assert dup["path"] == copy.as_posix() and dup["duplicate_of"] == test_img.as_posix()
    assert_disjoint(rows)


def test_same_image_with_two_labels_is_dropped_entirely(kermany, tmp_path):
    data = kermany(many_patients("train"))
    normal = data / "chest_xray/train/NORMAL/IM-0001-0001.jpeg"
    shutil.copyfile(normal, data / "chest_xray/train/PNEUMONIA/person77_virus_1.jpeg")
    report, rows = run_prepare(data, tmp_path / "out")
    both = ("IM-0001-0001.jpeg", "person77_virus_1.jpeg")
    assert not [r for r in rows if r["path"].endswith(both)]
    reasons = {d["reason"] for d in report["duplicates_dropped"]}
    assert reasons == {"same image, different labels"}


# ---------------------------------------------------------------- bad input


def bad_files(root: Path) -> dict[str, str]:
    """Write one file per kind of bad input; returns file -> expected reason fragment."""
    base = root / "chest_xray/train"
    (base / "NORMAL/IM-0901-0001.jpeg").write_bytes(b"")
    (base / "NORMAL/IM-0902-0001.jpeg").write_text("this is not an image")
    good = write_xray(root / "tmp.jpeg", 1, size=64).read_bytes()
    (root / "tmp.jpeg").unlink()
    (base / "NORMAL/IM-0903-0001.jpeg").write_bytes(good[: len(good) // 2])
    (base / "NORMAL/notes.txt").write_text("hello")
    write_xray(base / "PNEUMONIA/person901_1.jpeg", 2)
    write_xray(base / "COVID/person902_virus_1.jpeg", 3)
    write_xray(root / "chest_xray/extra/NORMAL/IM-0904-0001.jpeg", 4)
    return {
        "IM-0901-0001.jpeg": "empty file (0 bytes)",
        "IM-0902-0001.jpeg": "not a readable image",
        "IM-0903-0001.jpeg": "not a readable image",
        "notes.txt": "extension '.txt' is not one of",
        "person901_1.jpeg": "exactly one of _bacteria_ or _virus_",
        "COVID": "unknown class folder",
        "extra": "unknown split folder",
    }


def test_every_bad_file_is_skipped_and_listed_with_its_reason(kermany, tmp_path):
    data = kermany(many_patients("train"))
    expected = bad_files(data)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["prepare", "--data-dir", str(data), "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "files rejected: 7" in result.output
    report = json.loads((out / "report.json").read_text())
    got = {Path(r["path"]).name: r["reason"] for r in report["rejected"]}
    assert set(got) == set(expected)
    for name, fragment in expected.items():
        assert fragment in got[name], (name, got[name])
    with open(out / "index.csv") as fh:
        indexed = {Path(r["path"]).name for r in csv.DictReader(fh)}
    assert not indexed & set(expected)
    assert len(indexed) == 72
    md = (out / "report.md").read_text()
    assert "Files rejected: 7" in md and "empty file (0 bytes)" in md


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "data directory '{data}' does not exist; expected {{train,val,test}}"),
        ("empty", "no train/, val/ or test/ folder in '{data}'"),
        ("only_bad", "no usable images under '{data}' (1 files rejected)"),
        ("too_few", "cannot carve a test split of 15%: it needs at least 7 patients, found 3"),
    ],
)
def test_unusable_dataset_exits_non_zero_with_a_clear_message(tmp_path, layout, message):
    data = tmp_path / "data"
    if layout != "missing":
        data.mkdir()
    if layout == "only_bad":
        (data / "chest_xray/train/NORMAL").mkdir(parents=True)
        (data / "chest_xray/train/NORMAL/IM-0001-0001.jpeg").write_bytes(b"")
    if layout == "too_few":
        for i in range(3):
            write_xray(data / f"chest_xray/train/NORMAL/IM-{i:04d}-0001.jpeg", i)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["prepare", "--data-dir", str(data), "--out-dir", str(out)])
    assert result.exit_code == 1
    assert message.format(data=data) in result.output
    assert not out.exists(), "a failed run must not leave a partial output"


def test_a_failed_run_keeps_the_last_good_output(sample_copy, tmp_path):
    out = tmp_path / "out"
    run_prepare(sample_copy, out)
    before = (out / "index.csv").read_bytes()
    shutil.rmtree(sample_copy / "chest_xray")
    result = CliRunner().invoke(
        main, ["prepare", "--data-dir", str(sample_copy), "--out-dir", str(out)]
    )
    assert result.exit_code == 1
    assert (out / "index.csv").read_bytes() == before


def test_console_script_runs_the_stage(sample_copy, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["pneumoclip", "prepare", "--data-dir", str(sample_copy), "--out-dir", str(out)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| all | 108 | 108 | 100 | 316 |" in proc.stdout
