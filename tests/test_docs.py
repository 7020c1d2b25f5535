"""The docs as a front page plus references: size, no stale commit hashes, and benchmark
tables that are made from the results files, not typed by hand."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import tables  # noqa: E402

DOCS = [ROOT / "README.md", ROOT / "DESIGN.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_a_front_page_that_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    assert lines[2] == "```bash" and "dvc repro" in lines[4] and "pytest" in lines[6]


def test_no_commit_hash_in_prose():
    for doc in DOCS:
        for word in re.findall(r"\b[0-9a-f]{7,40}\b", doc.read_text()):
            assert not (re.search(r"\d", word) and re.search(r"[a-f]", word)), (doc, word)


def test_render_replaces_the_named_tables_and_leaves_the_others():
    text = ("a\n<!-- table:one -->\n| old |\n<!-- /table:one -->\nb\n"
            "<!-- table:two -->\n| kept |\n<!-- /table:two -->\n")
    out = tables.render(text, {"one": "| new |"})
    assert "| new |" in out and "| old |" not in out and "| kept |" in out
    assert tables.render(out, {"one": "| new |"}) == out


def test_docs_tables_are_what_the_results_files_say():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/tables.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_named_candidate_records_what_it_changes_and_its_table_keeps_its_cells(tmp_path):
    """`classifier.py --name` stores what the candidate's params change from params.yaml
    (the bases' location aside), and the table of candidates survives a regex's `|`."""
    import json

    import classifier

    from pneumoclip.config import write_relocated

    params = write_relocated(tmp_path, ROOT / "params.yaml",
                             base_models={"tiny_dir": "/elsewhere/bases"},
                             train_clip={"lr": 0.003, "lora": {"target_modules": ".*(q|v)"}})
    changed = classifier.changed_params(params)
    assert changed["train_clip.lr"] == "0.003"
    assert changed["train_clip.lora.target_modules"] == ".*(q|v)"
    assert "base_models.tiny_dir" not in changed
    # write_relocated moves every path under tmp_path; those are the only other changes
    assert all(k in ("train_clip.lr", "train_clip.lora.target_modules") or str(tmp_path) in v
               for k, v in changed.items())
    assert classifier.changed_params(ROOT / "params.yaml") == {}

    rows = json.loads((ROOT / "benchmarks/results/classifier.json").read_text())["rows"]
    table = classifier.candidates_table({"a candidate": {"rows": rows, "changed": changed}})
    row = next(line for line in table.splitlines() if line.startswith("| a candidate"))
    assert "(q\\|v)" in row
    cells = re.split(r"(?<!\\)\|", row)[1:-1]
    assert len(cells) == 6 and cells[-1].strip() == f"**{rows[0]['val_macro_f1']:.3f}**"
