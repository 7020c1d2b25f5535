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
