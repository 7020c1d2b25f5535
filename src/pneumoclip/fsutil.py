"""Small file-system helpers shared by the stages: crash-safe outputs and file hashes.

Every output is written under a temporary name and renamed into place, so a kill at any
moment leaves either the previous complete output or the new complete one, never a part.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to a temporary file beside `path`, flush it to disk, rename it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """`atomic_write` of indented JSON with a final newline (the metrics and reports)."""
    return atomic_write(path, json.dumps(data, indent=2) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a scratch folder that replaces `out_dir` only if the block succeeds.

    A crash or Ctrl-C at any point leaves a complete `out_dir`, the last good one or the new
    one, never a mix and never none: the new folder is swapped in with one atomic exchange.
    Where the system has no exchange, the old folder is renamed aside first, and an
    interrupted swap is finished or undone on the next entry.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    old = out_dir.with_name(out_dir.name + ".old")
    if old.exists() and not out_dir.exists():  # a swap was cut between its two renames
        old.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out_dir.exists():
        tmp.rename(out_dir)
    elif _exchange(tmp, out_dir):
        shutil.rmtree(tmp)  # now the previous output
    else:
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)


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
