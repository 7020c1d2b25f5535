"""`prepare` stage: index a Kermany-layout dataset into patient-disjoint splits.

Input layout (the Kaggle "chest-xray-pneumonia" folder), under `data_dir` or
`data_dir/chest_xray`::

    {train,val,test}/NORMAL/IM-0115-0001.jpeg
    {train,val,test}/PNEUMONIA/person19_virus_50.jpeg

Output: `index.csv` (path, label, patient_id, split, sha256), `report.json` and `report.md`.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from pneumoclip.config import PrepareParams
from pneumoclip.fsutil import atomic_dir, sha256_file

CLASSES = ("NORMAL", "BACTERIA", "VIRUS")
SOURCE_SPLITS = ("train", "val", "test")
CLASS_FOLDERS = ("NORMAL", "PNEUMONIA")
SPLITS = ("train", "val", "test")
INDEX_COLUMNS = ("path", "label", "patient_id", "split", "sha256")
LAYOUT_HINT = "{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg (optionally below chest_xray/)"


class PrepareError(RuntimeError):
    """The dataset cannot be prepared at all (missing, empty, too small to split)."""


class Rejected(ValueError):
    """One file is skipped; the message says why and goes into the report."""


@dataclass
class Record:
    path: str
    label: str
    patient_id: str
    source: str  # the folder it came from: train, val or test
    sha256: str
    split: str = ""


# ---------------------------------------------------------------- file names


def parse_label(class_folder: str, filename: str) -> str:
    """NORMAL from the folder; BACTERIA or VIRUS from a PNEUMONIA file's name."""
    if class_folder == "NORMAL":
        return "NORMAL"
    if class_folder != "PNEUMONIA":
        raise Rejected(f"unknown class folder {class_folder!r} (expected NORMAL or PNEUMONIA)")
    name = filename.lower()
    bacteria, virus = "_bacteria_" in name, "_virus_" in name
    if bacteria == virus:
        raise Rejected("PNEUMONIA file name must contain exactly one of _bacteria_ or _virus_")
    return "BACTERIA" if bacteria else "VIRUS"


_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM = re.compile(r"^(.*?IM-\d+)-\d+", re.IGNORECASE)  # IM-0429-0001(-0001), NORMAL2-IM-1427-0001
_IMAGE_NUMBER = re.compile(r"^(.+)-\d+$")


def patient_id(filename: str) -> str:
    """The patient key is the file-name prefix: person19, IM-0115, NORMAL2-IM-1427."""
    stem = Path(filename).stem
    match = _PERSON.match(stem) or _IM.match(stem) or _IMAGE_NUMBER.match(stem)
    if not match:
        raise Rejected(f"cannot derive a patient id from file name {filename!r}")
    return match.group(1)


# ---------------------------------------------------------------- scanning


def find_root(data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise PrepareError(
            f"data directory {str(data_dir)!r} does not exist; expected {LAYOUT_HINT}"
        )
    for root in (data_dir / "chest_xray", data_dir):
        if any((root / split).is_dir() for split in SOURCE_SPLITS):
            return root
    raise PrepareError(
        f"no train/, val/ or test/ folder in {str(data_dir)!r}; expected {LAYOUT_HINT}"
    )


def check_image(path: Path) -> None:
    if path.stat().st_size == 0:
        raise Rejected("empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()
    except Image.DecompressionBombError as err:
        raise Rejected(f"image too large: {err}") from err
    except Exception as err:  # PIL raises many types for broken files
        raise Rejected(f"not a readable image: {err}") from err


def scan(data_dir: Path, extensions: list[str]) -> tuple[list[Record], list[dict]]:
    """Read every file below the split folders; return good records and rejected files."""
    root = find_root(data_dir)
    rejected: list[dict] = []
    candidates: list[tuple[Path, str, str]] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name not in SOURCE_SPLITS:
            if entry.is_dir():
                rejected.append({"path": entry.as_posix(), "reason": "unknown split folder"})
            continue
        for class_dir in sorted(entry.iterdir()):
            if class_dir.name.startswith("."):
                continue
            if not class_dir.is_dir() or class_dir.name not in CLASS_FOLDERS:
                rejected.append(
                    {"path": class_dir.as_posix(), "reason": "unknown class folder"}
                )
                continue
            for file in sorted(class_dir.rglob("*")):
                if file.is_file() and not file.name.startswith("."):
                    candidates.append((file, entry.name, class_dir.name))

    records: list[Record] = []
    allowed = {e.lower() for e in extensions}
    reading = tqdm(candidates, desc="prepare: reading", unit="img", disable=None)
    for file, source, class_folder in reading:
        try:
            if file.suffix.lower() not in allowed:
                raise Rejected(f"extension {file.suffix!r} is not one of {sorted(allowed)}")
            label = parse_label(class_folder, file.name)
            patient = patient_id(file.name)
            check_image(file)
        except Rejected as err:
            rejected.append({"path": file.as_posix(), "reason": str(err)})
            continue
        if source == "test":
            # The official test split numbers its patients independently of train, so
            # its prefixes are not the same people: keep them in their own namespace.
            patient = f"test/{patient}"
        records.append(Record(file.as_posix(), label, patient, source, sha256_file(file)))
    return records, rejected


def dedupe(records: list[Record]) -> tuple[list[Record], list[dict]]:
    """Keep one copy per content hash, across splits; test copies win over train copies.

    Copies that disagree on the label are all dropped: there is no way to tell which is right.
    """
    priority = {"test": 0, "train": 1, "val": 2}
    by_hash: dict[str, list[Record]] = {}
    for record in sorted(records, key=lambda r: (priority[r.source], r.path)):
        by_hash.setdefault(record.sha256, []).append(record)
    kept, dropped = [], []
    for copies in by_hash.values():
        if len({r.label for r in copies}) > 1:
            dropped += [
                {"path": r.path, "duplicate_of": None, "reason": "same image, different labels"}
                for r in copies
            ]
            continue
        kept.append(copies[0])
        dropped += [
            {"path": r.path, "duplicate_of": copies[0].path, "reason": "duplicate content"}
            for r in copies[1:]
        ]
    kept.sort(key=lambda r: r.path)
    return kept, dropped


# ---------------------------------------------------------------- splitting


def grouped_holdout(
    labels: list[str], groups: list[str], fraction: float, seed: int, what: str
) -> np.ndarray:
    """Boolean mask of a patient-grouped, class-stratified holdout of about `fraction`."""
    n_splits = max(2, round(1 / fraction))
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise PrepareError(
            f"cannot carve a {what} split of {fraction:.0%}: it needs at least {n_splits} "
            f"patients, found {n_groups}"
        )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, holdout = next(folds.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[holdout] = True
    return mask


def assign_splits(records: list[Record], params: PrepareParams) -> None:
    """Set `split` on every record: official test kept, val/ merged into train, grouped val."""
    has_test = any(r.source == "test" for r in records)
    pool = [r for r in records if r.source != "test"]
    for r in records:
        r.split = "test" if r.source == "test" else "train"
    if not has_test:
        mask = grouped_holdout(
            [r.label for r in pool], [r.patient_id for r in pool],
            params.test_fraction, params.seed, "test",
        )
        for record, is_test in zip(pool, mask, strict=True):
            if is_test:
                record.split = "test"
        pool = [r for r in pool if r.split == "train"]
        val_fraction = params.val_fraction / (1 - params.test_fraction)
    else:
        val_fraction = params.val_fraction
    mask = grouped_holdout(
        [r.label for r in pool], [r.patient_id for r in pool], val_fraction, params.seed, "val"
    )
    for record, is_val in zip(pool, mask, strict=True):
        if is_val:
            record.split = "val"


def check_disjoint(records: list[Record]) -> None:
    """No patient and no image content may sit in two splits."""
    for key in ("patient_id", "sha256"):
        seen: dict[str, str] = {}
        for r in records:
            value = getattr(r, key)
            if seen.setdefault(value, r.split) != r.split:
                raise AssertionError(f"{key} {value} appears in {seen[value]} and {r.split}")


# ---------------------------------------------------------------- the stage


def counts_by_split(records: list[Record]) -> dict[str, dict[str, int]]:
    counts = Counter((r.split, r.label) for r in records)
    return {s: {c: counts[(s, c)] for c in CLASSES} for s in SPLITS}


def prepare(params: PrepareParams) -> dict:
    """Run the stage; returns the report that it also writes beside index.csv."""
    records, rejected = scan(Path(params.data_dir), params.extensions)
    if not records:
        raise PrepareError(
            f"no usable images under {params.data_dir!r} ({len(rejected)} files rejected); "
            f"expected {LAYOUT_HINT}"
        )
    records, duplicates = dedupe(records)
    assign_splits(records, params)
    check_disjoint(records)

    report = {
        "data_dir": params.data_dir,
        "images": len(records),
        "counts": counts_by_split(records),
        "patients": {s: len({r.patient_id for r in records if r.split == s}) for s in SPLITS},
        "official_test_split": any(r.source == "test" for r in records),
        "duplicates_dropped": duplicates,
        "rejected": rejected,
    }
    with atomic_dir(params.out_dir) as out:
        with open(out / "index.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(INDEX_COLUMNS)
            for r in records:
                writer.writerow([r.path, r.label, r.patient_id, r.split, r.sha256])
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "report.md").write_text(render_report(report))
    return report


def render_report(report: dict) -> str:
    lines = [
        f"# Data report: {report['data_dir']}",
        "",
        "| split | " + " | ".join(CLASSES) + " | total | patients |",
        "| --- |" + " ---: |" * (len(CLASSES) + 2),
    ]
    for split in SPLITS:
        row = report["counts"][split]
        cells = [f"{row[c]:,}" for c in CLASSES]
        total = f"{sum(row.values()):,}"
        lines.append(f"| {split} | {' | '.join(cells)} | {total} | {report['patients'][split]:,} |")
    totals = [f"{sum(report['counts'][s][c] for s in SPLITS):,}" for c in CLASSES]
    lines.append(f"| all | {' | '.join(totals)} | {report['images']:,} | |")
    lines += ["", f"Duplicates dropped: {len(report['duplicates_dropped'])}"]
    lines += [f"- {d['path']}: {d['reason']}" for d in report["duplicates_dropped"]]
    lines += ["", f"Files rejected: {len(report['rejected'])}"]
    lines += [f"- {d['path']}: {d['reason']}" for d in report["rejected"]]
    return "\n".join(lines) + "\n"


def read_index(path: str | Path) -> list[dict[str, str]]:
    """Rows of an index.csv written by this stage."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
