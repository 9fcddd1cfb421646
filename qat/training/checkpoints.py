"""A cache of trained float models keyed by everything that determines them (data, front end,
model, trainer, seed), shared by every recipe and bit-width of a sweep.

Concurrency: the first run to need a key takes an exclusive file lock and trains; other runs with
the same key block on the lock and then load its result. The model is written to a temporary
folder and renamed into place, so a crash never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import tf_keras as keras

from qat.io import atomic_dir, make_dirs

log = logging.getLogger(__name__)

MODEL_FILE = "float_model.keras"
INFO_FILE = "float_info.json"


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able description."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock held for the `with` block (released if the process dies)."""
    make_dirs(path.parent)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def save_model_dir(model, info: Dict[str, Any], folder: Path) -> None:
    """Write model + info into `folder` atomically (temporary sibling, then rename)."""
    with atomic_dir(folder) as tmp:
        model.save(tmp / MODEL_FILE)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))


def load_model_dir(folder: Path) -> Tuple[Any, Dict[str, Any]]:
    """Load a model + info written by `save_model_dir`."""
    model = keras.models.load_model(folder / MODEL_FILE, compile=False)
    info = json.loads((folder / INFO_FILE).read_text())
    return model, info


def cached_float_model(cache_dir: Optional[str], key: str, train: Callable[[], Tuple[Any, Dict[str, Any]]],
                       reuse: bool = True) -> Tuple[Any, Dict[str, Any], bool]:
    """Return (model, info, reused): the cached float model for `key`, or the result of `train()`
    (then cached). With no cache_dir or reuse=False, always trains."""
    if not cache_dir:
        model, info = train()
        return model, info, False
    root = Path(os.path.expanduser(cache_dir)) / "float"
    folder = root / key
    with file_lock(root / f"{key}.lock"):
        if reuse and (folder / MODEL_FILE).exists() and (folder / INFO_FILE).exists():
            try:
                model, info = load_model_dir(folder)
                log.info("float model reused from %s", folder)
                return model, info, True
            except Exception as e:  # a checkpoint from an incompatible version: retrain and replace it
                log.warning("cached float model %s unreadable (%s); retraining", folder, e)
        model, info = train()
        save_model_dir(model, info, folder)
        return model, info, False
