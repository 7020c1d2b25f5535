"""Regenerate the docs' benchmark tables from what the benchmark scripts wrote.

    python benchmarks/tables.py           # rewrite the marked tables in README.md and docs/
    python benchmarks/tables.py --check   # exit 1 if a table differs from its results file

A table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->`. NAME is rendered from
`benchmarks/results/*.json` by the benchmark script that wrote it; a table whose results
file does not exist yet is left as it is (history from before the results were kept).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def renderers() -> dict:
    """Table name -> (results file, function from its parsed JSON to markdown)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import augmentation
    import classifier
    import main_command
    import processes
    import sample_scores
    import serving
    import shift

    return {
        "headline": ("classifier.json", lambda r: classifier.table(r["rows"])),
        "classifier": ("classifier.json", lambda r: classifier.table(r["rows"])),
        "classifier-candidates": ("classifier-candidates.json",
                                  lambda r: classifier.candidates_table(r["runs"])),
        "augmentation": ("augmentation.json", augmentation.variant_table),
        "synthetic-classes": ("augmentation.json", augmentation.quality_table),
        "serving": ("serving.json", serving.table),
        "serving-goals": ("serving.json", serving.goals_table),
        "serving-replica": ("serving.json", serving.replica_table),
        "processes": ("processes.json", processes.table),
        "main-command": ("main-command.json", main_command.table),
        "bases": ("../../bases/tiny/manifest.json", pretrain_table),
        "sample-scores": ("sample-scores.json", sample_scores.table),
        "sample-seeds": ("sample-scores.json", sample_scores.seeds_table),
        "shift": ("shift.json", lambda r: shift.table(r["runs"]["default"])),
        "shift-recall": ("shift.json", lambda r: shift.recall_table(r["runs"]["default"])),
        "shift-base": ("shift.json", lambda r: shift.compare_table(r["runs"])),
        "shift-base-normal": ("shift.json", lambda r: shift.compare_normal_table(r["runs"])),
        "shift-compare": ("shift-candidates.json", lambda r: shift.compare_table(r["runs"])),
        "shift-compare-normal": ("shift-candidates.json",
                                 lambda r: shift.compare_normal_table(r["runs"])),
        "shift-seeds": ("shift-seeds.json", lambda r: shift.seeds_table(r["runs"])),
        "devices": ("devices-cuda.json", lambda gpu: main_command.versus(
            json.loads((RESULTS / "main-command.json").read_text()), gpu)),
    }


def pretrain_table(manifest: dict) -> str:
    """Markdown: what `pneumoclip pretrain` made the shipped tiny bases from, and how well."""
    data, results, size = manifest["data"], manifest["results"], manifest["bytes"]
    clip, sd = results["clip"], results["sd"]
    best = clip["best"]
    return "\n".join([
        "| base | images (train / val) | result | pretraining time | size (fp16) |",
        "| --- | --- | --- | ---: | ---: |",
        f"| CLIP | {data['train_images']:,} / {data['val_images']:,} | zero-shot val accuracy "
        f"{best['zero_shot_val_accuracy']:.3f}, macro-F1 {best['zero_shot_val_macro_f1']:.3f} "
        f"(epoch {best['epoch']} of {clip['epochs_run']}) | {clip['train_seconds'] / 60:.1f} min "
        f"| {size['clip'] / 1e6:.1f} MB |",
        f"| SD | {data['train_images']:,} / - | UNet loss {sd['unet_final_loss']:.4f}, VAE "
        f"scaling factor {sd['vae_scaling_factor']:.3f} | {sd['train_seconds'] / 60:.1f} min | "
        f"{size['sd'] / 1e6:.1f} MB |",
        "",
        f"Left out: {data['excluded_rows']} images of the {data['excluded_patients']} patients "
        "of the bundled sample. Tiny CPU profile, 2 CPUs.",
    ])


def render(text: str, tables: dict[str, str]) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in tables:
            return match.group(0)
        return f"<!-- table:{name} -->\n{tables[name].strip()}\n<!-- /table:{name} -->"

    return re.sub(r"<!-- table:([\w-]+) -->\n.*?<!-- /table:\1 -->", replace, text, flags=re.S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    tables = {}
    for name, (file, fn) in renderers().items():
        if (RESULTS / file).is_file():
            tables[name] = fn(json.loads((RESULTS / file).read_text()))
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = render(text, tables)
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    verb = "differ from their results" if args.check else "rewritten"
    print(f"{len(tables)} tables from results; {verb}: {', '.join(map(str, stale)) or 'none'}")
    sys.exit(1 if args.check and stale else 0)


if __name__ == "__main__":
    main()
