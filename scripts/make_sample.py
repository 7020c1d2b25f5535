"""Cut the bundled sample out of the shared Kermany images (a maintainer's tool).

Whole patients are drawn at random (seeded) until each class has about --per-class train
images; the 16 images of Kermany's val/ folder come along so the sample keeps the layout.

    python scripts/make_sample.py ../shared/data sample --per-class 100
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
from collections import Counter, defaultdict
from pathlib import Path

ATTRIBUTION = """# Bundled sample of the Kermany pediatric chest X-ray set

{n} real images ({counts}) from the public pediatric chest X-ray set of Kermany et al.
(Guangzhou Women and Children's Medical Center), in the Kaggle "chest-xray-pneumonia" folder
layout, grayscale, 224x224. Whole patients were drawn at random (seed {seed}) by
`scripts/make_sample.py`, so every patient's images are all here or all absent.

## License and citation

The dataset is published under Creative Commons Attribution 4.0 (CC BY 4.0,
https://creativecommons.org/licenses/by/4.0/). This sample is redistributed under the same
license, unchanged except for the selection. Cite:

- Kermany DS, Goldbaum M, Cai W, et al. Identifying Medical Diagnoses and Treatable
  Diseases by Image-Based Deep Learning. Cell 2018;172(5):1122-1131.
- Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence Tomography (OCT) and Chest
  X-Ray Images for Classification. Mendeley Data, v2, 2018. doi:10.17632/rscbjbr9sj.2
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with open(args.source / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    patients: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["split"] == "train":
            patients[row["patient_id"]].append(row)
    order = sorted(patients)
    random.Random(args.seed).shuffle(order)
    counts: Counter[str] = Counter()
    chosen = [row for row in rows if row["split"] == "val"]
    for pid in order:
        labels = Counter(r["label"] for r in patients[pid])
        if all(counts[c] + n <= args.per_class for c, n in labels.items()):
            counts.update(labels)
            chosen += patients[pid]
    shutil.rmtree(args.dest, ignore_errors=True)
    for row in chosen:
        target = args.dest / row["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.source / row["path"], target)
    total = Counter(r["label"] for r in chosen)
    text = ", ".join(f"{total[c]} {c}" for c in ("NORMAL", "BACTERIA", "VIRUS"))
    (args.dest / "README.md").write_text(
        ATTRIBUTION.format(n=len(chosen), counts=text, seed=args.seed)
    )
    print(f"{len(chosen)} images: {text}")


if __name__ == "__main__":
    main()
