"""Numpy arrays as tf.data batches for Keras.

Keras' own adapter for numpy input builds a parallel map that TensorFlow's determinism rewrite
(op determinism is on: qat.training.fit.set_seed) turns into a sequential map, logging a harmless
"NodeDef mentions attribute use_unbounded_threadpool" error line whenever the last batch is partial.
These pipelines are the adapter's, with a sequential map: the same batches (for training the same
shuffled order, from the same random ops), so the same results, without the line. The batches are
gathered from the arrays in place, so no pipeline holds a second copy of a large training set.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf


class RowFile:
    """The rows of a 2-d or higher .npy file, read batch by batch with positioned reads (`os.pread`):
    a batch costs its own rows and nothing stays mapped into the process, so a set larger than memory
    costs only the page cache (a memory map would count every row it touched as the process's own)."""

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as fh:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(fh)]
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if fortran or len(shape) < 2:
            raise ValueError(f"{self.path} is not a C-ordered array of rows")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows, np.int64))
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        for k, r in enumerate(rows):
            data = os.pread(self._fd, self.row_bytes, self.offset + int(r) * self.row_bytes)
            out[k] = np.frombuffer(data, self.dtype).reshape(self.shape[1:])
        return out

    def __array__(self, dtype=None, copy=None):
        whole = self[np.arange(len(self))]
        return whole if dtype is None else whole.astype(dtype)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def gathered(indices: tf.data.Dataset, arrays: tuple) -> tf.data.Dataset:
    """Batches of `arrays` (numpy arrays or RowFiles, read in place: never copied whole into a tensor,
    so a large array costs only its batches) at each element of `indices` (a vector of rows)."""
    arrays = tuple(a if isinstance(a, RowFile) else np.asarray(a) for a in arrays)     # a memory map stays one

    def gather(i):
        return tuple(a[i] for a in arrays)

    def batch(i):
        out = tf.numpy_function(gather, [i], [tf.as_dtype(a.dtype) for a in arrays], stateful=False)
        for t, a in zip(out, arrays):
            t.set_shape((None,) + a.shape[1:])
        return tuple(out)

    return indices.map(batch)


def batched(x: np.ndarray, y: Optional[np.ndarray] = None, batch_size: int = 256) -> tf.data.Dataset:
    """The arrays as consecutive batches (no shuffling): for prediction and validation."""
    arrays = (x,) if y is None else (x, y)
    n = len(x)
    indices = tf.data.Dataset.range(0, n, batch_size).map(lambda s: tf.range(s, tf.minimum(s + batch_size, n)))
    ds = gathered(indices, arrays)
    return ds.map(lambda x_batch: x_batch) if y is None else ds     # one array: plain batches, not 1-tuples


def shuffled_batches(x: np.ndarray, y: np.ndarray, batch_size: int, epochs: int) -> Tuple[tf.data.Dataset, int]:
    """`epochs` epochs of (x, y) batches, reshuffled every epoch exactly as `model.fit(x, y,
    shuffle=True)` shuffles them; returns (dataset, steps per epoch)."""
    n = len(x)
    full, partial = divmod(n, batch_size)

    def permutation(_):
        return tf.random.shuffle(tf.range(n, dtype=tf.int64))

    def batch_indices(indices):
        k = full * batch_size
        flat = tf.data.Dataset.from_tensor_slices(tf.reshape(tf.slice(indices, [0], [k]), [full, batch_size]))
        if partial:
            flat = flat.concatenate(tf.data.Dataset.from_tensors(tf.slice(indices, [k], [partial])))
        return flat

    indices = tf.data.Dataset.range(1).repeat(epochs).map(permutation).prefetch(1).flat_map(batch_indices)
    ds = gathered(indices, (x, y))
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return ds.with_options(options), full + (1 if partial else 0)
