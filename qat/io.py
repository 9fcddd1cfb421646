"""Writing files and folders so that a reader sees the old version or the new one, never half of one:
everything is written under a temporary name in the same folder and renamed into place. Files and
folders get the permissions the user's umask gives (not the 0600 / 0700 of temporary files), so a
cache or a run folder can be shared. Also the lock that makes one run build a cache entry while
others wait, and the removal of temporary files a killed writer left behind."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from qat.errors import DataError

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 4 * 3600     # a run waiting for another run's cache entry gives up after this long
LOCK_NOTE_S = 60              # and says so every minute while it waits
ERROR_FILE = "error.txt"      # written into the folder of a failed job of a multirun (qat.config.job)


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


@contextlib.contextmanager
def file_lock(path: Path, what: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive advisory lock on `path` for the `with` block, released when the block ends or the
    process dies. While another process holds it, the wait is logged (naming `what`) every minute;
    after `timeout_s` a DataError names the lock file. OSError when the lock file cannot be created
    (a read-only cache): the caller decides what to do without the lock."""
    path = Path(path)
    make_dirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        start = time.monotonic()
        noted = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > timeout_s:
                    raise DataError(f"gave up after {waited:.0f} s waiting for another run that holds {path} "
                                    f"({what}): if no such run is alive, delete the lock file and rerun")
                if noted is None or waited - noted >= LOCK_NOTE_S:
                    log.info("waiting for another run that is %s (lock %s, %.0f s so far)", what, path, waited)
                    noted = waited
                time.sleep(min(1.0, timeout_s))
        yield
    finally:
        os.close(fd)


def remove_stale(folder: Path, prefix: str) -> None:
    """Remove the temporary files and folders named `prefix*` in `folder` (call it while holding the
    lock of the entry they belong to: then no live writer owns them)."""
    for p in Path(folder).glob(f"{prefix}*"):
        log.info("removing %s, left by a writer that was stopped", p)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def list_failed_jobs(sweep: Path) -> int:
    """Print the failed jobs of the Hydra multirun in `sweep` (the job folders holding `ERROR_FILE`,
    and their errors) to stderr; their number."""
    jobs = sorted(p.parent for p in Path(sweep).glob("*/.hydra"))
    failed = [(j, (j / ERROR_FILE).read_text().strip()) for j in jobs if (j / ERROR_FILE).is_file()]
    if failed:
        print(f"{len(failed)} of {len(jobs)} jobs failed:", file=sys.stderr)
        for folder, message in failed:
            print(f"  {folder}: {message}", file=sys.stderr)
    return len(failed)
