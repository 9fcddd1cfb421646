"""Values reused across the jobs of one process (a sweep under Hydra's basic launcher runs every job
in one process): what is computed from the float model and the clips, which is the same for every
recipe and bit-width of a grid with the same data, model and seed.

`derived(owner, what, compute, *inputs)` keeps `compute()` for as long as `owner` (a model) lives,
keyed by a digest of the owner's weights and of `inputs` (arrays by their bytes): a value is reused
only where computing it again would see exactly the same numbers, so results do not depend on what
ran before in the process. `Recent` is a small most-recently-used table for the owners themselves
(features, float models), so that memory stays bounded however long the sweep.
"""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional

import numpy as np

_DERIVED: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def fingerprint(*parts: Any) -> str:
    """A digest of arrays (shape, dtype and bytes) and other values (their repr)."""
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.shape}{part.dtype.str}".encode())
            h.update(np.ascontiguousarray(part).data)
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()


def weights_fingerprint(model) -> str:
    """A digest of every weight of a Keras model, in order."""
    return fingerprint(*[np.asarray(w) for w in model.get_weights()])


def derived(owner, what: str, compute: Callable[[], Any], *inputs: Any) -> Any:
    """`compute()`, or the value it gave before for the same `owner` object with the same weights,
    the same `what` and the same `inputs`. The value must not hold a reference to `owner` (it would
    keep it alive) and is shared: callers read it, never change it."""
    table = _DERIVED.setdefault(owner, {})
    key = (what, weights_fingerprint(owner), fingerprint(*inputs))
    if key not in table:
        table[key] = compute()
    return table[key]


class Recent:
    """The `size` most recently used values by key; older ones are dropped (and, for models, freed
    with everything `derived` kept for them)."""

    def __init__(self, size: int):
        self.size = int(size)
        self._items: "OrderedDict[Hashable, Any]" = OrderedDict()

    def get(self, key: Hashable) -> Optional[Any]:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()
