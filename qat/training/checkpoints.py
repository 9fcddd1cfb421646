"""A cache of trained float models keyed by everything that determines them (data, front end,
model, trainer, seed), shared by every recipe and bit-width of a sweep.

Concurrency: a complete entry is read without a lock (entries appear by an atomic rename, so a
read-only shared cache works); otherwise the first run to need a key takes an exclusive file lock
and trains, and other runs with the same key wait for it and then load its result. The model is
written to a temporary folder and renamed into place, so a crash never leaves a half-written
checkpoint behind; temporary folders of a killed writer are removed by the next writer. A damaged
entry (unreadable, or weights that are not finite) is named in a warning and trained again; a cache
that cannot be written is a warning, and the run goes on without caching.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import tf_keras as keras

from qat.io import atomic_dir, file_lock, remove_stale

log = logging.getLogger(__name__)

MODEL_FILE = "float_model.keras"
INFO_FILE = "float_info.json"


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able description."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str) -> str:
    """A short digest of a file's bytes (a user's model file in a cache key)."""
    h = hashlib.sha1()
    with open(os.path.expanduser(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


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


def _load_complete(folder: Path) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """The entry in `folder` if it is complete and sound, else None (a damaged one is named)."""
    if not ((folder / MODEL_FILE).exists() and (folder / INFO_FILE).exists()):
        return None
    try:
        model, info = load_model_dir(folder)
    except Exception as e:  # unreadable: truncated, from an incompatible version, ...
        log.warning("cached float model %s is damaged (%s: %s); training it again", folder, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return None
    if not all(np.all(np.isfinite(w)) for w in model.get_weights()):
        log.warning("cached float model %s has weights that are not finite; training it again", folder)
        return None
    log.info("float model reused from %s", folder)
    return model, info


def entry_stamp(cache_dir: Optional[str], key: str) -> Optional[int]:
    """The modification time (ns) of the cached float model for `key`, or None if there is none."""
    if not cache_dir:
        return None
    path = Path(os.path.expanduser(cache_dir)) / "float" / key / MODEL_FILE
    return path.stat().st_mtime_ns if path.is_file() else None


def cached_float_model(cache_dir: Optional[str], key: str, train: Callable[[], Tuple[Any, Dict[str, Any]]],
                       reuse: bool = True) -> Tuple[Any, Dict[str, Any], bool]:
    """Return (model, info, reused): the cached float model for `key`, or the result of `train()`
    (then cached). With no cache_dir or reuse=False, always trains."""
    if not cache_dir:
        model, info = train()
        return model, info, False
    root = Path(os.path.expanduser(cache_dir)) / "float"
    folder = root / key
    if reuse and (hit := _load_complete(folder)) is not None:
        return (*hit, True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(root / f"{key}.lock", f"training the float model {key}"))
        except OSError as e:
            log.warning("float-model cache %s cannot be written (%s); training without caching", root, e)
            model, info = train()
            return model, info, False
        if reuse and (hit := _load_complete(folder)) is not None:   # another run trained it meanwhile
            return (*hit, True)
        remove_stale(root, f".{key}.tmp")
        model, info = train()
        try:
            save_model_dir(model, info, folder)
        except OSError as e:
            log.warning("could not write the float model to the cache %s (%s); going on without caching",
                        folder, e)
        return model, info, False
