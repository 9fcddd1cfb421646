"""Writing files and folders so that a reader sees the old version or the new one, never half of one:
everything is written under a temporary name in the same folder and renamed into place. Files and
folders get the permissions the user's umask gives (not the 0600 / 0700 of temporary files), so a
cache or a run folder can be shared."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dirs(path: Path) -> Path:
    """`mkdir -p` with the umask's permissions."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path next to `path` (same suffix) to write to; on success it is renamed to
    `path` with the umask's file permissions, on failure it is removed."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(folder: Path) -> Iterator[Path]:
    """Yields a temporary folder next to `folder` to fill; on success it replaces `folder` (with the
    umask's folder permissions), on failure it is removed."""
    folder = Path(folder)
    make_dirs(folder.parent)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: Path, data: bytes) -> int:
    """Write `data` atomically; returns its size."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return len(data)


def write_json(path: Path, obj: Any, default=float) -> None:
    """Write JSON atomically; values JSON does not know are passed through `default` (numpy floats
    become floats)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=default))
