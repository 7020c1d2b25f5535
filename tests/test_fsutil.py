"""Crash-safe outputs: a kill at any step of a write leaves a complete output, never none."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pneumoclip import fsutil


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs (not even `finally` cleanup, below)."""


def fill(folder: Path, text: str) -> None:
    (folder / "a.txt").write_text(text)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text(text)


def content(folder: Path) -> str | None:
    """The output's version if it is complete, else None."""
    try:
        a, b = (folder / "a.txt").read_text(), (folder / "sub" / "b.txt").read_text()
    except OSError:
        return None
    return a if a == b else None


FS_CALLS = [(os, "rename"), (os, "replace"), (shutil, "rmtree"), (Path, "rename"),
            (fsutil, "_exchange")]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_a_kill_at_any_step_of_atomic_dir_leaves_a_complete_output(
        tmp_path, monkeypatch, exchange):
    if not exchange:  # a system without RENAME_EXCHANGE (macOS, old kernels)
        monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with fsutil.atomic_dir(out) as tmp:
        fill(tmp, "old")
    for kill_at in range(1, 12):
        calls = {"n": 0}

        def counting(real, kill_at=kill_at, calls=calls):
            def call(*args, **kw):
                calls["n"] += 1
                if calls["n"] == kill_at:
                    raise Killed
                return real(*args, **kw)
            return call

        with monkeypatch.context() as m:
            for owner, name in FS_CALLS:
                m.setattr(owner, name, counting(getattr(owner, name)))
            try:
                with fsutil.atomic_dir(out) as tmp:
                    fill(tmp, f"new{kill_at}")
            except Killed:
                pass
        # the output is complete at the moment of the kill, or the next run's entry mends it
        seen = content(out)
        with fsutil.atomic_dir(out) as tmp:
            assert content(out) in {"old", f"new{kill_at}", seen} - {None}, kill_at
            assert seen is not None or not exchange, kill_at  # renameat2: no gap at all
            fill(tmp, "old")
        assert content(out) == "old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_block_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with fsutil.atomic_dir(out) as tmp:
        fill(tmp, "old")
    with pytest.raises(RuntimeError), fsutil.atomic_dir(out) as tmp:
        fill(tmp, "half")
        raise RuntimeError("crash")
    assert content(out) == "old"
    assert not (tmp_path / "out.tmp").exists()


def test_write_json_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "metrics" / "real.json"
    fsutil.write_json(path, {"accuracy": 0.5})

    def torn_replace(src, dst):
        raise Killed

    monkeypatch.setattr(os, "replace", torn_replace)
    with pytest.raises(Killed):
        fsutil.write_json(path, {"accuracy": 0.9, "long": list(range(10_000))})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["real.json"]  # no temp left over
