"""Small file-system helpers shared by the stages."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a scratch folder that replaces `out_dir` only if the block succeeds.

    A crash or Ctrl-C half way leaves the last good `out_dir` untouched, never a mix.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_key(settings: Any, files: Iterable[str | Path] = (),
                folders: Iterable[str | Path] = ()) -> str:
    """A short hash of what decides a result: `settings` (as sorted JSON), the bytes of each
    file, and every file (relative path and bytes) under each folder; it names a checkpoint."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        digest.update(sha256_file(path).encode())
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                digest.update(f"{path.relative_to(folder)}:{sha256_file(path)}".encode())
    return digest.hexdigest()[:16]


def save_state(path: str | Path, state: dict) -> None:
    """`torch.save` a training state under a temporary name and rename it over `path`, so a
    kill mid-write keeps the previous checkpoint."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str | Path, who: str, make: Callable[[dict], T]) -> T | None:
    """`make(state)` of the checkpoint at `path`, or None when there is none.

    Only tensors, numbers, strings and containers load (`weights_only`): no pickled object is
    executed. A file that does not load, or that `make` rejects, is set aside as `.corrupt`
    (kept for a look) and reported, and the caller starts over.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        return None
    try:
        return make(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - any unreadable file is handled alike
        aside = path.with_suffix(".corrupt")
        os.replace(path, aside)
        print(f"{who}: checkpoint {path} is unreadable ({err.__class__.__name__}); moved to "
              f"{aside.name}, starting over")
        return None
